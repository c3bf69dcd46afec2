"""The ResNet paper's classification testing protocols (He et al., 2015, sections 3.4 and 4.1).

All functions take already-normalised float images ``(N, C, H, W)`` on the model's device:

* **center**: one ``crop x crop`` view from the middle of the image brought to ``resize``;
* **10crop**: the four corners and the centre of that image, and their horizontal mirrors; the
  softmax probabilities of the ten views are averaged (the paper's "standard 10-crop testing");
* **multiscale**: fully-convolutional testing. The image is resized so its SHORTER side equals
  each of ``scales`` (aspect kept; the paper uses {224, 256, 384, 480, 640}), the classifier is
  applied as a 1x1 convolution at every position of the last feature map, and the per-position
  softmax probabilities are averaged over positions, then over scales;
* **ensemble**: the mean of the models' softmax probabilities, for any of the above.

At another training size ``t`` the paper's numbers scale by ``t / 224``
(:func:`default_protocol_sizes`): Fashion-MNIST nets trained on 28x28 crops are tested with
``crop=28``, ``resize=32`` (``28 * 256/224``) and ``scales=(28, 32, 48, 60, 80)``. Because those
nets are trained on random 28-crops of the image zero-padded by 4, their 10-crop source is the
image *padded* to 32 (``source_mode="pad"``), so the views are the training-time shifts; ImageNet
style data uses ``source_mode="resize"`` (shorter side to ``resize``), as in the paper.

Errors are in percent (``top1_err``, ``top5_err``), the way the paper's tables report them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

PROTOCOLS = ("center", "10crop", "multiscale")
PAPER_TRAIN_SIZE = 224
PAPER_RESIZE = 256
PAPER_SCALES = (224, 256, 384, 480, 640)
TEN_CROP_VIEWS = 10  # four corners and the centre, and their mirrors
Fill = Union[float, Sequence[float]]
Models = Union[Mapping[str, nn.Module], Sequence[nn.Module]]


def default_protocol_sizes(train_size: int) -> Dict[str, object]:
    """The paper's test sizes scaled to ``train_size`` (the side of the training crops).

    Returns:
        ``{"crop": train_size, "resize": round(train_size * 256 / 224),
        "scales": [round(s * train_size / 224) for s in (224, 256, 384, 480, 640)]}``
    """
    if train_size <= 0:
        raise ValueError(f"train_size must be positive, got {train_size}")
    ratio = train_size / PAPER_TRAIN_SIZE
    return {
        "crop": int(train_size),
        "resize": int(round(PAPER_RESIZE * ratio)),
        "scales": [int(round(s * ratio)) for s in PAPER_SCALES],
    }


def check_protocols(protocols: Iterable[str]) -> List[str]:
    """Validate protocol names (``center``, ``10crop``, ``multiscale``); duplicates removed, order kept."""
    out: List[str] = []
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"no protocol given; choose from {', '.join(PROTOCOLS)}")
    return out


# ---------------------------------------------------------------------- metrics
def topk_errors(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k error in percent: the share of images whose label is not among the ``k`` best scores.

    Args:
        scores: ``(N, K)`` logits or probabilities (only their order matters).
        labels: ``(N,)`` class indices in ``0..K-1``.
        ks: which ``k``; a ``k`` above ``K`` is capped at ``K`` (error 0), keeping its key name.

    Returns:
        ``{"top1_err": float, "top5_err": float}`` (one ``top{k}_err`` per ``k``).
    """
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (N, K) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    n, k_all = scores.shape
    if n == 0:
        raise ValueError("topk_errors needs at least one image")
    if int(labels.min()) < 0 or int(labels.max()) >= k_all:
        raise ValueError(f"labels must lie in 0..{k_all - 1}, got {int(labels.min())}..{int(labels.max())}")
    top = scores.topk(min(max(ks), k_all), dim=1).indices  # (N, kmax), best first
    hit = top == labels.to(top.device)[:, None]
    out = {}
    for k in ks:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        correct = hit[:, : min(k, k_all)].any(dim=1).float().mean().item()
        out[f"top{k}_err"] = 100.0 * (1.0 - correct)
    return out


