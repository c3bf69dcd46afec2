"""What the training tools share at their boundary: the run fields with one default each, the argparse
groups of the run / optimisation flags, and the exit codes.

One default per shared field (the three train tools used to differ for no stated reason):

* ``device = "auto"``: cuda when torch sees a GPU, else cpu (resolved once, by :func:`parse_args`, so
  ``config.yaml`` and the checkpoints record the device actually used). Classification had ``auto``;
  detection and localization defaulted to ``cpu``, which left a GPU idle unless asked.
* ``checkpoint_every = 200`` iterations (detection and localization had 200, classification 1000): at
  most 200 iterations are lost to a hard kill, for a write of a few MB on the models trained here.
* ``log_every = 20`` iterations (detection and localization had 20, classification 50).
* ``num_pictures = 8`` val images drawn into ``predictions/`` (detection had 8, localization 16): eight
  pictures show the failure modes; more cost evaluation time at every run's end.

The YAML configs in ``configs/`` that relied on an old default now set it explicitly, so each of them
runs exactly as before.

Exit codes of every train and eval tool (:func:`run_tool`): 0 done, 1 unexpected error (traceback
logged), 2 bad arguments or input, 3 non-finite losses, 143 stopped by SIGTERM/SIGINT after a checkpoint.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from . import config as cfgmod
from .checkpoint import CorruptCheckpointError
from .config import opt_float, opt_int
from .runner import EXIT_PREEMPTED, Preempted
from .optim_step import NonFiniteLossError

__all__ = ["DEFAULTS", "EXIT_BAD_INPUT", "EXIT_DONE", "EXIT_NON_FINITE", "EXIT_PREEMPTED", "EXIT_UNEXPECTED",
           "BadInput", "FineTuneConfig", "RunConfig", "SplitData", "add_finetune_args", "add_image_check_args", "add_model_args", "add_optimisation_args", "add_run_args", "parse_args", "resolve_device", "run_tool", "tool_main", "train_parser"]

EXIT_DONE, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_NON_FINITE = 0, 1, 2, 3

# The shared run fields' one default each (see the module docstring for why).
DEFAULTS = {"device": "auto", "checkpoint_every": 200, "log_every": 20, "num_pictures": 8, "eval_every": 1,
            "seed": 0, "amp": "none"}


@dataclass
class RunConfig:
    """The fields every training run has (the tools' run flags); a task's config adds its own and may
    change ``output``."""

    output: str = "runs/run"
    resume: Optional[str] = None
    seed: int = DEFAULTS["seed"]
    deterministic: bool = False
    device: str = DEFAULTS["device"]
    amp: str = DEFAULTS["amp"]
    channels_last: bool = False
    checkpoint_every: int = DEFAULTS["checkpoint_every"]
    eval_every: int = DEFAULTS["eval_every"]
    log_every: int = DEFAULTS["log_every"]
    progress: bool = True
    check_images: str = "header"  # the pre-flight check of every image (res_backbone.data.preflight)
    on_bad_image: str = "error"  # error: exit 2 before training; skip: leave bad images out


@dataclass
class FineTuneConfig(RunConfig):
    """A run that puts a backbone (pre-trained or not) under a new task head: detection, localization."""

    pretrained: Optional[str] = None
    backbone_lr_mult: float = 1.0
    freeze_backbone_iters: int = 0
    num_pictures: int = DEFAULTS["num_pictures"]
    transfer: Dict = field(default_factory=dict)  # weights, input channels, mean/std, BN policy (transfer.describe_transfer)


@dataclass
class SplitData:
    """A run's two splits and their loaders (a task's data adds its class list and more)."""

    train_set: Any
    val_set: Any
    train_loader: Any
    val_loader: Any
    train_sampler: Any


class BadInput(ValueError):
    """Bad arguments or input found after parsing (exit code 2); the message says what to change."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``/``cuda`` unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def train_parser(doc: str, config_example: str) -> argparse.ArgumentParser:
    """A training tool's parser: its docstring as the description, and ``--config`` (YAML defaults)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of option: value defaults (keys = long options with '_'), e.g. "
                                    f"{config_example} or a run's config.yaml")
    return p


def add_model_args(p: argparse.ArgumentParser, *, backbone: Optional[str], backbone_note: str = "",
                   pretrained_note: str = "") -> argparse._ArgumentGroup:
    """The ``model`` group with --backbone (any registered name) and --pretrained; a tool adds its own flags.
    ``backbone`` is the default; ``backbone_note`` replaces its description (e.g. when None means "decided later")."""
    from .. import list_models

    names = list_models()
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=backbone, choices=names, metavar="NAME",
                   help=f"registered model: {', '.join(names)} (default {backbone_note or backbone})")
    g.add_argument("--pretrained", default=None,
                   help="initial backbone weights: 'auto' (local torchvision/timm caches), a tag (tv_in1k, tv2_in1k, "
                        "a1_in1k), a path (an ImageNet file, a timm hub folder or a train_cls.py checkpoint; grey "
                        "ones are adapted to RGB), hf-hub:USER/REPO (from the local cache), or none (from scratch, "
                        f"the default){pretrained_note}")
    return g


def add_finetune_args(p: argparse.ArgumentParser, *, frozen_default: str, frozen_what: str = "backbone"
                      ) -> argparse._ArgumentGroup:
    """The ``fine-tuning`` group (``res_backbone/transfer.py``): --frozen-stages --bn-policy
    --freeze-backbone-iters --backbone-lr-mult. ``frozen_default`` ends --frozen-stages' help; ``frozen_what``
    names what --freeze-backbone-iters holds."""
    f = p.add_argument_group("fine-tuning (with --pretrained; see res_backbone/transfer.py)")
    f.add_argument("--frozen-stages", type=opt_int, default=None,
                   help=f"never train stem..stage k (1 = stem, 2 = +res2, ... 5 = all); default {frozen_default}")
    f.add_argument("--bn-policy", default=None, choices=("frozen", "norm_eval", "trainable"),
                   help="backbone BatchNorm: frozen (FrozenBatchNorm: statistics and affine fixed), norm_eval "
                        "(statistics fixed, affine trained), trainable; default frozen with --pretrained and fewer "
                        "than 16 images per batch, else trainable")
    f.add_argument("--freeze-backbone-iters", type=int, default=0,
                   help=f"keep the pretrained {frozen_what} frozen, BN statistics included, for the first N "
                        "iterations, then train it")
    f.add_argument("--backbone-lr-mult", type=float, default=1.0, help="backbone learning rate = lr x this (default 1)")
    return f


def add_run_args(p: argparse.ArgumentParser, *, output: str, resume_help: str, checkpoint_help: str,
                 pictures_help: Optional[str] = None) -> argparse._ArgumentGroup:
    """The ``run`` group: --output --resume --checkpoint-every --eval-every --log-every [--num-pictures]
    --no-progress."""
    r = p.add_argument_group("run")
    r.add_argument("--output", default=output, help="run folder for checkpoints, logs, metrics and pictures")
    r.add_argument("--resume", default=None, help=resume_help)
    r.add_argument("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"], help=checkpoint_help)
    r.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"],
                   help="evaluate every N epochs, and always at the end")
    r.add_argument("--log-every", type=int, default=DEFAULTS["log_every"],
                   help=f"log training losses every N iterations (default {DEFAULTS['log_every']})")
    if pictures_help is not None:
        r.add_argument("--num-pictures", type=int, default=DEFAULTS["num_pictures"], help=pictures_help)
    r.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    add_image_check_args(r)
    return r


def add_image_check_args(g, training: bool = True) -> None:
    """--check-images and --on-bad-image (:mod:`res_backbone.data.preflight`), in the group ``g``; ``training``
    False words them for an evaluation tool."""
    g.add_argument("--check-images", default="header", choices=("header", "full", "none"),
                   help="before the first step, check every image the data lists: header (exists, header decodes, "
                        "size matches the json's width/height, a JPEG/PNG is not cut short; the default), full "
                        "(decode every pixel), none. Results are cached in the output folder (preflight_cache.json)")
    during = ("exit 2 before training; a fault mid-run writes a checkpoint and exits 2. skip: leave bad images "
              "out (counted in the log and bad_images.json); a fault mid-run takes the next image instead"
              if training else "exit 2 before evaluating. skip: evaluate without them (metrics.json counts them; in COCO "
                                "metrics their objects count as missed)")
    g.add_argument("--on-bad-image", default="error", choices=("error", "skip"),
                   help=f"error (default): list every bad image in bad_images.json and {during}")


def add_optimisation_args(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr, lr_help: str,
                          optimizer: str, weight_decay: float, schedule: str, milestones: Sequence[float],
                          warmup_iters: int, time_budget: bool = True, help: Optional[dict] = None,
                          ) -> argparse._ArgumentGroup:
    """The ``optimisation`` group with a task's recipe as defaults: --epochs --max-iters [--time-budget]
    --batch-size --lr --optimizer --momentum --weight-decay --schedule --milestones --warmup-iters
    --grad-clip --amp --channels-last --seed --deterministic --device. ``help`` overrides a flag's help
    (key = dest)."""
    h = {"epochs": f"passes over the training split (default {epochs})",
         "batch_size": f"images per iteration (default {batch_size})",
         "optimizer": f"sgd with momentum or adamw (decoupled weight decay) (default {optimizer})",
         "weight_decay": f"weight decay, not applied to norms and biases (default {weight_decay:g})",
         "schedule": f"decay after warmup, per iteration: step (x0.1 at each --milestones), cosine to 0, or "
                     f"constant (default {schedule})",
         "milestones": "step schedule: x0.1 at these fractions of the run (or absolute iterations if >= 1)",
         "warmup_iters": f"linear warmup from lr/1000 over this many iterations (default {warmup_iters})",
         "amp": "mixed precision: bf16 (CPUs with AVX512-BF16/AMX, recent GPUs) or fp16 (CUDA, with a grad scaler)",
         "channels_last": "channels-last memory format for the model and batches (faster convs on CPU and tensor "
                          "cores)",
         "seed": "seed of the data (built-in sets), data order, augmentation and initialisation",
         "deterministic": "deterministic algorithms (bit-exact resumes)",
         "device": "auto (cuda when available, the default), cpu, or cuda (one GPU per torchrun process)",
         **(help or {})}
    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, default=epochs, help=h["epochs"])
    t.add_argument("--max-iters", type=opt_int, default=None, help="stop after this many iterations (overrides --epochs)")
    if time_budget:
        t.add_argument("--time-budget", type=opt_float, default=None, metavar="MIN",
                       help="minutes of training (evaluation not counted): after 30 iterations the speed measured so "
                            "far sets the number of iterations, and the schedule runs over them; --max-iters/--epochs "
                            "cap it")
    t.add_argument("--batch-size", type=int, default=batch_size, help=h["batch_size"])
    t.add_argument("--lr", type=opt_float, default=lr, help=lr_help)
    t.add_argument("--optimizer", default=optimizer, choices=("sgd", "adamw"), help=h["optimizer"])
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, default=weight_decay, help=h["weight_decay"])
    t.add_argument("--schedule", default=schedule, choices=("step", "cosine", "constant"), help=h["schedule"])
    t.add_argument("--milestones", type=float, nargs="+", default=list(milestones), help=h["milestones"])
    t.add_argument("--warmup-iters", type=int, default=warmup_iters, help=h["warmup_iters"])
    t.add_argument("--grad-clip", type=opt_float, default=None, help="clip the gradient norm to this value")
    t.add_argument("--amp", default=DEFAULTS["amp"], choices=("none", "bf16", "fp16"), help=h["amp"])
    t.add_argument("--channels-last", action="store_true", help=h["channels_last"])
    t.add_argument("--seed", type=int, default=DEFAULTS["seed"], help=h["seed"])
    t.add_argument("--deterministic", action="store_true", help=h["deterministic"])
    t.add_argument("--device", default=DEFAULTS["device"], choices=("auto", "cpu", "cuda"), help=h["device"])
    return t


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Flags over ``--config`` YAML defaults (:func:`~.config.parse_with_config`; a bad file exits 2 through
    ``parser.error``), with ``device`` resolved (:func:`resolve_device`)."""
    try:
        args = cfgmod.parse_with_config(parser, argv)
    except cfgmod.ConfigError as e:
        parser.error(str(e))
    if getattr(args, "device", None) is not None:
        args.device = resolve_device(args.device)
    return args


