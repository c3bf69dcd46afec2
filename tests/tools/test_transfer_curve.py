"""tools/transfer_study.py --smoke / --probe-only (the data-efficiency curve, issue 18) on stand-in Fashion-MNIST."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from res_backbone.data.pretrain_fmnist import box_crops, render_pretrain_crops
from studies.transfer_curve import crossings, probe_accuracies, summarise

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("tool_transfer_study_curve", ROOT / "tools" / "transfer_study.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def _main(argv):
    n = torch.get_num_threads()
    try:
        return tool.main(argv)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("curve")
    write_fake_fashion_mnist(base / "fmnist", n_train=64, n_test=40)
    common = ["--fmnist-root", str(base / "fmnist"), "--work-dir", str(base / "work"), "--data-dir", str(base / "data")]
    assert _main(["--smoke", "--output", str(base / "out"), *common]) == 0
    return base, common, json.loads((base / "out" / "transfer_curve.json").read_text())


def test_smoke_writes_json_md_png(smoke):
    base, _, result = smoke
    out = base / "out"
    assert (out / "transfer_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "transfer_curve.md").read_text()
    assert "| rendered_frozen_bn |" in md and "linear probe" in md and "Learning rates: the best of" in md
    assert set(result["sources"]) == {"fmnist", "rendered"}
    assert result["sources"]["rendered"]["crops"] > 0 and Path(result["sources"]["rendered"]["checkpoint"]).is_file()
    assert result["timings"]["cpu_s"] > 0


@pytest.mark.parametrize("task,keys", [("det", ("AP", "AP50")), ("loc", ("top1_loc_err", "top1_cls_err"))])
def test_one_record_per_arm_n_seed(smoke, task, keys):
    _, _, result = smoke
    cur = result["curve"][task]
    recs = cur["records"]
    arms = result["options"]["curve_arms"]
    ns = result["options"]["curve_n"][task]
    assert sorted((r["arm"], r["N"], r["seed"]) for r in recs) == sorted((a, n, s) for a in arms for n in ns
                                                                          for s in (0, 1))
    for r in recs:
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in keys), r
        assert r["iters"] == result["options"]["curve_iters"]  # the same iteration budget for every arm and N
        assert r["lr"] == cur["best_lr"][r["arm"]]
    assert {r["source"] for r in recs} == {None, "fmnist", "rendered"}


def test_sweep_picks_each_arms_best_lr(smoke):
    _, _, result = smoke
    cur = result["curve"]["loc"]
    assert len(cur["sweep"]) == 2 * len(result["options"]["curve_arms"])  # 2 learning rates per arm
    for arm, lr in cur["best_lr"].items():
        mine = [r for r in cur["sweep"] if r["arm"] == arm]
        assert lr == min(mine, key=lambda r: r["top1_loc_err"])["lr"]


def test_probe_only_reuses_checkpoints(smoke, capsys):
    base, common, result = smoke
    ck = {k: v["checkpoint"] for k, v in result["sources"].items()}
    assert _main(["--probe-only", "--smoke", "--output", str(base / "probe"), "--cls-checkpoint", ck["fmnist"],
                  "--rendered-checkpoint", ck["rendered"], *common]) == 0
    probe = json.loads((base / "probe" / "transfer_curve.json").read_text())
    assert "curve" not in probe and all(v["reused"] for v in probe["sources"].values())
    assert set(probe["probe"]["backbones"]) == {"random_init", "fmnist", "rendered"}
    for v in probe["probe"]["backbones"].values():
        assert 0 <= v["linear_acc"] <= 100 and 0 <= v["knn_acc"] <= 100
    assert "| random_init |" in capsys.readouterr().out


def test_render_pretrain_crops_deterministic_and_labelled():
    rng = np.random.default_rng(0)
    items = (rng.integers(0, 255, size=(20, 28, 28)).astype(np.uint8), np.arange(20) % 10)
    a = render_pretrain_crops(items, num_canvases=5, canvas=64, size=32, scale=(16.0, 24.0), seed=1)
    b = render_pretrain_crops(items, num_canvases=5, canvas=64, size=32, scale=(16.0, 24.0), seed=1)
    c = render_pretrain_crops(items, num_canvases=5, canvas=64, size=32, scale=(16.0, 24.0), seed=1, split=1)
    assert a[0].shape[1:] == (3, 32, 32) and a[0].dtype == torch.uint8 and len(a[0]) == len(a[1]) >= 5
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0][:5], c[0][:5])
    assert a[1].min() >= 0 and a[1].max() <= 9
    with pytest.raises(ValueError, match="size"):
        render_pretrain_crops(items, num_canvases=1, canvas=64, size=4)


def test_box_crops_cut_the_box():
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:20, 5:25] = (200, 100, 50)  # a 20 x 10 box; the square crop is 20 x 20 about its centre
    crops = box_crops(image, [(5, 10, 25, 20)], size=8)
    assert crops.shape == (1, 3, 8, 8)
    assert crops[0, :, 4, 4].tolist() == [200, 100, 50] and crops[0, :, 0, 4].tolist() == [0, 0, 0]


def test_probe_accuracies_separable_vs_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    f = torch.nn.functional.one_hot(y, 10).float() * 5 + 0.1 * torch.randn(200, 10, generator=g)
    assert probe_accuracies(f[:100], y[:100], f[100:], y[100:]) == {"linear_acc": 100.0, "knn_acc": 100.0}
    noise = torch.randn(200, 10, generator=g)
    res = probe_accuracies(noise[:100], y[:100], noise[100:], y[100:])
    assert res["linear_acc"] < 40 and res["knn_acc"] < 40


def test_crossings_where_scratch_catches_up():
    recs = [{"arm": a, "N": n, "seed": s, "AP": v + 0.01 * s} for a, vals in
            (("scratch", (0.1, 0.3, 0.5)), ("pre", (0.3, 0.4, 0.5))) for n, v in zip((50, 200, 2000), vals)
            for s in (0, 1)]
    summ = summarise(recs, "det")
    assert summ["scratch"][50] == {"mean": pytest.approx(0.105), "min": 0.1, "max": pytest.approx(0.11), "n": 2}
    c = crossings(summ, "det")["pre"]
    assert c["meets_scratch_at"] == 2000 and c["gap"][50] == pytest.approx(0.2)


@pytest.mark.parametrize("jobs", [1, 2])
def test_runner_yields_every_result_with_its_index(jobs):
    from studies.transfer_curve import Runner

    calls = [(math.factorial, n) for n in (5, 3, 7, 1)]
    with Runner(jobs) as runner:
        got = dict(runner.map(calls))
    assert got == {0: 120, 1: 6, 2: 5040, 3: 1}


def test_a_diverged_run_scores_worst_and_the_study_goes_on(monkeypatch):
    from argparse import Namespace

    from res_backbone.engine.optim_step import NonFiniteLossError
    from studies import transfer_curve as tc

    def explode(*a, **k):
        raise NonFiniteLossError("iteration 3: 5 consecutive non-finite losses; stopping")

    monkeypatch.setattr(tc, "_loc_run", explode)
    rec = tc._one(Namespace(), "loc", tc.curve_arms(["scratch"])[0], 50, 0, 0.04, {})
    assert rec["diverged"] == "iteration 3: 5 consecutive non-finite losses" and rec["iters"] is None
    assert rec["top1_loc_err"] == 100.0 and rec["mean_iou"] == 0.0
    md = tc.curve_markdown({"curve": {"loc": {"records": [rec], "sweep": [rec], "best_lr": {"scratch": 0.04}}}})
    assert "scratch lr 0.04: diverged" in md and "Diverged (scored as the worst possible run): scratch N=50" in md


def test_sweep_halves_the_rate_of_an_arm_that_diverges_at_every_rate(monkeypatch):
    from argparse import Namespace

    from studies import transfer_curve as tc

    def fake(args, task, arm, n, seed, lr, sources):
        bad = arm.name == "rendered_frozen_bn" and lr > 0.006
        return {"task": task, "arm": arm.name, "N": n, "seed": seed, "lr": lr, "AP": 0.0 if bad else 1 - lr,
                "AP50": 0.0, "iters": None if bad else 5, "wall_s": 0.0, **({"diverged": "nan"} if bad else {})}

    monkeypatch.setattr(tc, "_one", fake)
    monkeypatch.setattr(tc, "_prepare", lambda *a: None)
    args = Namespace(curve_arms=["scratch", "rendered_frozen_bn"], curve_n={"det": [50, 100]}, sweep_n=50, seed=0,
                     curve_seeds=1, det_lrs=[0.02, 0.04], loc_lrs=[0.001])
    out = tc.run_curve(args, ["det"], {"rendered": {}})["det"]
    assert [r["lr"] for r in out["sweep"] if r["arm"] == "rendered_frozen_bn"] == [0.02, 0.04, 0.01, 0.005]
    assert out["best_lr"] == {"scratch": 0.02, "rendered_frozen_bn": 0.005}
    assert [(r["arm"], r["N"], r["lr"]) for r in out["records"]] == [
        ("scratch", 50, 0.02), ("rendered_frozen_bn", 50, 0.005), ("scratch", 100, 0.02), ("rendered_frozen_bn", 100, 0.005)]


def test_runner_workers_end_with_their_parent(tmp_path):
    """A study killed with SIGTERM takes its pool processes with it (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    code = ("import os, sys, time; sys.path.insert(0, %r)\n"
            "from studies.transfer_curve import Runner\n"
            "if __name__ == '__main__':\n"
            "    with Runner(1 + 1) as r:\n"
            "        list(r.map([(time.sleep, 0.5), (time.sleep, 0.5)]))\n"
            "        print(' '.join(str(v) for v in r._pool._processes), flush=True)\n"
            "        r.map([(time.sleep, 60)]).__next__()\n") % str(ROOT / "tools")
    script = tmp_path / "parent.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(v) for v in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"workers {alive} outlived their parent"
