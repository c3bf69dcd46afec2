"""From pretrained weights to a fine-tuning setup: input channels, normalisation, BN policy, freezing.

One pipeline serves every pretrained source (a ``tools/train_cls.py`` checkpoint, an ImageNet file
from torchvision or timm) and every task tool (``tools/train_det.py``, ``tools/train_loc.py``):

* **input channels** - a net pre-trained on grey images (``in_chans=1``, e.g. Fashion-MNIST) gets
  RGB input in the task. Its first conv ``w`` (``(O, 1, k, k)``) becomes ``w / 3`` repeated over the
  three channels (:func:`~res_backbone.weights.load.adapt_input_conv`), and the RGB input is
  normalised per channel with the grey statistics repeated (:func:`input_stats`). A grey image
  ``r = g = b = g0`` then gives exactly the response the net learnt, ``sum_c (w / 3) * norm(g0) =
  w * norm(g0)``, so the BatchNorm statistics stored with the weights stay valid. (Repeating ``w``
  without the ``1/3`` would triple every activation of the stem; summing belongs to the opposite
  direction, RGB weights fed grey input, which :func:`~res_backbone.weights.load.adapt_input_conv`
  also implements.)
* **normalisation** - mean/std come from the weights' ``pretrained_cfg`` (the catalogue's for
  ImageNet files, the checkpoint's own for this project's), never from the task's data.
* **BN policy** (:data:`BN_POLICIES`):

  ====================  ===========================================================================
  ``frozen``            ``FrozenBatchNorm2d``: statistics and affine parameters are constants
  ``norm_eval``         ``BatchNorm2d`` kept in eval mode: statistics fixed, affine parameters train
  ``trainable``         ``BatchNorm2d`` as usual: batch statistics, running averages, affine trained
  ====================  ===========================================================================

  The default follows from the weights (:func:`default_bn_policy`): from scratch BN must learn its
  statistics (``trainable``); with pretrained weights and small batches (< 16 images, the detection
  regime) the stored statistics are better estimates than a few images give (``frozen``, as
  detectron2 and torchvision's detection models do); with larger batches ``trainable``.
* **freezing** - ``frozen_stages`` (stem..stage k never train, :meth:`~res_backbone.resnet.ResNet.freeze`)
  and :class:`BackboneFreeze` (the whole pretrained backbone frozen for the first N iterations, BN
  statistics included, then released). The backbone's learning rate multiplier is applied by
  :func:`~res_backbone.engine.optim.build_optimizer`.

"Backbone" means ``model.backbone`` without its FPN (``backbone.fpn``): the FPN is new, randomly
initialised, and trains from the first iteration at the full learning rate.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .weights.catalogue import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

__all__ = ["BN_POLICIES", "NEW_BACKBONE_PARTS", "BackboneFreeze", "bn_policy_kwargs", "configure_backbone",
           "default_bn_policy", "describe_transfer", "input_stats", "resolve_bn_policy"]

BN_POLICIES = ("frozen", "norm_eval", "trainable")
SMALL_BATCH = 16  # below this many images per step, pretrained BN statistics beat batch statistics
NEW_BACKBONE_PARTS = ("fpn.",)  # parameter prefixes inside model.backbone that pretrained weights never hold


def bn_policy_kwargs(policy: str) -> Dict[str, object]:
    """The backbone keywords (``norm``, ``norm_eval``) of a BN policy.

    Raises:
        ValueError: an unknown policy, naming the valid ones.
    """
    if policy == "frozen":
        return {"norm": "frozen_bn", "norm_eval": False}
    if policy == "norm_eval":
        return {"norm": "bn", "norm_eval": True}
    if policy == "trainable":
        return {"norm": "bn", "norm_eval": False}
    raise ValueError(f"bn_policy must be one of {', '.join(BN_POLICIES)}, got {policy!r}")


def default_bn_policy(pretrained: bool, batch_size: int) -> str:
    """The BN policy when none is asked for: ``trainable`` from scratch; with pretrained weights
    ``frozen`` below :data:`SMALL_BATCH` images per step, else ``trainable``."""
    if not pretrained:
        return "trainable"
    return "frozen" if batch_size < SMALL_BATCH else "trainable"


def resolve_bn_policy(bn_policy: Optional[str], norm: Optional[str], *, pretrained: bool,
                      batch_size: int) -> Tuple[str, str, bool]:
    """Combine ``--bn-policy`` and the older ``--norm`` into ``(policy, norm, norm_eval)``.

    ``norm`` alone keeps its meaning (``frozen_bn`` = frozen, ``bn``/``sync_bn`` = trainable, ``gn``
    = no BN, reported as policy ``"gn"``); ``bn_policy`` alone picks the norm; both must agree
    (``sync_bn`` with ``trainable`` or ``norm_eval``); neither: :func:`default_bn_policy`.

    Raises:
        ValueError: an unknown policy, or a policy that contradicts ``norm`` (naming both).
    """
    if bn_policy is None and norm is None:
        bn_policy = default_bn_policy(pretrained, batch_size)
    if bn_policy is None:
        if norm == "gn":
            return "gn", "gn", False
        return ("frozen" if norm == "frozen_bn" else "trainable"), norm, False
    kw = bn_policy_kwargs(bn_policy)
    if norm is None or norm == kw["norm"]:
        return bn_policy, str(kw["norm"]), bool(kw["norm_eval"])
    if norm == "sync_bn" and bn_policy != "frozen":
        return bn_policy, norm, bool(kw["norm_eval"])
    raise ValueError(f"--bn-policy {bn_policy} needs --norm {kw['norm']} (or no --norm), got --norm {norm}; "
                     "GroupNorm (--norm gn) has no BatchNorm policy")


def input_stats(pretrained_cfg: Optional[dict], in_chans: int = 3) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std for ``in_chans`` input from a weights' ``pretrained_cfg``.

    Grey statistics (one value) are repeated for RGB, the counterpart of the ``w / 3`` first conv
    (module docstring); RGB statistics for grey input are averaged. Without a config: ImageNet's.
    """
    cfg = pretrained_cfg or {}
    mean = [float(m) for m in (cfg.get("mean") or IMAGENET_MEAN)]
    std = [float(s) for s in (cfg.get("std") or IMAGENET_STD)]
    if len(mean) != len(std):
        raise ValueError(f"pretrained_cfg mean {mean} and std {std} have different lengths")
    if len(mean) == in_chans:
        return tuple(mean), tuple(std)
    if len(mean) == 1:
        return tuple(mean * in_chans), tuple(std * in_chans)
    if in_chans == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    raise ValueError(f"cannot map {len(mean)}-channel statistics {mean} to {in_chans} input channels")


