"""tools/studies/anchor_study.py: the per-seed aggregation and the printed summary (issue 17)."""
import pytest

from studies.anchor_study import aggregate, summary


def _run(ap, recall):
    return {"AP": ap, "AP50": ap * 2, "AP75": ap / 2, "AR100": ap + 0.3,
            "rpn_recall": {"recall@300_iou0.5": recall, "recall@300_iou0.7": recall - 0.3}}


def _seed(default_ap, auto_ap):
    cov = {"iou_0.5": 0.1, "iou_0.7": 0.01, "mean_best_iou": 0.2}
    return {"coverage": {"default": cov, "fitted": dict(cov, **{"iou_0.5": 0.97})},
            "runs": {"default": _run(default_ap, 0.9), "auto": _run(auto_ap, 0.98)}}


def test_aggregate_means_spreads_and_gains_per_seed():
    per_seed = {0: _seed(0.10, 0.20), 1: _seed(0.14, 0.13), 2: _seed(0.12, 0.18)}
    agg = aggregate(per_seed)
    assert agg["ap_gain"] == {"0": pytest.approx(0.10), "1": pytest.approx(-0.01), "2": pytest.approx(0.06)}
    assert agg["ap_gain_mean"] == pytest.approx(0.05)
    assert agg["seeds_auto_better"] == 2
    auto = agg["arms"]["auto"]
    assert auto["seeds"] == 3
    assert auto["AP"] == {"mean": pytest.approx(0.17), "min": 0.13, "max": 0.20}
    assert auto["recall@300_iou0.5"]["mean"] == pytest.approx(0.98)
    lines = summary({"seeds": {str(k): v for k, v in per_seed.items()}, "summary": agg, "total_seconds": 12.0})
    assert any("mean +0.050" in line and "1: -0.010" in line for line in lines)


def test_aggregate_one_arm_has_no_gain():
    agg = aggregate({0: {"runs": {"auto": _run(0.2, 0.97)}}})
    assert agg["ap_gain"] == {} and "ap_gain_mean" not in agg and agg["arms"]["auto"]["seeds"] == 1
