"""Tensor transforms for classification: cheap enough for 28x28 images, batched where they can be.

Each transform takes a uint8 (0-255) or float (0-1) image ``(C, H, W)``; those marked ``batched``
also take a batch ``(B, C, H, W)``, drawing their randomness per image. :class:`Normalize` ends every
pipeline and returns float32. :func:`build_cls_transforms` assembles the paper's recipes:

* small images (section 4.2): zero-pad 4 pixels on each side, random crop back to the original size,
  random horizontal flip;
* ImageNet-style folders: random-resized crop (scale 0.08-1, aspect 3/4-4/3) + flip for training;
  shorter side resized to ``resize`` and a centre ``crop`` for evaluation.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS", "Compose", "Normalize", "RandomHorizontalFlip", "RandomInvert", "RandomPadCrop", "RandomResizedCrop",
    "ResizeCenterCrop", "build_cls_transforms",
]

AUGMENTATIONS = ("auto", "pad_crop", "rrc", "flip", "none")


class Compose:
    """Apply transforms in order; ``batched`` when all of them accept a batch."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        self.batched = all(getattr(t, "batched", False) for t in self.transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Normalize:
    """uint8 (0-255) or float (0-1) -> float32 ``(x - mean) / std`` per channel."""

    batched = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean} std={std}")
        std_t = torch.tensor(std, dtype=torch.float32)
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale = (1.0 / std_t).view(-1, 1, 1)
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != len(self.mean):
            raise ValueError(f"image has {x.shape[-3]} channels but mean/std have {len(self.mean)} values")
        scale = self._scale / 255.0 if x.dtype == torch.uint8 else self._scale
        return torch.addcmul(self._shift, x.float(), scale)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomPadCrop:
    """Zero-pad ``padding`` pixels on each side, then crop a random window of the original size
    (section 4.2 of the paper: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled").
    Each image of a batch gets its own offset."""

    batched = True

    def __init__(self, padding: int = 4):
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        b, c, h, w = xb.shape
        p = self.padding
        hp, wp = h + 2 * p, w + 2 * p
        padded = xb.new_zeros(b, c, hp, wp)
        padded[..., p:p + h, p:p + w] = xb
        # One gather over flat positions (advanced indexing over four axes is ~10x slower on CPU).
        oy = torch.randint(0, 2 * p + 1, (b, 1, 1))
        ox = torch.randint(0, 2 * p + 1, (b, 1, 1))
        pos = (oy + torch.arange(h).view(1, h, 1)) * wp + ox + torch.arange(w).view(1, 1, w)
        out = padded.view(b, c, hp * wp).gather(2, pos.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomPadCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image (of a batch, independently) with probability ``p``."""

    batched = True

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.flip(-1) if torch.rand(()) < self.p else x
        flip = (torch.rand(x.shape[0]) < self.p).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomInvert:
    """Replace each image (of a batch, independently) by its negative (``1 - x`` for float images in
    [0, 1], ``255 - x`` for uint8) with probability ``p``: dark objects on light ground as well as
    light on dark, so the features do not depend on the polarity (a grey-level classifier meant for
    objects on any background)."""

    batched = True

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"invert probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        top = 255 if x.dtype == torch.uint8 else 1.0
        pick = torch.rand(x.shape[0] if x.dim() == 4 else 1) < self.p
        return torch.where(pick.view(-1, *([1] * 3)) if x.dim() == 4 else pick, top - x, x)

    def __repr__(self) -> str:
        return f"RandomInvert(p={self.p})"


class RandomResizedCrop:
    """A random crop of ``scale`` (area fraction) and ``ratio`` (aspect), resized to ``size`` x ``size``
    (torchvision's parameters, the standard ImageNet training crop). One image at a time."""

    batched = False

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear"):
        from torchvision.transforms import v2

        self.size = int(size)
        self._t = v2.RandomResizedCrop(self.size, scale=scale, ratio=ratio, antialias=True,
                                       interpolation=_interp(interpolation))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._t(x)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size})"


class ResizeCenterCrop:
    """Resize the shorter side to ``resize`` (aspect kept), then take the centre ``crop`` x ``crop``.

    A ``crop`` larger than ``resize`` is handled by resizing the shorter side to ``crop`` instead, so
    the crop always lies inside the image (no padding, no error)."""

    batched = False

    def __init__(self, resize: int, crop: int, interpolation: str = "bilinear"):
        self.crop = int(crop)
        if self.crop > int(resize):
            log.warning("crop %d is larger than resize %d: resizing the shorter side to %d first",
                        self.crop, resize, self.crop)
        self.resize = max(int(resize), self.crop)
        self.interpolation = _interp(interpolation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if min(x.shape[-2:]) != self.resize:
            x = TF.resize(x, [self.resize], interpolation=self.interpolation, antialias=True)
        return TF.center_crop(x, [self.crop, self.crop])

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(resize={self.resize}, crop={self.crop})"


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"interpolation {name!r}; choose bilinear, bicubic or nearest") from None


def build_cls_transforms(
    *, train: bool, mean: Sequence[float], std: Sequence[float], augment: str = "pad_crop",
    resize: Optional[int] = None, crop: Optional[int] = None, interpolation: str = "bilinear", invert: float = 0.0,
) -> Compose:
    """The train or eval pipeline.

    Args:
        train: training pipeline (augmented) or evaluation pipeline (deterministic).
        mean, std: per-channel normalisation (values in [0, 1]).
        augment: ``"pad_crop"`` (pad 4 + random crop + flip, for small images), ``"rrc"`` (random
            resized crop to ``crop`` + flip), ``"flip"`` or ``"none"``; ignored when ``train`` is False.
        resize, crop: with both given, images are first brought to ``crop`` x ``crop`` by
            :class:`ResizeCenterCrop` (eval, and training except ``rrc``); None keeps the stored size
            (in-memory sets whose images are all the same size).
        invert: training only: probability of :class:`RandomInvert` (0: never).
    """
    if augment not in AUGMENTATIONS[1:]:
        raise ValueError(f"augment {augment!r}; choose one of {list(AUGMENTATIONS)}")
    steps: List[Callable] = []
    if train and augment == "rrc":
        if crop is None:
            raise ValueError("augment='rrc' needs a crop size")
        steps.append(RandomResizedCrop(crop, interpolation=interpolation))
    elif crop is not None:
        steps.append(ResizeCenterCrop(resize or crop, crop, interpolation))
    if train and augment == "pad_crop":
        steps.append(RandomPadCrop(4))
    if train and augment != "none":
        steps.append(RandomHorizontalFlip())
    if train and invert > 0:
        steps.append(RandomInvert(invert))
    steps.append(Normalize(mean, std))
    return Compose(steps)