def _bad_input_types() -> tuple:
    from ..weights.files import CheckpointMismatchError

    # OSError: missing files, undecodable images (FashionMNISTNotFoundError, PretrainedNotFoundError included)
    return (OSError, ValueError, CheckpointMismatchError, CorruptCheckpointError)


def tool_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], log: logging.Logger,
              argv=None) -> int:
    """A tool's ``main``: logging to stderr with times, the flags parsed, then ``body(args)`` under
    :func:`run_tool` (its exit codes)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parser.parse_args(argv)
    return run_tool(lambda: body(args), log)


def run_tool(body: Callable[[], int], log: logging.Logger, *, on_exit: Optional[Callable[[], None]] = None,
             describe: Optional[Callable[[BaseException], str]] = None, reraise: bool = False) -> int:
    """Run a tool's ``body`` and map how it ended to the exit code (module docstring).

    Args:
        body: does the work; returns the exit code itself (0, or 2 after its own message), or raises.
        log: where the messages go.
        on_exit: called after every expected ending (done, preempted, non-finite, bad input), e.g. the
            ``torch.distributed`` clean-up; not after an unexpected error, where a broken process group
            could hang in it.
        describe: turns an unexpected exception into its message (default ``str``).
        reraise: let an unexpected exception propagate (the interpreter prints it and exits 1) instead of
            logging it and returning 1.
    """
    def done(code: int) -> int:
        if on_exit is not None:
            on_exit()
        return code

    try:
        return done(body())
    except Preempted as e:
        log.warning("%s", e)
        return done(EXIT_PREEMPTED)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return done(EXIT_NON_FINITE)
    except _bad_input_types() as e:
        # DataLoader workers re-raise a worker's error with its traceback in the message: the last line
        # names the file.
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        log.error("%s", lines[-1] if len(lines) > 1 and "Traceback" in str(e) else str(e))
        return done(EXIT_BAD_INPUT)
    except Exception as e:
        if reraise:
            raise
        log.exception("%s", describe(e) if describe is not None else e)
        return EXIT_UNEXPECTED
