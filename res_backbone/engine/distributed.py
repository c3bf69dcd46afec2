"""``torch.distributed`` helpers for runs started with ``torchrun`` (one or many processes/machines).

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and picks NCCL on GPUs, gloo on CPUs. Without them everything
here degrades to a single process.

No rank waits forever: collectives time out after ``timeout_s``, and :func:`describe_failure` turns an
exception on one rank into a message naming that rank, published through the process group's store
so that the ranks whose collectives then fail say which rank failed first.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
FAILURE_KEY = "res_backbone/first_failure"


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment, if any.

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, one GPU per local rank).
        timeout_s: collective timeout, so a dead peer ends the others instead of hanging them.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # A key prefix per attempt: when `torchrun --max-restarts` restarts the group, the new ranks
        # must not read the connection addresses the ranks they replace left in the store (seen here:
        # gloo connecting to a dead worker's port, "Connection refused", a restart wasted).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"res_backbone/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, local_rank, world, backend)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; the input is left alone)."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def _store():
    try:  # the default group's key-value store (a private accessor, hence the guard)
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def first_failure() -> Optional[str]:
    """The failure a rank published with :func:`describe_failure`, if any (None when unreachable)."""
    store = _store() if dist.is_initialized() else None
    try:
        return store.get(FAILURE_KEY).decode() if store is not None and store.check([FAILURE_KEY]) else None
    except Exception:  # the store lived in a process that is gone
        return None


_PEER_LOSS = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout")


def describe_failure(exc: BaseException) -> str:
    """A one-line account of ``exc`` on this rank for a multi-process run.

    * another rank already published a failure (its exit broke this rank's collectives): the message
      names that rank and its error;
    * a collective failed (peer connection lost, timeout) and nobody published anything: a peer was
      killed or hangs; the message says so;
    * anything else: this rank failed first; the failure is published to the others (first one wins).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    text = str(exc).strip().splitlines()
    own = f"{type(exc).__name__}: {text[0] if text else ''}"
    who = f"rank {rank} of {world} (pid {os.getpid()} on {socket.gethostname()})"
    earlier = first_failure()
    if earlier is not None and not earlier.startswith(f"rank {rank} "):
        return f"rank {rank} of {world} stopped because {earlier} (here: {own})"
    if isinstance(exc, getattr(dist, "DistError", ())) or any(k in own.lower() for k in _PEER_LOSS):
        return (f"{who} stopped: a collective failed and no rank reported an error, so a peer rank was "
                f"probably killed or hangs ({own})")
    msg = f"{who} failed: {own}"
    store = _store() if dist.is_initialized() else None
    if store is not None:
        try:
            store.compare_set(FAILURE_KEY, "", msg)
        except Exception:
            pass
    return msg


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
