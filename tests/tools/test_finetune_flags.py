"""A train_cls.py checkpoint (grey) as --pretrained for train_det.py and train_loc.py, and the fine-tuning flags."""
import json
from pathlib import Path

import pytest
import torch

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")

import train_det  # noqa: E402  (tools/ is on pytest's pythonpath)
import train_loc  # noqa: E402
from test_train_det import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DET_TINY = [*TINY, "--synthetic-train", "8", "--synthetic-val", "2", "--num-pictures", "0", "--checkpoint-every", "100"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Stand-in Fashion-MNIST and a real (2-iteration) train_cls.py checkpoint of a grey resnet18."""
    from heads.classification import train as cls_run
    from heads.classification.run import run as run_classification

    base = tmp_path_factory.mktemp("ft")
    fm = write_fake_fashion_mnist(base / "fmnist", n_train=48, n_test=16)
    n = torch.get_num_threads()
    try:
        run_classification(cls_run.ClsTrainConfig(output=str(base / "cls"), backbone="resnet18", data_dir=str(fm), max_iters=2,
                                           batch_size=8, lr=0.01, warmup_iters=0, augment="none", threads=1,
                                           progress=False))
    finally:
        torch.set_num_threads(n)
    return base


def _events(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_det_fine_tunes_a_grey_classifier(base):
    out = base / "det"
    ckpt = base / "cls" / "checkpoint_best.pt"
    assert torch.load(ckpt, weights_only=True)["model_kwargs"]["in_chans"] == 1
    assert train_det.main([*DET_TINY, "--pretrained", str(ckpt), "--bn-policy", "norm_eval", "--frozen-stages", "1",
                           "--freeze-backbone-iters", "2", "--backbone-lr-mult", "0.5", "--max-iters", "3",
                           "--data-dir", str(base / "shapes"), "--output", str(out)]) == 0
    logs = _events(out)
    start = next(r for r in logs if r.get("event") == "start")
    t = start["transfer"]
    assert t["channels"].startswith("1 -> 3") and t["weights"] == str(ckpt)
    assert t["mean"] == [t["mean"][0]] * 3 and 0.05 < t["mean"][0] < 0.6  # the grey mean, repeated
    assert t["bn_policy"] == "norm_eval" and t["frozen_stages"] == 1 and t["backbone_lr_mult"] == 0.5
    assert [r["iteration"] for r in logs if r.get("event") == "backbone_unfrozen"] == [2]
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["bn_policy"] == "norm_eval" and cfg["norm"] == "bn" and cfg["frozen_stages"] == 1
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["model"]["backbone.conv1.weight"].shape[1] == 3 and "backbone.bn1.running_mean" in ck["model"]
    assert len(ck["pretrained_cfg"]["mean"]) == 3  # what eval_det.py normalises with
    lr_mults = sorted({g["lr_mult"] for g in ck["optimizer"]["param_groups"]})
    assert lr_mults == [0.5, 1.0]


def test_train_det_default_bn_policy_follows_the_weights(base):
    out = base / "det_default"
    assert train_det.main([*DET_TINY, "--pretrained", str(base / "cls" / "checkpoint_best.pt"), "--max-iters", "1",
                           "--data-dir", str(base / "shapes"), "--output", str(out)]) == 0
    t = next(r for r in _events(out) if r.get("event") == "start")["transfer"]
    assert t["bn_policy"] == "frozen" and t["frozen_stages"] == 2  # pretrained, 2 images a batch
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert "backbone.bn1.num_batches_tracked" not in ck["model"]  # FrozenBatchNorm2d
    # a policy that contradicts --norm is refused with exit code 2
    assert train_det.main([*DET_TINY, "--bn-policy", "frozen", "--norm", "bn", "--max-iters", "1",
                           "--data-dir", str(base / "shapes"), "--output", str(base / "bad")]) == 2


def _loc_tiny(base, *extra):
    return ["--backbone", "resnet18", "--fmnist-root", str(base / "fmnist"), "--data-dir", str(base / "locdata"),
            "--fmnist-train", "16", "--fmnist-val", "8", "--canvas", "32", "--item-scale", "16", "28",
            "--batch-size", "8", "--warmup-iters", "0", "--log-every", "1", "--num-pictures", "2", "--grid", "1",
            "--box-channels", "8", "--hidden", "16", "--no-progress", *extra]


def test_train_loc_fine_tuning_flags(base):
    out = base / "loc"
    ckpt = base / "cls" / "checkpoint_best.pt"
    assert train_loc.main(_loc_tiny(base, "--pretrained", str(ckpt), "--bn-policy", "frozen", "--frozen-stages", "2",
                                    "--freeze-backbone-iters", "1", "--backbone-lr-mult", "0.1", "--max-iters", "2",
                                    "--output", str(out))) == 0
    logs = _events(out)
    t = next(r for r in logs if r.get("event") == "start")["transfer"]
    assert t["channels"].startswith("1 -> 3") and t["bn_policy"] == "frozen" and t["frozen_stages"] == 2
    assert t["freeze_backbone_iters"] == 1 and t["backbone_lr_mult"] == 0.1
    assert [r["iteration"] for r in logs if r.get("event") == "backbone_unfrozen"] == [1]
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["localizer_kwargs"]["norm"] == "frozen_bn" and "frozen_stages" not in ck["localizer_kwargs"]
    assert "backbone.bn1.num_batches_tracked" not in ck["model"]
    assert sorted({round(g["lr_mult"], 6) for g in ck["optimizer"]["param_groups"]}) == [0.1, 1.0]
    # frozen stages never trained: the stem equals the (adapted) pretrained stem
    src = torch.load(ckpt, weights_only=True)["model"]["conv1.weight"]
    assert torch.allclose(ck["model"]["backbone.conv1.weight"], src.repeat(1, 3, 1, 1) / 3)
    # the fine-tuning flags do not combine with a frozen classifier
    assert train_loc.main(_loc_tiny(base, "--cls-checkpoint", str(ckpt), "--bn-policy", "frozen",
                                    "--max-iters", "1", "--output", str(base / "bad"))) == 2


def test_yaml_keys_are_the_flag_names(tmp_path):
    from res_backbone.engine.config import parse_with_config

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("bn_policy: norm_eval\nfrozen_stages: 1\nfreeze_backbone_iters: 50\nbackbone_lr_mult: 0.1\n")
    for tool in (train_det, train_loc):
        args = parse_with_config(tool.build_parser(), ["--config", str(cfg)])
        assert (args.bn_policy, args.frozen_stages, args.freeze_backbone_iters, args.backbone_lr_mult) == \
            ("norm_eval", 1, 50, 0.1)
    shipped = parse_with_config(train_det.build_parser(), ["--config", str(ROOT / "configs/det/fmnist_transfer.yaml")])
    assert shipped.bn_policy == "frozen" and shipped.pretrained.endswith("checkpoint_best.pt")
