"""Training to a wall-clock budget, evaluated at fixed fractions of it (equal-time comparisons).

:func:`train_for_budget` runs the shared training loop (:func:`~.det_loop.train_one_epoch`, which
drives detectors and, through :class:`~heads.localization.evaluate.LossAdapter`, localizers) until ``budget_s``
seconds of *training* have passed; evaluation pauses the clock. The learning-rate schedule needs
the run's length, which depends on the speed, so it is planned from measurements:

1. the first ``calib_iters`` iterations (after 3 that warm up allocators) give seconds per
   iteration; the plan is ``done + remaining / rate`` iterations, and the schedule runs over them;
2. with a :class:`~res_backbone.transfer.BackboneFreeze` and ``freeze_fraction`` ``q``, the backbone
   is frozen for the first ``q`` of the planned iterations. Frozen iterations are faster (no
   backbone gradients), so the first plan uses the frozen speed for ``q`` of the run and
   ``unfrozen_s_per_iter`` (a hint, e.g. the speed of an unfrozen run of the same model; default
   the frozen speed) for the rest; after the release the speed is measured again and the plan
   re-sized (the freeze window stays where it was);
3. at every evaluation the plan is re-sized from the speed measured so far (machines drift); and
   whatever the plan, training stops when the budget is spent, so every arm of a comparison gets
   the same training time; the final evaluation is at the last iteration done.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .det_loop import train_one_epoch
from .optim import lr_factor, set_lr

log = logging.getLogger(__name__)

__all__ = ["TimeBudgetPlan", "log_plan", "train_for_budget"]

_WARM_ITERS = 3  # the first iterations of a segment pay for allocator and cache warm-up
NO_ITER_CAP = 10**9  # "no cap": a plan sized by the budget alone never reaches this many iterations
NEVER_LOG = 10**9  # a log_every no run reaches: the budget runs keep their own curve, not train/ records


class TimeBudgetPlan:
    """How many iterations a run with a time budget gets, measured as it goes (``train_cls.py`` and
    ``train_loc.py --time-budget MIN``).

    ``max_iters`` is the schedule's length (what the learning-rate decay runs over) and ``stop`` where
    the current pass stops. Without a budget both are ``cap``. With one, the first ``calib_iters``
    iterations run at the cap's schedule; then both are sized to ``done + budget left / seconds per
    iteration`` (the speed measured after :data:`_WARM_ITERS` warm-up iterations of this session)
    and re-sized every ``resize_every`` iterations, since machines drift. ``cap`` stays an upper bound.
    A resumed run keeps the plan it had (``restore``), so its schedule is the interrupted one's.

        plan = TimeBudgetPlan(cap=20000, budget_min=8.0)
        plan.begin(start_iter)                        # after restore(), before training
        ...every iteration: if (r := plan.after_iteration(done, train_seconds)): log r
        ...lr at i: lr_factor(i, max_iters=plan.max_iters, ...); stop at plan.stop
    """

    def __init__(self, cap: int, budget_min: Optional[float], *, calib_iters: int = 30, resize_every: int = 100):
        if budget_min is not None and budget_min <= 0:
            raise ValueError(f"time budget must be > 0 minutes, got {budget_min}")
        if calib_iters < _WARM_ITERS + 1 or resize_every < 1:
            raise ValueError(f"calib_iters must be > {_WARM_ITERS} and resize_every >= 1, got "
                             f"{calib_iters}, {resize_every}")
        self.cap, self.budget_min = int(cap), budget_min
        self.calib_iters, self.resize_every = int(calib_iters), int(resize_every)
        self.max_iters = self.stop = self.cap
        self.sized = budget_min is None
        self._start: Optional[tuple] = None  # (train seconds, iteration) when this session began
        self._mark: Optional[tuple] = None   # the same after the warm-up iterations

    @property
    def saved_max_iters(self) -> Optional[int]:
        """What a checkpoint records (``plan_max_iters``): the sized length, None before sizing."""
        return self.max_iters if self.budget_min is not None and self.sized else None

    def restore(self, plan_max_iters: Optional[int]) -> None:
        """Keep the plan of the run being resumed (sized before it was interrupted)."""
        if self.budget_min is not None and plan_max_iters:
            self.max_iters = self.stop = int(plan_max_iters)
            self.sized = True

    def begin(self, start_iter: int, train_s: float = 0.0) -> None:
        """A training session starts at ``start_iter`` after ``train_s`` seconds of earlier training."""
        self._start, self._mark = (float(train_s), int(start_iter)), None
        if not self.sized:
            self.stop = min(self.cap, int(start_iter) + self.calib_iters)

    def after_iteration(self, done: int, train_s: float) -> Optional[Dict[str, float]]:
        """Record iteration ``done`` ending at ``train_s`` seconds of training; re-plan when due.

        Returns ``{"s_per_iter", "max_iters", "first"}`` when the plan was (re)sized, else None.
        """
        if self._start is None:
            raise RuntimeError("TimeBudgetPlan.begin() was not called")
        if done == self._start[1] + _WARM_ITERS:
            self._mark = (float(train_s), int(done))
        if not self.sized and done >= self.stop:
            return self._size(done, train_s, first=True)
        if self.budget_min is not None and done % self.resize_every == 0 and done < self.max_iters:
            return self._size(done, train_s, first=False)
        return None

    def _size(self, done: int, train_s: float, first: bool) -> Dict[str, float]:
        t_mark, i_mark = self._mark or self._start
        rate = (train_s - t_mark) / max(1, done - i_mark)  # seconds per iteration
        left = max(0.0, self.budget_min * 60.0 - train_s)
        self.max_iters = self.stop = max(done, min(self.cap, done + int(left / max(rate, 1e-9))))
        self.sized = True
        return {"s_per_iter": rate, "max_iters": self.max_iters, "first": first}


def log_plan(sized: Dict[str, float], budget_min: float, done: int, bar=None, logger=None) -> None:
    """Report a (re)sized :class:`TimeBudgetPlan`: a ``time_budget`` event in the run log, the progress
    bar's total, and a log line (info the first time, debug for the periodic re-sizing)."""
    if bar is not None:
        bar.total = int(sized["max_iters"])
        bar.refresh()
    if logger is not None:
        logger.log({"event": "time_budget", "budget_min": budget_min, "s_per_iter": round(sized["s_per_iter"], 4),
                    "max_iters": int(sized["max_iters"])}, step=done)
    (log.info if sized["first"] else log.debug)("time budget %.1f min: %.3f s/iteration -> %d iterations",
                                                budget_min, sized["s_per_iter"], sized["max_iters"])


