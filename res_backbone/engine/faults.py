"""Fault injection for the reliability tests: inert unless ``RB_FAULT_INJECT`` is set.

The training loops call :func:`fault_point` at a few named places. With the environment variable
``RB_FAULT_INJECT="point:iterations[:action]"`` the call whose point and iteration match performs the
action on the calling process; without it (every real run) the call is one dictionary lookup.

Points (``iteration`` = iterations completed when the point is reached):

* ``batch`` - a training batch has been loaded, before its forward pass;
* ``step`` - inside the optimiser step, after ``backward()`` and before the update;
* ``eval`` - evaluation has started (the first validation batch is about to be read);
* ``save`` - a checkpoint's bytes are written to its temporary file, not yet renamed into place.

``iterations`` is ``N`` or ``A-B`` (inclusive). Actions: ``TERM`` (default) and ``INT`` send that signal
to this process, what a scheduler or Ctrl-C would; ``KILL`` sends SIGKILL (a crash: nothing runs after it);
``RAISE`` raises :class:`InjectedFault` (a ``RuntimeError``: an unexpected exception, e.g. a bug, mid-step).

    RB_FAULT_INJECT=step:3:INT python tools/train_det.py ...    # Ctrl-C in the middle of iteration 4
"""
from __future__ import annotations

import os
import signal
from typing import Optional, Tuple

ENV = "RB_FAULT_INJECT"
POINTS = ("batch", "step", "eval", "save")
ACTIONS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL, "RAISE": None}


class InjectedFault(RuntimeError):
    """The ``RAISE`` action's exception."""

_parsed: Tuple[Optional[str], Optional[tuple]] = (None, None)


def parse(spec: str) -> Tuple[str, int, int, str]:
    """``"point:A[-B][:action]"`` -> ``(point, A, B, action)``.

    Raises:
        ValueError: naming the variable, the bad value and what is accepted.
    """
    parts = spec.strip().split(":")
    try:
        point, iters = parts[0], parts[1]
        action = parts[2].upper() if len(parts) > 2 else "TERM"
        first, _, last = iters.partition("-")
        a, b = int(first), int(last or first)
    except (IndexError, ValueError):
        a = b = -1
        point = action = ""
    if point not in POINTS or action not in ACTIONS or a < 0 or b < a or len(parts) > 3:
        raise ValueError(f"{ENV}={spec!r}: expected 'point:N[-M][:action]' with point one of {POINTS} "
                         f"and action one of {sorted(ACTIONS)}")
    return point, a, b, action


def fault_point(name: str, iteration: Optional[int]) -> None:
    """Perform the injected fault if ``RB_FAULT_INJECT`` names this point and iteration (else nothing)."""
    global _parsed
    spec = os.environ.get(ENV)
    if not spec or iteration is None:
        return
    if _parsed[0] != spec:
        _parsed = (spec, parse(spec))
    point, first, last, action = _parsed[1]
    if point == name and first <= iteration <= last:
        if action == "RAISE":
            raise InjectedFault(f"{ENV}: injected exception at {name}, iteration {iteration}")
        os.kill(os.getpid(), ACTIONS[action])