def describe_transfer(backbone: nn.Module, *, in_chans: int, bn_policy: str, freeze_backbone_iters: int = 0,
                      backbone_lr_mult: float = 1.0) -> dict:
    """What was decided, as a plain dict (logged by the tools, stored in their JSON and checkpoints).

    Args:
        backbone: a built backbone with ``pretrained_cfg`` (``file`` is set when weights were loaded)
            and ``frozen_stages``.
        in_chans: input channels the task feeds.
        bn_policy, freeze_backbone_iters, backbone_lr_mult: the fine-tuning controls.
    """
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    weights_chans = len(cfg.get("mean") or IMAGENET_MEAN)
    mean, std = input_stats(cfg, in_chans)
    if not cfg.get("file"):
        channels = "from scratch"
    elif weights_chans == in_chans:
        channels = f"{in_chans} -> {in_chans}: first conv loaded as is"
    elif weights_chans == 1:
        channels = f"1 -> {in_chans}: first conv w/{in_chans} repeated per channel, grey mean/std repeated"
    elif in_chans == 1:
        channels = f"{weights_chans} -> 1: first conv summed over channels, mean/std averaged"
    else:
        channels = f"{weights_chans} -> {in_chans}: first conv repeated cyclically and rescaled"
    return {"weights": cfg.get("file"), "weights_source": cfg.get("source"), "channels": channels,
            "mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std], "bn_policy": bn_policy,
            "frozen_stages": int(getattr(backbone, "frozen_stages", 0)),
            "freeze_backbone_iters": int(freeze_backbone_iters), "backbone_lr_mult": float(backbone_lr_mult)}


