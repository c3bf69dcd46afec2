"""train_for_budget: equal training time, evaluations at fractions of it, the freeze window's share."""
import time

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from res_backbone.engine.budget import TimeBudgetPlan, train_for_budget
from res_backbone.data.samplers import ResumableBatchSampler
from res_backbone.data.samplers import EpochSeeded
from res_backbone.engine.optim import build_optimizer
from res_backbone.transfer import BackboneFreeze

pytestmark = pytest.mark.usefixtures("one_thread")


class _Points(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i) / 16), (4, 4), {"y": torch.tensor(float(i % 3))}


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


class _Timed(nn.Module):
    """A model whose iteration takes ``slow`` seconds, ``fast`` while its backbone is frozen."""

    def __init__(self, slow=0.01, fast=0.01):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 1)
        self.slow, self.fast, self.seen = slow, fast, []

    def forward(self, images, sizes, targets):
        frozen = not self.backbone[0].weight.requires_grad
        feats = self.backbone(images)
        self.seen.append((frozen, self.backbone[1].training))  # the BN mode the backbone ran in
        time.sleep(self.fast if frozen else self.slow)
        out = self.head(feats.mean((2, 3))).squeeze(1)
        return {"loss": (out - torch.stack([t["y"] for t in targets])).pow(2).mean()}