class _Pause(Exception):
    """Raised between iterations to leave ``train_one_epoch`` (evaluate, re-plan, stop)."""


def train_for_budget(
    runner: nn.Module, loader, sampler, optimizer: torch.optim.Optimizer, *, device: torch.device, budget_s: float,
    lr: float, evaluate: Callable[[int], Dict[str, float]], num_evals: int = 5, warmup_iters: int = 0,
    schedule: str = "cosine", milestones: Sequence[float] = (0.67, 0.89), calib_iters: int = 20,
    freeze=None, freeze_fraction: float = 0.0, unfrozen_s_per_iter: Optional[float] = None,
    max_iters: int = NO_ITER_CAP, amp: str = "none", channels_last: bool = False, grad_clip: Optional[float] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Train ``runner`` for ``budget_s`` seconds of training time; evaluate ``num_evals`` times.

    Args:
        runner: ``runner(images, image_sizes, targets) -> {loss name: tensor}`` in train mode.
        loader: batches ``(images, image_sizes, targets)``; its batch sampler is ``sampler``.
        sampler: has ``set_epoch(e)`` and ``skip(k)`` (:class:`~res_backbone.data.samplers.ResumableBatchSampler`).
        optimizer: built over the model (frozen parameters included, see :func:`~.optim.build_optimizer`).
        budget_s: seconds of training (evaluation excluded).
        lr: base learning rate; the schedule (``schedule``, ``warmup_iters``, ``milestones``) runs
            over the planned iterations.
        evaluate: ``evaluate(iteration) -> metrics``, called when ``k / num_evals`` of the budget
            has passed (k = 1..num_evals; the last one at the final iteration).
        calib_iters: iterations measured before the plan is made (and again after a release).
        freeze: a :class:`~res_backbone.transfer.BackboneFreeze` (its ``iters`` is set here), or None.
        freeze_fraction: share of the planned iterations the backbone stays frozen.
        unfrozen_s_per_iter: expected seconds per unfrozen iteration, for the first plan of a frozen start.
        max_iters: a cap on the plan.
        amp, channels_last, grad_clip: as for :func:`~.det_loop.train_one_epoch`.
        clock: the time source: wall-clock (default), or ``time.process_time`` to measure CPU time on a
            machine that other jobs share (one torch thread: about the wall-clock time of an idle machine).

    Returns:
        ``{"iters", "planned_iters", "train_time_s", "eval_time_s", "s_per_iter", "freeze_iters",
        "curve": [{"iter", "train_time_s", **metrics}, ...]}``.
    """
    if budget_s <= 0 or num_evals < 1 or calib_iters < 1:
        raise ValueError(f"need budget_s > 0, num_evals >= 1 and calib_iters >= 1; got {budget_s}, {num_evals}, "
                         f"{calib_iters}")
    if not 0.0 <= freeze_fraction < 1.0:
        raise ValueError(f"freeze_fraction must be in [0, 1), got {freeze_fraction}")
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise ValueError("the training loader yields no batches")
    frozen_start = freeze is not None and freeze_fraction > 0
    if freeze is not None:
        freeze.iters = max_iters if frozen_start else 0  # the real window is set once the plan is known
        freeze.update(0)
    st = {"it": 0, "trained": 0.0, "seg_start": 0.0, "plan": max_iters, "sized": False, "mark": None,
          "recheck": False, "next_eval": 1, "rate": None, "release": None}
    curve: List[dict] = []
    eval_time = 0.0

    def elapsed() -> float:
        return st["trained"] + clock() - st["seg_start"]

    def due_eval() -> float:
        return budget_s * st["next_eval"] / num_evals

    def rate_since_mark(done: int) -> float:
        t0, i0 = st["mark"]
        return (elapsed() - t0) / max(1, done - i0)

    def plan_first(done: int) -> None:
        r = rate_since_mark(done)
        left = max(0.0, budget_s - elapsed())
        if frozen_start:
            r_u = unfrozen_s_per_iter or r
            # q N frozen iterations at r, (1 - q) N unfrozen at r_u, done of the frozen ones already spent
            n = (left + done * r) / (freeze_fraction * r + (1 - freeze_fraction) * r_u)
            n = max(done, min(max_iters, int(n)))
            freeze.iters = max(done, round(freeze_fraction * n))
            st["recheck"] = True
        else:
            n = max(done, min(max_iters, done + int(left / r)))
        st.update(plan=n, sized=True, rate=r)
        log.info("budget %.0f s: %.3f s/iteration -> %d iterations%s", budget_s, r, n,
                 f" (backbone frozen for {freeze.iters})" if frozen_start else "")

    def replan(done: int) -> None:
        """At an evaluation: re-size the plan from the speed since the last mark (a machine whose speed
        drifts would otherwise end the schedule early or be cut by the budget), unless a frozen phase
        or its re-measurement is still running."""
        if not st["sized"] or st["recheck"] or st["mark"] is None or (freeze is not None and freeze.frozen):
            return
        t0, i0 = st["mark"]
        if done - i0 < calib_iters:
            return
        r = (st["trained"] - t0) / (done - i0)
        st["plan"] = max(done, min(max_iters, done + int(max(0.0, budget_s - st["trained"]) / r)))
        st["rate"] = r

    def on_end(done: int) -> None:
        st["it"] = done
        pause = False
        if freeze is not None and freeze.update(done):  # released: measure the unfrozen speed anew
            st["mark"] = None
            st["release"] = done
            pause = True  # a new segment: train_one_epoch sees the new parameters' requires_grad
        start = st["release"] or 0
        if st["mark"] is None and done >= start + _WARM_ITERS:
            st["mark"] = (elapsed(), done)
        if not st["sized"] and st["mark"] is not None and done >= st["mark"][1] + calib_iters:
            plan_first(done)
            pause = True
        elif st["recheck"] and st["release"] is not None and st["mark"] is not None \
                and done >= st["mark"][1] + calib_iters:
            r = rate_since_mark(done)
            st.update(plan=max(done, min(max_iters, done + int(max(0.0, budget_s - elapsed()) / r))),
                      recheck=False, rate=r)
            log.info("after the release: %.3f s/iteration -> %d iterations", r, st["plan"])
            pause = True
        if pause or elapsed() >= due_eval() or elapsed() >= budget_s or done >= st["plan"]:
            raise _Pause

    def run_eval(done: int) -> None:
        nonlocal eval_time
        t0 = clock()
        metrics = evaluate(done)
        eval_time += clock() - t0
        curve.append({"iter": done, "train_time_s": round(st["trained"], 2), **metrics})

    while True:
        it = st["it"]
        epoch = it // iters_per_epoch
        sampler.set_epoch(epoch)
        sampler.skip(it - epoch * iters_per_epoch)
        st["seg_start"] = clock()
        try:
            st["it"] = train_one_epoch(
                runner, loader, optimizer, device=device, start_iter=it, max_iters=st["plan"],
                lr_at=lambda i: set_lr(optimizer, lr, lr_factor(i, max_iters=st["plan"], warmup_iters=warmup_iters,
                                                                schedule=schedule, milestones=milestones)),
                amp=amp, grad_clip=grad_clip, channels_last=channels_last, log_every=NEVER_LOG, on_iteration_end=on_end)
        except _Pause:
            pass
        st["trained"] += clock() - st["seg_start"]
        done = st["it"]
        if st["trained"] >= budget_s or done >= st["plan"]:
            run_eval(done)
            break
        while st["next_eval"] < num_evals and st["trained"] >= due_eval():
            st["next_eval"] += 1
            if not curve or curve[-1]["iter"] != done:
                run_eval(done)
            replan(done)
    return {"iters": st["it"], "planned_iters": st["plan"], "train_time_s": round(st["trained"], 2),
            "eval_time_s": round(eval_time, 2), "s_per_iter": round(st["trained"] / max(1, st["it"]), 4),
            "freeze_iters": min(freeze.iters, st["it"]) if frozen_start else 0, "curve": curve}
