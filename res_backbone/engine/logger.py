"""Run logs: one JSON object per line in ``log.jsonl`` plus TensorBoard scalars, main process only."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


class RunLogger:
    """Append-only JSONL log (flushed per line, so nothing is lost on a crash) and TensorBoard events.

    Args:
        output_dir: the run folder; writes ``log.jsonl`` and ``tb/``.
        enabled: False on non-main ranks (every call is then a no-op).
        tensorboard: also write TensorBoard events.
    """

    def __init__(self, output_dir, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency, but logging must never stop training
                self._tb = None

    def log(self, record: Dict[str, Any], step: Optional[int] = None, prefix: str = "") -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3)}
        if step is not None:
            rec["iteration"] = step
        rec.update({k: _plain(v) for k, v in record.items()})
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None and step is not None:
            for k, v in rec.items():
                if k not in ("time", "iteration") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