def _loader():
    base = DistributedSampler(_Points(), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler = ResumableBatchSampler(BatchSampler(base, 4, drop_last=True), base)
    return DataLoader(EpochSeeded(_Points(), 0), batch_sampler=sampler, collate_fn=_collate), sampler


def test_stops_at_the_budget_and_evaluates_at_its_fractions():
    model = _Timed()
    loader, sampler = _loader()
    opt = build_optimizer(model, name="sgd", lr=0.1)
    calls = []

    def evaluate(it):
        calls.append(it)
        time.sleep(0.05)  # evaluation does not count against the budget
        return {"score": float(it)}

    res = train_for_budget(model, loader, sampler, opt, device=torch.device("cpu"), budget_s=0.6, lr=0.1,
                           evaluate=evaluate, num_evals=4, calib_iters=5)
    assert 0.5 <= res["train_time_s"] <= 0.6 + 0.25  # the plan may end a few iterations early
    assert 20 <= res["iters"] <= 60 and res["iters"] == len(model.seen)  # ~10 ms an iteration
    assert calls == [p["iter"] for p in res["curve"]] and len(calls) == 4 and calls == sorted(set(calls))
    assert calls[-1] == res["iters"] and res["curve"][-1]["score"] == res["iters"]
    assert 0.1 <= res["curve"][0]["train_time_s"] <= 0.3  # the first evaluation at ~1/4 of the budget
    assert res["eval_time_s"] >= 0.2
    assert res["freeze_iters"] == 0 and not any(frozen for frozen, _ in model.seen)
    # the cosine schedule was planned over the run: the last learning rate is near zero
    assert opt.param_groups[0]["lr"] < 0.02


def test_freeze_window_is_a_quarter_of_the_planned_iterations():
    model = _Timed(slow=0.012, fast=0.004)
    loader, sampler = _loader()
    opt = build_optimizer(model, name="sgd", lr=0.1)
    freeze = BackboneFreeze(model.backbone, 0)
    res = train_for_budget(model, loader, sampler, opt, device=torch.device("cpu"), budget_s=0.8, lr=0.1,
                           evaluate=lambda it: {}, num_evals=2, calib_iters=5, freeze=freeze, freeze_fraction=0.25,
                           unfrozen_s_per_iter=0.012)
    frozen = [f for f, _ in model.seen]
    n_frozen = sum(frozen)
    assert frozen == [True] * n_frozen + [False] * (len(frozen) - n_frozen)  # one window, at the start
    assert n_frozen in (res["freeze_iters"], res["freeze_iters"] + 1)
    assert 0.12 <= res["freeze_iters"] / res["iters"] <= 0.4
    assert all(not bn_training for f, bn_training in model.seen if f)  # BN statistics held while frozen
    assert all(bn_training for f, bn_training in model.seen if not f)
    assert 0.65 <= res["train_time_s"] <= 0.8 + 0.25 and all(p.requires_grad for p in model.parameters())


def test_plan_follows_a_speed_change():
    """The machine gets twice as fast after 12 iterations: the plan is re-sized at the evaluations, so the
    run still fills its budget and ends its schedule (instead of stopping at the first plan's length).

    A simulated clock (``clock=``) advances 0.02 s per iteration, then 0.01 s: no sleeping, so the load
    of the machine running the test cannot change the counts."""
    model = _Timed(slow=0.0, fast=0.0)
    now = {"t": 0.0}
    calls = []

    def evaluate(it):
        calls.append(it)
        return {}

    original = model.forward

    def forward(*a):
        now["t"] += 0.01 if len(model.seen) >= 12 else 0.02
        return original(*a)

    model.forward = forward
    loader, sampler = _loader()
    opt = build_optimizer(model, name="sgd", lr=0.1)
    res = train_for_budget(model, loader, sampler, opt, device=torch.device("cpu"), budget_s=0.8, lr=0.1,
                           evaluate=evaluate, num_evals=5, calib_iters=5, clock=lambda: now["t"])
    # the first plan, from the 0.02 s iterations: 40; the budget then holds 12 x 0.02 + 56 x 0.01 s
    assert res["train_time_s"] >= 0.75 and res["iters"] > 55 and len(calls) == 5
    assert res["planned_iters"] - res["iters"] <= 10 and opt.param_groups[0]["lr"] < 0.03


def test_rejects_bad_arguments():
    model = _Timed()
    loader, sampler = _loader()
    opt = build_optimizer(model, name="sgd", lr=0.1)
    with pytest.raises(ValueError, match="budget_s > 0"):
        train_for_budget(model, loader, sampler, opt, device=torch.device("cpu"), budget_s=0, lr=0.1,
                         evaluate=lambda it: {})
    with pytest.raises(ValueError, match="freeze_fraction"):
        train_for_budget(model, loader, sampler, opt, device=torch.device("cpu"), budget_s=1, lr=0.1,
                         evaluate=lambda it: {}, freeze_fraction=1.0)


def test_time_budget_plan_sizes_resizes_caps_and_restores():
    plan = TimeBudgetPlan(cap=10_000, budget_min=1.0, calib_iters=10, resize_every=100)
    plan.begin(0)
    assert (plan.stop, plan.max_iters, plan.saved_max_iters) == (10, 10_000, None)  # calibrating
    t, events = 0.0, []
    for done in range(1, 10_000):
        t += 5.0 if done <= 3 else (0.1 if done <= 200 else 0.2)  # slow warm-up, then the machine halves speed
        r = plan.after_iteration(done, t)
        if r:
            events.append((done, round(r["s_per_iter"], 3), r["max_iters"], r["first"]))
        if done >= plan.stop:
            break
    # sized at 10 from the speed after the warm-up (0.1 s), not the warm-up's 5 s
    assert events[0][:2] == (10, 0.1) and events[0][3] and abs(events[0][2] - (10 + 443)) <= 1  # 44.3 s left
    assert all(d % 100 == 0 and not first for d, _, _, first in events[1:])
    assert events[3][1] > events[2][1]  # the slowdown (after 200) is seen at 300, and the plan shrinks
    assert events[3][2] < events[2][2]
    # the speed is the session's average, so a sudden halving overshoots a little (62.5 s here), no more
    assert done == plan.max_iters == plan.stop == plan.saved_max_iters and 59.5 < t < 63

    resumed = TimeBudgetPlan(cap=10_000, budget_min=1.0, calib_iters=10)
    resumed.restore(plan.saved_max_iters)
    resumed.begin(150, train_s=30.0)
    assert resumed.sized and resumed.stop == resumed.max_iters == plan.max_iters  # the interrupted run's schedule

    capped = TimeBudgetPlan(cap=50, budget_min=10.0, calib_iters=10)
    capped.begin(0)
    for done in range(1, 11):
        capped.after_iteration(done, done * 0.01)
    assert capped.max_iters == 50  # the cap bounds what the budget would allow

    free = TimeBudgetPlan(cap=70, budget_min=None)
    free.begin(0)
    assert free.sized and free.stop == 70 and all(free.after_iteration(d, d) is None for d in range(1, 71))
    with pytest.raises(ValueError, match="time budget"):
        TimeBudgetPlan(cap=10, budget_min=0.0)
