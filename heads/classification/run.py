"""A classification run from its configuration: data, model, ``config.yaml`` (every resolved option), then
:func:`~.train.fit` (the shared runner)."""
from __future__ import annotations

from pathlib import Path

import torch

from res_backbone.engine.config import dump_yaml
from res_backbone.data.preflight import finish_report, preflight
from res_backbone.engine.runner import resolve_resume, seed_everything

from .train import ClsTrainConfig, _plain, build_model, fit, load_data, make_loaders

__all__ = ["run"]


def run(cfg: ClsTrainConfig) -> dict:
    """The whole run: data, model, ``config.yaml`` (every resolved option), :func:`fit`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg)
    folders = {k: ds for k, ds in (("train", data.train), ("val", data.val)) if hasattr(ds, "image_files")}
    checked = preflight(folders, mode=cfg.check_images, policy=cfg.on_bad_image, output=cfg.output,
                        progress=cfg.progress)  # every bad image at once, before training
    cfg = cfg.resolved(data)
    seed_everything(cfg.seed, cfg.deterministic)
    resuming = resolve_resume(cfg.resume, cfg.output) is not None
    model = build_model(cfg, data, load_pretrained=not resuming)  # resumed weights replace them anyway
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(_plain(cfg), out / "config.yaml")
    loaders = make_loaders(cfg, data)
    try:
        return fit(model, data, loaders, cfg)
    finally:
        finish_report(checked, cfg.output)  # + the faults met mid-run