def configure_backbone(backbone: nn.Module, *, bn_policy: str, norm_eval: bool = False,
                       frozen_stages: Optional[int] = None, freeze_backbone_iters: int = 0,
                       backbone_lr_mult: float = 1.0, in_chans: int = 3) -> dict:
    """Finish a built ResNet backbone for fine-tuning and say what was decided.

    Applies ``frozen_stages`` (None: keep the builder's) and ``norm_eval`` - training-time settings
    that a model rebuilt for evaluation does not need, so tools set them here instead of recording
    them in the keywords that rebuild the model - sets ``pretrained_cfg``'s mean/std to the ones the
    input gets (:func:`input_stats`), logs and returns :func:`describe_transfer`'s dict.
    """
    if frozen_stages:
        backbone.freeze(frozen_stages)
    if norm_eval:
        backbone.norm_eval = True
    backbone.train(backbone.training)
    info = describe_transfer(backbone, in_chans=in_chans, bn_policy=bn_policy,
                             freeze_backbone_iters=freeze_backbone_iters, backbone_lr_mult=backbone_lr_mult)
    backbone.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {}, mean=list(info["mean"]),
                                   std=list(info["std"]))
    log.info("transfer: weights %s; input %s; mean %s std %s; BN %s; frozen stages %d; backbone frozen for %d "
             "iterations; backbone lr x %g", info["weights"] or "none", info["channels"], info["mean"], info["std"],
             info["bn_policy"], info["frozen_stages"], info["freeze_backbone_iters"], info["backbone_lr_mult"])
    return info


def _is_new(name: str, new_parts: Sequence[str]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p) for p in new_parts)


class BackboneFreeze:
    """Keep a pretrained backbone frozen for the first ``iters`` iterations, then release it.

    While frozen, the backbone's trainable parameters (those not frozen by ``frozen_stages``, FPN
    excluded) have ``requires_grad=False`` - they get no gradient, so no optimiser step, weight decay
    or momentum touches them - and its BatchNorm layers run in eval mode (a forward pre-hook, so a
    ``model.train()`` at an epoch start does not undo it): running statistics do not move either.
    On release both are restored and the backbone's own ``train()`` re-applies its BN policy.

    Call :meth:`update` with the number of completed iterations before training (resuming past
    ``iters`` never freezes) and after every iteration; it returns True when the state changed (a
    DistributedDataParallel wrapper must then be rebuilt).

    Args:
        backbone: ``model.backbone``.
        iters: iterations to stay frozen (0: never).
        new_parts: parameter/module prefixes in ``backbone`` that are new layers and always train.
    """

    def __init__(self, backbone: nn.Module, iters: int, new_parts: Sequence[str] = NEW_BACKBONE_PARTS):
        if iters < 0:
            raise ValueError(f"freeze_backbone_iters must be >= 0, got {iters}")
        self.backbone, self.iters = backbone, int(iters)
        self.params: List[nn.Parameter] = [p for n, p in backbone.named_parameters()
                                           if p.requires_grad and not _is_new(n, new_parts)]
        self.norms: List[nn.Module] = [m for n, m in backbone.named_modules()
                                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _is_new(n, new_parts)]
        self.frozen = False
        self._hook = None

    def _hold_norms(self, module: nn.Module, args) -> None:
        if module.training:
            for m in self.norms:
                m.eval()

    def update(self, done: int) -> bool:
        """Freeze while ``done < iters``, release after; True when this call changed the state."""
        want = done < self.iters
        if want == self.frozen:
            return False
        if want:
            for p in self.params:
                p.requires_grad_(False)
            self._hook = self.backbone.register_forward_pre_hook(self._hold_norms)
            log.info("backbone frozen until iteration %d (%d parameter tensors)", self.iters, len(self.params))
        else:
            for p in self.params:
                p.requires_grad_(True)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self.backbone.train(self.backbone.training)
            log.info("backbone released at iteration %d", done)
        self.frozen = want
        return True

