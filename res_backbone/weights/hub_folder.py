"""A timm hub folder (``config.json`` + ``model.safetensors``) read as ``pretrained=``: the weights file and the data
config its ``config.json`` gives. Writing one: :mod:`.hub`. Nothing here imports the model registry, so the
offline lookup (:mod:`.cache`) can use it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"
# timm pretrained_cfg fields that describe the weights' data (source/file fields are the reader's business)
CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
            "first_conv", "classifier", "test_input_size", "test_crop_pct", "license", "paper_ids")


def is_hub_source(pretrained: object) -> bool:
    """``True`` for a folder holding ``config.json`` or an ``hf-hub:USER/REPO`` string."""
    if isinstance(pretrained, str) and pretrained.startswith("hf-hub:"):
        return True
    return isinstance(pretrained, (str, os.PathLike)) and (Path(pretrained).expanduser() / HUB_CONFIG).is_file()


def read_hub_folder(source: PathLike, hf_snapshot_paths: Optional[Callable[[str, str], List[Path]]] = None
                    ) -> Tuple[Path, dict, dict]:
    """``(weights file, pretrained_cfg, config)`` of a timm hub folder or ``hf-hub:USER/REPO``.

    Args:
        source: the folder, or ``hf-hub:USER/REPO`` looked up (nothing is downloaded) with ``hf_snapshot_paths``
            (:func:`.cache.hf_snapshot_paths`, passed in by the offline lookup that calls this).

    Raises:
        FileNotFoundError: no ``config.json`` or no weights file (naming the places searched).
    """
    text = os.fspath(source)
    if text.startswith("hf-hub:"):
        if hf_snapshot_paths is None:
            raise ValueError(f"{text}: pass hf_snapshot_paths (res_backbone.weights.cache) to look it up")
        repo = text[len("hf-hub:"):].split("@")[0]
        found = [p.parent for p in hf_snapshot_paths(repo, HUB_CONFIG) if p.is_file()]
        if not found:
            searched = ", ".join(map(str, hf_snapshot_paths(repo, HUB_CONFIG)))
            raise FileNotFoundError(f"{text}: no {HUB_CONFIG} of {repo} in the Hugging Face cache ({searched}); "
                                    "nothing is downloaded")
        folder = found[0]
    else:
        folder = Path(text).expanduser()
    config_file = folder / HUB_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {HUB_CONFIG}; not a timm hub folder")
    config = json.loads(config_file.read_text())
    weights = [folder / n for n in (HUB_WEIGHTS, "pytorch_model.bin", "open_clip_pytorch_model.bin")]
    found_w = [p for p in weights if p.is_file()]
    if not found_w:
        raise FileNotFoundError(f"{folder}: a {HUB_CONFIG} but no weights ({', '.join(p.name for p in weights)})")
    cfg = dict(config.get("pretrained_cfg") or {k: v for k, v in config.items() if k in CFG_KEYS})
    if "num_classes" in config:
        cfg["num_classes"] = config["num_classes"]
    cfg.update(source="timm-hub", architecture=config.get("architecture"))
    return found_w[0], cfg, config
