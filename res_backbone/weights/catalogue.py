"""The weights catalogue: every ImageNet ResNet checkpoint users may already have in a local cache.

One table, :data:`WEIGHTS`, holds what is known about each published file: where torchvision or timm
keeps it, the SHA-256 prefix torchvision (and timm's older GitHub releases) put in the file name,
the data config the weights expect (input size, test-time crop, mean/std, interpolation) and the
ImageNet-1k accuracy its publisher reports. Nothing here reads files or touches the network; cache
lookup lives in :mod:`.cache`, loading in :mod:`.load`, hashing in :mod:`.identify`, conversion in
:mod:`.convert`.

Sources of the facts (``tests/res_backbone/weights/test_weights.py`` checks them against the installed
libraries, so a wrong row fails a test):

* torchvision rows: ``torchvision.models.ResNet*_Weights`` (``url``, ``meta["_metrics"]``,
  ``transforms()``: resize 256 for ``IMAGENET1K_V1``, 232 for ``IMAGENET1K_V2``, crop 224, bilinear).
* timm rows: ``timm.models.get_pretrained_cfg("<arch>.<tag>")`` (Hugging Face repo, GitHub release
  file, input/test sizes, crop, interpolation). Their accuracies are timm's own published numbers,
  ``results/results-imagenet.csv`` of huggingface/pytorch-image-models (commit 0173a139), measured at
  the test size and test crop.

Tags follow timm's names: ``tv_in1k`` is torchvision's ``IMAGENET1K_V1``, ``tv2_in1k`` its
``IMAGENET1K_V2``; timm re-hosts both, bit-identical in tensors, as ``timm/<arch>.tv_in1k`` /
``.tv2_in1k`` on the Hugging Face hub, which is recorded as a second place (``hf_repo``) to find them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.hub's convention (``check_hash=True``): ``<name>-<first 8+ hex digits of the SHA-256>.<ext>``.
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")

_TV_URL = "https://download.pytorch.org/models/"
_HF_URL = "https://huggingface.co/"
_TIMM_CSV = "timm results-imagenet.csv"
_TORCHVISION = "torchvision"


def hash_prefix_of(filename: str) -> Optional[str]:
    """The SHA-256 prefix a torch-hub style file name carries (``resnet18-f37072fd.pth`` -> ``f37072fd``)."""
    m = HASH_IN_NAME.search(filename)
    return m.group(1) if m else None


@dataclass(frozen=True)
class WeightsEntry:
    """One set of published ImageNet weights.

    ``source`` is ``"torchvision"`` (file ``filename`` in torch hub's ``checkpoints/``) or ``"timm"``
    (Hugging Face repo ``hf_repo``, file ``filename`` in a snapshot). Sizes are ``(C, H, W)``;
    ``input_size``/``crop_pct`` are the default (timm: training) resolution, ``test_*`` the one the
    publisher evaluates at when it differs. ``top1``/``top5`` are percentages on ImageNet-1k val as
    published by ``metrics_by``.
    """

    arch: str
    tag: str
    source: str
    filename: str
    hf_repo: Optional[str] = None
    input_size: Tuple[int, int, int] = (3, 224, 224)
    test_input_size: Optional[Tuple[int, int, int]] = None
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    top1: Optional[float] = None
    top5: Optional[float] = None
    metrics_by: Optional[str] = None
    test_crop_pct: Optional[float] = None
    tv_weights: Optional[str] = None  # torchvision's enum member, e.g. "IMAGENET1K_V2"
    url: Optional[str] = None
    legacy_filename: Optional[str] = None  # timm's GitHub release file, cached under torch hub by timm < 0.9
    hf_filename: str = "model.safetensors"
    sha256: Optional[str] = None  # the full digest, where known
    license: Optional[str] = None

    @property
    def name(self) -> str:
        """timm-style ``<arch>.<tag>``, e.g. ``resnet50.tv2_in1k``."""
        return f"{self.arch}.{self.tag}"

    @property
    def label(self) -> str:
        """A human name: ``ResNet50_Weights.IMAGENET1K_V2`` for torchvision, ``timm resnet50.a1_in1k``."""
        if self.tv_weights:
            return f"ResNet{self.arch[len('resnet'):]}_Weights.{self.tv_weights}"
        return f"{self.source} {self.name}"

    @property
    def file_names(self) -> Tuple[str, ...]:
        """Every file name this checkpoint is published under (hash-carrying ones first)."""
        names = [self.filename] + ([self.legacy_filename] if self.legacy_filename else [])
        return tuple(names)

    @property
    def hash_prefixes(self) -> Dict[str, str]:
        """``{file name: sha256 prefix}`` for the published names that carry one."""
        return {n: p for n in self.file_names if (p := hash_prefix_of(n))}

    @property
    def eval_size(self) -> int:
        """Image side the published accuracy was measured at."""
        return (self.test_input_size or self.input_size)[-1]

    @property
    def eval_crop_pct(self) -> float:
        """Centre-crop fraction of the published evaluation (resize to ``eval_size / eval_crop_pct``)."""
        return self.test_crop_pct if self.test_crop_pct is not None else self.crop_pct

    def pretrained_cfg(self) -> dict:
        """The data-side config these weights expect (timm's ``pretrained_cfg`` keys)."""
        cfg = {
            "tag": self.tag,
            "source": self.source,
            "input_size": self.input_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "num_classes": self.num_classes,
        }
        if self.test_input_size:
            cfg["test_input_size"] = self.test_input_size
        if self.test_crop_pct is not None:
            cfg["test_crop_pct"] = self.test_crop_pct
        return cfg


def _tv(arch: str, version: int, filename: str, resize: int, top1: float, top5: float) -> WeightsEntry:
    """A torchvision row; timm re-hosts the same tensors as ``timm/<arch>.tv[2]_in1k``."""
    tag = "tv_in1k" if version == 1 else f"tv{version}_in1k"
    return WeightsEntry(
        arch, tag, _TORCHVISION, filename, hf_repo=f"timm/{arch}.{tag}", crop_pct=224 / resize,
        top1=top1, top5=top5, metrics_by=_TORCHVISION, tv_weights=f"IMAGENET1K_V{version}",
        url=_TV_URL + filename, license="bsd-3-clause",
    )


def _timm(arch: str, tag: str, release: str, top1: float, top5: float, *, input_side: int = 224,
          test_side: int = 288, crop_pct: float = 0.95) -> WeightsEntry:
    """A timm "ResNet strikes back" row (arXiv:2110.00476): bicubic, evaluated with crop 1.0."""
    return WeightsEntry(
        arch, tag, "timm", "model.safetensors", hf_repo=f"timm/{arch}.{tag}",
        input_size=(3, input_side, input_side), test_input_size=(3, test_side, test_side), crop_pct=crop_pct,
        interpolation="bicubic", top1=top1, top5=top5, metrics_by=_TIMM_CSV, test_crop_pct=1.0,
        url=f"{_HF_URL}timm/{arch}.{tag}", legacy_filename=release, license="apache-2.0",
    )


WEIGHTS: Tuple[WeightsEntry, ...] = (
    _tv("resnet18", 1, "resnet18-f37072fd.pth", 256, 69.758, 89.078),
    _tv("resnet34", 1, "resnet34-b627a593.pth", 256, 73.314, 91.42),
    _tv("resnet50", 1, "resnet50-0676ba61.pth", 256, 76.13, 92.862),
    _tv("resnet50", 2, "resnet50-11ad3fa6.pth", 232, 80.858, 95.434),
    _tv("resnet101", 1, "resnet101-63fe2227.pth", 256, 77.374, 93.546),
    _tv("resnet101", 2, "resnet101-cd907fc2.pth", 232, 81.886, 95.78),
    _tv("resnet152", 1, "resnet152-394f9c45.pth", 256, 78.312, 94.046),
    _tv("resnet152", 2, "resnet152-f82ba261.pth", 232, 82.284, 96.002),
    _timm("resnet18", "a1_in1k", "resnet18_a1_0-d63eafa0.pth", 73.158, 91.026),
    _timm("resnet34", "a1_in1k", "resnet34_a1_0-46f8f793.pth", 77.918, 93.766),
    _timm("resnet50", "a1_in1k", "resnet50_a1_0-14fe96d1.pth", 81.214, 95.102),
    _timm("resnet101", "a1_in1k", "resnet101_a1_0-cdcb52a9.pth", 82.322, 95.632),
    _timm("resnet152", "a1_in1k", "resnet152_a1_0-2eee8a7a.pth", 82.732, 95.720),
    # "a1h": the a1 recipe tuned further; resnet50's was trained at 176 and is evaluated at 224.
    _timm("resnet50", "a1h_in1k", "resnet50_a1h2_176-001a1197.pth", 80.676, 95.306,
          input_side=176, test_side=224, crop_pct=0.9),
    _timm("resnet101", "a1h_in1k", "resnet101_a1h-36d3f2aa.pth", 82.778, 96.310),
    _timm("resnet152", "a1h_in1k", "resnet152_a1h-dc400468.pth", 83.450, 96.538),
)

CATALOGUE: Tuple[WeightsEntry, ...] = WEIGHTS  # the same table under the name the loaders use

# The data config of weights the catalogue does not know (this project's own files without one).
DEFAULT_CFG = WeightsEntry("", "none", "none", "").pretrained_cfg() | {"tag": None, "source": None}

# The order ``pretrained=True`` tries an arch's weights in: torchvision's current default first.
TAG_PRIORITY = {"tv2_in1k": 0, "tv_in1k": 1, "a1_in1k": 2, "a1h_in1k": 3}


def entries_for(arch: str) -> List[WeightsEntry]:
    """Catalogue entries for ``arch``, in the order ``pretrained=True`` tries them."""
    return sorted((e for e in WEIGHTS if e.arch == arch), key=lambda e: TAG_PRIORITY.get(e.tag, 9))


def archs() -> List[str]:
    """Architectures with catalogued weights, shallow to deep."""
    return sorted({e.arch for e in WEIGHTS}, key=lambda a: int(a[len("resnet"):]))


def get_entry(name: str) -> WeightsEntry:
    """The entry called ``<arch>.<tag>`` (``resnet50.tv2_in1k``) or ``<arch>.IMAGENET1K_V2``.

    Raises:
        KeyError: naming the entries that exist for that arch.
    """
    arch, _, tag = name.partition(".")
    for e in WEIGHTS:
        if e.arch == arch and tag in (e.tag, e.tv_weights):
            return e
    known = ", ".join(e.name for e in entries_for(arch)) or f"none (catalogued archs: {', '.join(archs())})"
    raise KeyError(f"no catalogued weights {name!r}; for {arch!r}: {known}")


def entries_by_filename(filename: str) -> List[WeightsEntry]:
    """Entries published under ``filename`` (torchvision's ``resnet50-11ad3fa6.pth``, timm's release files)."""
    return [e for e in WEIGHTS if filename != e.hf_filename and filename in e.file_names]


def entries_by_digest(sha256: str) -> List[WeightsEntry]:
    """Entries whose published file has this SHA-256: the full digest where recorded, else the
    hash prefix of a published file name (8 hex digits: a chance match is 1 in 4 billion)."""
    digest = sha256.lower()
    return [e for e in WEIGHTS if e.sha256 == digest or any(digest.startswith(p) for p in e.hash_prefixes.values())]


def entries_by_hf_repo(repo: str) -> List[WeightsEntry]:
    """Entries stored in the Hugging Face repo ``repo`` (``timm/resnet50.a1_in1k``)."""
    return [e for e in WEIGHTS if e.hf_repo == repo]


__all__ = [
    "CATALOGUE", "DEFAULT_CFG", "HASH_IN_NAME", "IMAGENET_MEAN", "IMAGENET_STD", "TAG_PRIORITY", "WEIGHTS", "WeightsEntry", "archs",
    "entries_by_digest", "entries_by_filename", "entries_by_hf_repo", "entries_for", "get_entry",
    "hash_prefix_of",
]