# ---------------------------------------------------------------------- views
def resize_shorter(images: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``(N, C, H, W)`` so that ``min(H, W) == size``, keeping the aspect ratio."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    scale = size / min(h, w)
    new = (size, max(size, int(round(w * scale)))) if h <= w else (max(size, int(round(h * scale))), size)
    kwargs = {"antialias": True, "align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    return F.interpolate(images, size=new, mode=interpolation, **kwargs)


def pad_to(images: torch.Tensor, size: int, fill: Fill = 0.0) -> torch.Tensor:
    """Pad ``(N, C, H, W)`` evenly on all sides to at least ``size x size`` with ``fill`` (per channel or one value)."""
    n, c, h, w = images.shape
    H, W = max(h, size), max(w, size)
    if (H, W) == (h, w):
        return images
    values = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if values.numel() not in (1, c):
        raise ValueError(f"fill has {values.numel()} values, images have {c} channels")
    out = values.reshape(1, -1, 1, 1).expand(n, c, H, W).clone()
    top, left = (H - h) // 2, (W - w) // 2
    out[:, :, top: top + h, left: left + w] = images
    return out


def make_source(images: torch.Tensor, size: int, mode: str = "resize", fill: Fill = 0.0,
                interpolation: str = "bilinear") -> torch.Tensor:
    """The image the center / 10-crop views are cut from.

    ``mode="resize"``: shorter side to ``size`` (the paper's 256). ``mode="pad"``: padded evenly to
    at least ``size x size`` with ``fill`` (nets trained on crops of a padded image; a larger image
    is left as is).
    """
    if mode == "resize":
        return resize_shorter(images, size, interpolation)
    if mode == "pad":
        return pad_to(images, size, fill)
    raise ValueError(f"source mode must be 'resize' or 'pad', got {mode!r}")


def _fit(images: torch.Tensor, crop: int, interpolation: str) -> torch.Tensor:
    """Resize up first when ``crop`` exceeds the shorter side, so every view lies inside the image."""
    if crop <= 0:
        raise ValueError(f"crop must be positive, got {crop}")
    return resize_shorter(images, crop, interpolation) if min(images.shape[-2:]) < crop else images


def center_crop(images: torch.Tensor, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The middle ``crop x crop`` of each image (offsets rounded down); a larger ``crop`` resizes the image up first."""
    images = _fit(images, crop, interpolation)
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top: top + crop, left: left + crop]


def ten_crop_views(images: torch.Tensor, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Ten ``crop x crop`` views of each image: top-left, top-right, bottom-left, bottom-right, centre,
    then the horizontal mirror of each of those five.

    Args:
        images: ``(N, C, H, W)``; a ``crop`` above ``min(H, W)`` resizes the images up first.

    Returns:
        ``(10 * N, C, crop, crop)``, view-major: rows ``v * N .. v * N + N - 1`` are view ``v``, so
        ``scores.view(10, N, K).mean(0)`` averages per image.
    """
    images = _fit(images, crop, interpolation)
    h, w = images.shape[-2:]
    five = [
        images[..., :crop, :crop],
        images[..., :crop, w - crop:],
        images[..., h - crop:, :crop],
        images[..., h - crop:, w - crop:],
        center_crop(images, crop),
    ]
    return torch.cat(five + [v.flip(-1) for v in five])


# ---------------------------------------------------------------------- scores
def class_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as ``(N, K)`` float logits (a per-position output ``(N, K, H, W)`` is averaged)."""
    out = model(x)
    if out.dim() == 4:
        out = out.mean(dim=(2, 3))
    return out.float()


@torch.no_grad()
def center_scores(model: nn.Module, images: torch.Tensor, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Softmax probabilities ``(N, K)`` of the centre ``crop`` (the caller brings the image to its source size)."""
    return class_logits(model, center_crop(images, crop, interpolation)).softmax(dim=1)


@torch.no_grad()
def ten_crop_scores(model: nn.Module, images: torch.Tensor, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The mean of the softmax probabilities of the ten views of :func:`ten_crop_views`, ``(N, K)``."""
    n = images.shape[0]
    probs = class_logits(model, ten_crop_views(images, crop, interpolation)).softmax(dim=1)
    return probs.view(TEN_CROP_VIEWS, n, -1).mean(dim=0)


def dense_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-position logits ``(N, K, h, w)``: the model's linear classifier applied as a 1x1
    convolution over ``model.forward_features(x)``, with the classifier's own weights.

    The model is not modified. It must offer timm's ``forward_features`` and ``get_classifier()``
    returning an ``nn.Linear`` (res_backbone's ``ResNet`` and ``heads.Classifier`` do).
    """
    if not hasattr(model, "forward_features") or not hasattr(model, "get_classifier"):
        raise TypeError(
            "fully-convolutional testing needs forward_features() and get_classifier(); "
            f"{type(model).__name__} lacks one"
        )
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"the classifier must be an nn.Linear to act as a 1x1 convolution, got {type(fc).__name__}")
    feats = model.forward_features(x)
    return F.conv2d(feats, fc.weight[:, :, None, None].to(feats.dtype),
                    None if fc.bias is None else fc.bias.to(feats.dtype)).float()


@torch.no_grad()
def fully_conv_scores(model: nn.Module, images: torch.Tensor, scales: Sequence[int], *, average: str = "probs",
                      interpolation: str = "bilinear") -> torch.Tensor:
    """Multi-scale fully-convolutional scores ``(N, K)`` (paper, section 3.4).

    For each scale the images are resized so the shorter side equals it (aspect kept), and
    :func:`dense_logits` gives a score map. ``average="probs"`` (default) takes the softmax at every
    position and averages over positions; ``average="logits"`` averages the logits over positions
    first (at one scale this equals the softmax of the average-pooled model). Scales are then averaged.
    """
    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
    scales = list(scales)
    if not scales:
        raise ValueError("fully_conv_scores needs at least one scale")
    total: Optional[torch.Tensor] = None
    for s in scales:
        maps = dense_logits(model, resize_shorter(images, int(s), interpolation))
        if average == "probs":
            p = maps.softmax(dim=1).mean(dim=(2, 3))
        else:
            p = maps.mean(dim=(2, 3)).softmax(dim=1)
        total = p if total is None else total + p
    return total / len(scales)


def ensemble_scores(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of several models' softmax probabilities, each ``(N, K)``."""
    probs = list(probs)
    if not probs:
        raise ValueError("ensemble_scores needs at least one set of probabilities")
    shapes = {tuple(p.shape) for p in probs}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree in shape: {sorted(shapes)}")
    return torch.stack(probs).mean(dim=0)


# ---------------------------------------------------------------------- driver
def _named(models: Models) -> Dict[str, nn.Module]:
    named = dict(models) if isinstance(models, Mapping) else {f"model{i}": m for i, m in enumerate(models)}
    if not named:
        raise ValueError("no model to evaluate")
    if "ensemble" in named:
        raise ValueError("'ensemble' is reserved for the ensemble row; rename that model")
    return named


def _train_size(model: nn.Module) -> int:
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, PAPER_TRAIN_SIZE, PAPER_TRAIN_SIZE)
    return int(size[-1])


@torch.no_grad()
def collect_protocol_probs(
    models: Models,
    loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    protocols: Sequence[str] = PROTOCOLS,
    *,
    crop: Optional[int] = None,
    resize: Optional[int] = None,
    scales: Optional[Sequence[int]] = None,
    source_mode: str = "resize",
    fill: Fill = 0.0,
    interpolation: str = "bilinear",
    average: str = "probs",
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], torch.Tensor, Dict[str, object]]:
    """Run every model under every protocol over ``loader`` (one pass over the data).

    Args:
        models: a list, or ``{name: model}``; each is put in eval mode on ``device``.
        loader: yields ``(images (B, C, H, W) normalised float, labels (B,))``.
        protocols: any of ``center``, ``10crop``, ``multiscale``.
        crop, resize, scales: test sizes; ``None`` takes :func:`default_protocol_sizes` of the first
            model's ``pretrained_cfg["input_size"]``.
        source_mode, fill: how center / 10-crop get their ``resize`` source (:func:`make_source`).
        average: multiscale's position averaging, ``"probs"`` or ``"logits"`` (:func:`fully_conv_scores`).

    Returns:
        ``(probs, labels, sizes)``: ``probs[name][protocol]`` is ``(N, K)`` on the CPU, ``labels``
        ``(N,)``, ``sizes`` the settings used (``crop``, ``resize``, ``scales``, ``source_mode``, ``average``).
    """
    from tqdm import tqdm

    named = _named(models)
    protocols = check_protocols(protocols)
    defaults = default_protocol_sizes(_train_size(next(iter(named.values()))))
    sizes = {
        "crop": int(crop or defaults["crop"]),
        "resize": int(resize or defaults["resize"]),
        "scales": [int(s) for s in (scales or defaults["scales"])],
        "source_mode": source_mode,
        "average": average,
    }
    device = torch.device(device)
    for m in named.values():
        m.to(device).eval()
    parts: Dict[str, Dict[str, List[torch.Tensor]]] = {n: {p: [] for p in protocols} for n in named}
    all_labels: List[torch.Tensor] = []
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    bar = tqdm(total=total, desc="eval_cls", unit="img", disable=not progress)
    for images, labels in loader:
        images = images.to(device, non_blocking=True).float()
        source = make_source(images, sizes["resize"], source_mode, fill, interpolation) \
            if {"center", "10crop"} & set(protocols) else None
        for name, model in named.items():
            for p in protocols:
                if p == "center":
                    probs = center_scores(model, source, sizes["crop"], interpolation)
                elif p == "10crop":
                    probs = ten_crop_scores(model, source, sizes["crop"], interpolation)
                else:
                    probs = fully_conv_scores(model, images, sizes["scales"], average=average,
                                              interpolation=interpolation)
                parts[name][p].append(probs.cpu())
        all_labels.append(labels.cpu())
        bar.update(len(labels))
    bar.close()
    if not all_labels:
        raise ValueError("the loader yielded no images")
    probs_out = {n: {p: torch.cat(v) for p, v in per.items()} for n, per in parts.items()}
    return probs_out, torch.cat(all_labels), sizes


def evaluate_protocols(
    models: Models,
    loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    protocols: Sequence[str] = PROTOCOLS,
    *,
    scales: Optional[Sequence[int]] = None,
    crop: Optional[int] = None,
    resize: Optional[int] = None,
    ensemble: bool = True,
    device: Union[str, torch.device] = "cpu",
    ks: Sequence[int] = (1, 5),
    **kwargs,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Top-k errors (percent) of each model and, with several models, their ensemble, per protocol.

    Args:
        models, loader, protocols, scales, crop, resize, device: see :func:`collect_protocol_probs`
            (``**kwargs`` passes ``source_mode``, ``fill``, ``interpolation``, ``average``, ``progress``).
        ensemble: add an ``"ensemble"`` row (mean softmax of the models) when there are 2+ models.

    Returns:
        ``{name: {protocol: {"top1_err": ..., "top5_err": ...}}}`` plus ``"ensemble"``.
    """
    probs, labels, _ = collect_protocol_probs(models, loader, protocols, crop=crop, resize=resize, scales=scales,
                                              device=device, **kwargs)
    return errors_from_probs(probs, labels, ensemble=ensemble, ks=ks)


def errors_from_probs(probs: Mapping[str, Mapping[str, torch.Tensor]], labels: torch.Tensor, *, ensemble: bool = True,
                      ks: Sequence[int] = (1, 5)) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Turn :func:`collect_protocol_probs`' probabilities into errors, adding the ensemble row."""
    results = {n: {p: topk_errors(v, labels, ks) for p, v in per.items()} for n, per in probs.items()}
    if ensemble and len(probs) > 1:
        names = list(probs)
        results["ensemble"] = {
            p: topk_errors(ensemble_scores([probs[n][p] for n in names]), labels, ks) for p in probs[names[0]]
        }
    return results


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], ks: Sequence[int] = (1, 5)) -> str:
    """Rows model/ensemble x protocol, columns top-k error (%)."""
    head = "| model | protocol | " + " | ".join(f"top-{k} err (%)" for k in ks) + " |"
    lines = [head, "|" + "---|" * (2 + len(ks))]
    for name, per in results.items():
        for protocol, errs in per.items():
            cells = " | ".join(f"{errs[f'top{k}_err']:.2f}" for k in ks)
            lines.append(f"| {name} | {protocol} | {cells} |")
    return "\n".join(lines)
