"""Classification data: in-memory image tensors (Fashion-MNIST) and ImageFolder trees.

Every dataset returns ``(image, label)``: ``image`` a float32 tensor ``(C, H, W)`` normalised with the
set's mean/std (by the transform), ``label`` an ``int`` class index.

    data = build_cls_datasets()                                   # Fashion-MNIST train + test, 1 channel
    data = build_cls_datasets(train_dir="train/", val_dir="val/", input_size=224)   # ImageFolder
    data.train[0]  -> (tensor (C, H, W), int);  data.classes, data.in_chans, data.mean, data.std

Augmentation (the paper's recipes): small images get section 4.2's CIFAR recipe, 4 pixels of zero
padding on each side, a random crop back to the original size and a random horizontal flip;
ImageFolder trees get a random-resized crop (scale 0.08-1, aspect 3/4-4/3) and a flip. Evaluation
resizes the shorter side to ``resize`` and takes the centre ``crop``.

The transforms (:mod:`.cls_transforms`) are tensor operations that also take a whole batch ``(B, C, H, W)``:
:class:`TensorClassification` applies them per batch (``__getitems__``), so on 28x28 images the data
pipeline costs a few milliseconds per batch and ``--workers 0`` is the fast choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..weights.catalogue import IMAGENET_MEAN, IMAGENET_STD
from .cls_transforms import (  # noqa: F401  (re-exported: one import place for the classification data)
    AUGMENTATIONS, Compose, Normalize, RandomHorizontalFlip, RandomPadCrop, RandomResizedCrop, ResizeCenterCrop,
    build_cls_transforms,
)
from .images import load_rgb_image
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

PathLike = Union[str, os.PathLike]

__all__ = [
    "AUGMENTATIONS", "ClassificationDataError", "ClsDatasets", "Compose", "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD", "IMG_EXTENSIONS", "ImageFolderClassification", "Normalize", "RandomHorizontalFlip",
    "RandomPadCrop", "RandomResizedCrop", "ResizeCenterCrop", "TensorClassification", "build_cls_datasets",
    "build_cls_transforms", "fit_stats",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# ITU-R BT.601 luma, what PIL's convert("L") uses.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


class ClassificationDataError(ValueError):
    """A dataset that cannot be used as given (layout, classes, sizes); the message names the folder."""


def _to_channels(x: torch.Tensor, in_chans: int, what: str) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` with C in {1, 3} -> ``in_chans`` channels (repeat grey, or BT.601 luma)."""
    c = x.shape[-3]
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    if c == 3 and in_chans == 1:
        w = torch.tensor(GRAY_WEIGHTS).view(3, 1, 1)
        return (x.float() * w).sum(-3, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ClassificationDataError(f"{what}: cannot turn {c}-channel images into in_chans={in_chans} (use 1 or 3)")


# ---------------------------------------------------------------------- datasets
class TensorClassification(Dataset):
    """An in-memory set of same-sized uint8 images (Fashion-MNIST).

    Args:
        images: uint8 ``(N, H, W)`` (grey) or ``(N, C, H, W)``.
        labels: int ``(N,)`` class indices.
        transform: a pipeline from :func:`build_cls_transforms` (None: float images in [0, 1]).
        in_chans: channels to return (1 or 3; grey is repeated, RGB turned into luma); None keeps them.
        classes: class names (index = label), for reports.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None,
                 in_chans: Optional[int] = None, classes: Optional[Sequence[str]] = None):
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise ClassificationDataError(f"images must be uint8 (N, H, W) or (N, C, H, W), got {images.dtype} "
                                          f"{tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ClassificationDataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        images = images.unsqueeze(1) if images.dim() == 3 else images
        self.in_chans = in_chans or images.shape[1]
        self.images = _to_channels(images, self.in_chans, "TensorClassification")
        self.labels, self.transform = labels, transform
        count = int(labels.max()) + 1 if len(labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(count)]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> List[int]:
        return self.labels.tolist()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x) if self.transform is not None else x.float() / 255.0

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self._apply(self.images[index]), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> List[Tuple[torch.Tensor, int]]:
        """A whole batch at once (the DataLoader calls this): one transform call over ``(B, C, H, W)``."""
        if self.transform is not None and not getattr(self.transform, "batched", False):
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = self._apply(self.images[idx])
        return list(zip(images.unbind(0), self.labels[idx].tolist()))


class ImageFolderClassification(Dataset):
    """Images under ``root/<class name>/**/<file>``; classes are the sorted sub-folder names.

    Args:
        root: the folder holding one sub-folder per class.
        classes: the expected class names (e.g. the training split's); the folder must hold exactly
            these, otherwise :class:`ClassificationDataError` names the missing and extra ones.
        transform: a pipeline from :func:`build_cls_transforms` (None: float images in [0, 1]).
        in_chans: 3 (RGB) or 1 (BT.601 luma).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ClassificationDataError: no class folders, an empty class folder (no file with one of
            :data:`IMG_EXTENSIONS`), or classes that differ from ``classes``.

    ``__getitem__`` raises :class:`~res_backbone.data.images.ImageDecodeError` naming the file of an
    image that cannot be read or decoded (truncated, not an image, a format outside
    ``images.IMAGE_FORMATS``), its subclass ``ImageTooLargeError`` for one over ``images.MAX_IMAGE_PIXELS``
    (refused from the header, nothing decoded), or ``FileNotFoundError`` for a file gone since the
    scan. Sub-folders and files that are symbolic links are followed, as torchvision's ImageFolder does.
    """

    def __init__(self, root: PathLike, classes: Optional[Sequence[str]] = None, transform: Optional[Callable] = None,
                 in_chans: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a folder)")
        if in_chans not in (1, 3):
            raise ClassificationDataError(f"{self.root}: in_chans must be 1 or 3, got {in_chans}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            hint = (" (image files lie directly in it: put them in one sub-folder per class)"
                    if any(_is_image(p) for p in self.root.iterdir()) else "")
            raise ClassificationDataError(
                f"{self.root}: no class folders; expected the ImageFolder layout root/<class name>/<images>{hint}")
        if classes is not None and list(classes) != found:
            missing = [c for c in classes if c not in found]
            extra = [c for c in found if c not in classes]
            raise ClassificationDataError(
                f"{self.root}: its class folders differ from the expected classes (e.g. the training split's): "
                f"missing {missing}, unexpected {extra}"
                + ("" if missing or extra else " (same names, different order)")
                + "; labels would not line up")
        self.classes, self.transform, self.in_chans = found, transform, in_chans
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(found):
            files, others = _scan(self.root / name)
            if not files:
                raise ClassificationDataError(
                    f"class folder {self.root / name} holds no images: only files ending in "
                    f"{', '.join(IMG_EXTENSIONS)} (any case) are read; {others} other file(s) there are ignored")
            self.samples += [(f, label) for f in files]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def limit(self, n: Optional[int]) -> "ImageFolderClassification":
        """Keep ``n`` samples spread evenly over the (class-sorted) list, so every class stays represented."""
        if n is not None and n < len(self.samples):
            keep = np.linspace(0, len(self.samples) - 1, n).round().astype(int)
            self.samples = [self.samples[i] for i in keep]
        return self

    def image_files(self):
        """``(file path, path, None, "")`` of every sample, for the pre-flight check (no expected size)."""
        return [(str(path), path, None, "") for path, _ in self.samples]

    def exclude(self, paths) -> None:
        """Leave these files out (the bad ones the pre-flight check found)."""
        drop = set(map(str, paths))
        self.samples = [(p, label) for p, label in self.samples if str(p) not in drop]

    def load(self, index: int) -> torch.Tensor:
        """The decoded image ``index`` as uint8 ``(in_chans, H, W)``."""
        path = self.samples[index][0]
        image = torch.from_numpy(load_rgb_image(path)).permute(2, 0, 1)
        return _to_channels(image, self.in_chans, str(path))

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.load(index)
        x = self.transform(x) if self.transform is not None else x.float() / 255.0
        return x, self.samples[index][1]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def _scan(folder: Path) -> Tuple[List[Path], int]:
    """Image files under ``folder`` (recursive, sorted) and the count of other files."""
    files, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image(p):
                files.append(p)
            else:
                others += 1
    return files, others


# ---------------------------------------------------------------------- one entry point
@dataclass
class ClsDatasets:
    """What :func:`build_cls_datasets` returns.

    ``val`` is Fashion-MNIST's test split (the paper reports test error) or the ``val_dir`` tree;
    ``input_size`` ``(C, H, W)`` and ``crop_pct`` (crop / resize) describe the evaluation crop, as a
    checkpoint's ``pretrained_cfg`` records them.
    """

    train: Optional[Dataset]
    val: Optional[Dataset]
    classes: List[str]
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    input_size: Tuple[int, int, int]
    crop_pct: float
    source: str  # "fashion_mnist" or "image_folder"


def fit_stats(values: Sequence[float], in_chans: int, what: str = "mean") -> Tuple[float, ...]:
    """Per-channel statistics adapted to ``in_chans``: one value repeated, or three averaged for grey."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{what} has {len(values)} values, which do not fit in_chans={in_chans}")


def build_cls_datasets(
    *, data_dir: Optional[PathLike] = None, train_dir: Optional[PathLike] = None,
    val_dir: Optional[PathLike] = None, in_chans: Optional[int] = None, limit_train: Optional[int] = None,
    limit_val: Optional[int] = None, input_size: int = 224, resize: Optional[int] = None,
    crop: Optional[int] = None, augment: str = "auto", mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None, classes: Optional[Sequence[str]] = None, train: bool = True,
    interpolation: str = "bilinear", invert: float = 0.0,
) -> ClsDatasets:
    """Training and evaluation sets, as ``tools/train_cls.py`` and the evaluation tools use them.

    Without ``train_dir``/``val_dir``: Fashion-MNIST (``data_dir`` or the installed package; train =
    60k training images, val = the 10k test images), 28x28, ``in_chans`` 1 by default (3 repeats the
    grey channel), normalised with its own mean/std, training augmentation pad-4 + crop + flip.
    With them: ImageFolder trees, ``in_chans`` 3 by default, ImageNet mean/std, training crop
    ``crop`` (default ``input_size``) from a random-resized crop, evaluation resize shorter side to
    ``resize`` (default ``crop / 0.875``) and centre crop.

    Args:
        data_dir: the Fashion-MNIST folder (default ``$RB_FASHION_MNIST`` or /usr/share/datasets/fashion-mnist).
        train_dir, val_dir: ImageFolder roots; ``val_dir``'s classes must equal ``train_dir``'s.
        in_chans: 1 or 3 (None: the dataset's natural count).
        limit_train, limit_val: keep only this many images (quick runs).
        input_size, resize, crop: ImageFolder sizes (see above).
        augment: ``auto`` (pad_crop for Fashion-MNIST, rrc for folders), ``pad_crop``, ``rrc``, ``flip``, ``none``.
        mean, std: normalisation (e.g. a checkpoint's ``pretrained_cfg``); None uses the dataset's.
        classes: expected class names (e.g. a checkpoint's ``classes``); checked against the data.
        train: False skips the training split (evaluation only).
        interpolation: resize interpolation for folders (``bilinear`` or ``bicubic``).
        invert: probability of a training image's negative (:class:`~.cls_transforms.RandomInvert`).

    Raises:
        FashionMNISTNotFoundError: Fashion-MNIST files missing (the message says how to install them).
        FileNotFoundError, ClassificationDataError: bad folders (the message names them).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment {augment!r}; choose one of {list(AUGMENTATIONS)}")
    if train_dir is None and val_dir is None:
        return _fashion_mnist(data_dir, in_chans or 1, limit_train, limit_val,
                              "pad_crop" if augment == "auto" else augment, mean, std, classes, train, invert)
    if train and train_dir is None:
        raise ValueError("--val-dir without --train-dir: give the training tree too (or neither, for Fashion-MNIST)")
    in_chans = in_chans or 3
    crop = int(crop or input_size)
    resize = int(resize or round(crop / 0.875))
    mean = fit_stats(mean if mean is not None else IMAGENET_MEAN, in_chans, "mean")
    std = fit_stats(std if std is not None else IMAGENET_STD, in_chans, "std")
    train_set = val_set = None
    if train:
        aug = "rrc" if augment == "auto" else augment
        tf = build_cls_transforms(train=True, mean=mean, std=std, augment=aug, resize=resize, crop=crop,
                                  interpolation=interpolation, invert=invert)
        train_set = ImageFolderClassification(train_dir, classes, tf, in_chans).limit(limit_train)
        classes = train_set.classes
    if val_dir is not None:
        tf = build_cls_transforms(train=False, mean=mean, std=std, resize=resize, crop=crop,
                                  interpolation=interpolation)
        val_set = ImageFolderClassification(val_dir, classes, tf, in_chans).limit(limit_val)
        classes = val_set.classes
    return ClsDatasets(train_set, val_set, list(classes), in_chans, mean, std, (in_chans, crop, crop),
                       min(crop, resize) / max(crop, resize), "image_folder")


def _fashion_mnist(data_dir, in_chans, limit_train, limit_val, augment, mean, std, classes, train,
                   invert=0.0) -> ClsDatasets:
    names = list(FASHION_MNIST_CLASSES)
    if classes is not None and list(classes) != names:
        raise ClassificationDataError(f"Fashion-MNIST has the classes {names}, not the expected {list(classes)}")
    mean = fit_stats(mean if mean is not None else FASHION_MNIST_MEAN, in_chans, "mean")
    std = fit_stats(std if std is not None else FASHION_MNIST_STD, in_chans, "std")
    train_set = None
    if train:
        images, labels = load_fashion_mnist("train", data_dir, limit_train)
        tf = build_cls_transforms(train=True, mean=mean, std=std, augment=augment, invert=invert)
        train_set = TensorClassification(images, labels, tf, in_chans, names)
    images, labels = load_fashion_mnist("test", data_dir, limit_val)
    val_set = TensorClassification(images, labels, build_cls_transforms(train=False, mean=mean, std=std),
                                   in_chans, names)
    h, w = images.shape[-2:]
    return ClsDatasets(train_set, val_set, names, in_chans, mean, std, (in_chans, int(h), int(w)), 1.0,
                       "fashion_mnist")
