"""Shared training machinery: checkpoints, distributed helpers, logging, optimisation, loops."""
from .checkpoint import atomic_save, find_resume_checkpoint, load_checkpoint, rotate_and_save
from .distributed import DistInfo, init_distributed
from .logger import RunLogger
from .optim import build_optimizer, lr_factor, set_lr

__all__ = [
    "DistInfo", "RunLogger", "atomic_save", "build_optimizer", "find_resume_checkpoint", "init_distributed",
    "load_checkpoint", "lr_factor", "rotate_and_save", "set_lr",
]
