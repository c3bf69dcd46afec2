"""Safe checkpoints: pickled code is refused by every loader, safetensors export/import, recorded
metadata, and loads into another architecture that name the keys that do not fit."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch

import res_backbone as rb
from heads.classification import load_classifier
from heads.detection import build_detector
from heads.detection.ensemble import load_detector
from heads.localization import load_localizer
from res_backbone.engine import checkpoint as ckpt_mod
from res_backbone.weights.files import CheckpointMismatchError, read_checkpoint, read_safetensors
from res_backbone.weights.load import load_state_dict_checked

ROOT = Path(__file__).resolve().parents[3]
# a detector small enough to build and run in well under a second
DET = dict(backbone="resnet18", num_classes=3, fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_test=50,
           rpn_post_nms_top_n_test=20, box_detections_per_img=10, box_score_thresh=0.0)


class _System:
    """Unpickling this runs ``os.system(...)``: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.marker!r}).write_text('pwned')",))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOADERS = {
    "engine load_checkpoint": (lambda p: ckpt_mod.load_checkpoint(p), ckpt_mod.CorruptCheckpointError),
    "read_checkpoint": (read_checkpoint, CheckpointMismatchError),
    "create_model(pretrained=)": (lambda p: rb.create_model("resnet18", pretrained=p), CheckpointMismatchError),
    "create_backbone(pretrained=)": (lambda p: rb.create_backbone("resnet18", pretrained=p), CheckpointMismatchError),
    "heads load_classifier": (load_classifier, CheckpointMismatchError),
    "heads load_localizer": (load_localizer, ckpt_mod.CorruptCheckpointError),
    "heads load_detector": (load_detector, ckpt_mod.CorruptCheckpointError),
    "build_detector(pretrained=)": (lambda p: build_detector("resnet18", num_classes=2, pretrained=p),
                                    CheckpointMismatchError),
}


@pytest.fixture(scope="module", params=[_System, _Eval], ids=["os.system", "eval"])
def evil_checkpoint(request, tmp_path_factory):
    """A checkpoint of every task's layout (real resnet18 weights) that also carries a pickled callable."""
    base = tmp_path_factory.mktemp("evil")
    marker, path = base / "pwned", base / "evil.pt"
    sd = rb.create_model("resnet18", num_classes=4).state_dict()
    torch.save({"model": sd, "model_name": "resnet18", "model_kwargs": {"num_classes": 4}, "task": "detection",
                "detector_kwargs": {"backbone": "resnet18"}, "localizer_kwargs": {"backbone_name": "resnet18"},
                "hook": request.param(marker)}, path)
    return path, marker


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_pickled_callable_is_refused_everywhere(evil_checkpoint, loader):
    path, marker = evil_checkpoint
    fn, error = LOADERS[loader]
    with pytest.raises(error) as e:
        fn(path)
    msg = str(e.value)
    assert str(path) in msg and "refuses" in msg and ("posix.system" in msg or "reference to eval" in msg), msg
    assert "weights_only=False unless you trust" in msg  # the advice is a warning, not a recipe
    assert not marker.exists()


def test_resume_auto_skips_a_pickled_callable(tmp_path, caplog):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "iter": 3, "x": _System(marker)}, tmp_path / "checkpoint_last.pt")
    with caplog.at_level(logging.WARNING):
        assert ckpt_mod.find_resume_checkpoint(tmp_path) is None
    assert "checkpoint_last.pt" in caplog.text and "posix.system" in caplog.text
    assert not marker.exists()


@pytest.mark.parametrize("tool", ["eval_det", "eval_cls", "eval_loc"])
def test_eval_tools_refuse_with_exit_code_2(tmp_path, tool, caplog):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _System(marker)}, path)
    with caplog.at_level(logging.ERROR):
        rc = _tool(tool).main(["--checkpoint", str(path), "--output", str(tmp_path / "out")] if tool != "eval_cls"
                              else ["--checkpoint", str(path)])
    assert rc == 2 and "posix.system" in caplog.text and str(path) in caplog.text
    assert not marker.exists()


# ---------------------------------------------------------------------- safetensors
def _perturb_bn(model: torch.nn.Module) -> None:
    """Non-default BN statistics, so a round trip that dropped buffers would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_resnet18_safetensors_round_trip(tmp_path):
    model = rb.create_model("resnet18", num_classes=7)
    _perturb_bn(model)
    model.eval()
    path = rb.save_safetensors(model, tmp_path / "r18.safetensors", model_name="resnet18",
                               config={"num_classes": 7}, metadata={"model_kwargs": {"num_classes": 7},
                                                                    "classes": list("abcdefg")})
    assert path.read_bytes()[8:9] == b"{"  # a JSON header, then raw tensors: no pickle anywhere
    sd, meta = read_safetensors(path)
    assert meta["library_version"] == rb.__version__ and meta["library"] == "res_backbone"
    assert meta["model_name"] == "resnet18" and meta["config"] == {"num_classes": 7} and meta["format"] == "pt"
    assert meta["pretrained_cfg"]["mean"] == list(model.pretrained_cfg["mean"])
    assert set(sd) == set(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        via_pretrained = rb.create_model("resnet18", num_classes=7, pretrained=path).eval()
        assert torch.equal(via_pretrained(x), ref)
        fresh = rb.create_model("resnet18", num_classes=7)
        assert rb.load_safetensors(fresh, path)["model_name"] == "resnet18"
        assert torch.equal(fresh.eval()(x), ref)
        clf, clf_meta = load_classifier(path)  # model_name + model_kwargs in the header: the eval tools read it
        assert torch.equal(clf(x), ref) and clf_meta["classes"] == list("abcdefg")


def test_detector_safetensors_round_trip(tmp_path):
    det = build_detector(**DET)
    _perturb_bn(det)
    det.eval()
    path = rb.save_safetensors(det, tmp_path / "det.safetensors", model_name="faster_rcnn_fpn", config=DET)
    _, meta = read_safetensors(path)
    assert meta["config"] == DET and meta["library_version"] == rb.__version__
    rebuilt = build_detector(**meta["config"]).eval()
    rb.load_safetensors(rebuilt, path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = det(x, [(64, 64)])[0], rebuilt(x, [(64, 64)])[0]
    assert len(a["boxes"]) > 0
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(a[k], b[k]), k


def test_detector_into_other_architecture_names_keys_and_shapes(tmp_path):
    path = rb.save_safetensors(build_detector(**DET), tmp_path / "fpn.safetensors", model_name="faster_rcnn_fpn")
    c4 = build_detector(**{**DET, "arch": "c4"})
    with pytest.raises(CheckpointMismatchError) as e:
        rb.load_safetensors(c4, path)
    msg = str(e.value)
    assert str(path) in msg and "does not fit FasterRCNN" in msg
    assert "missing keys" in msg and "roi_heads.box_head." in msg
    assert "unexpected keys" in msg and "backbone.fpn." in msg
    assert "shape mismatches" in msg and "checkpoint (" in msg and "vs model (" in msg


def test_safetensors_edge_cases(tmp_path):
    shared = torch.arange(6.0)
    sd = {"a": shared, "b": shared, "view": shared[2:4]}  # tied and viewed tensors are written as copies
    path = rb.save_safetensors(sd, tmp_path / "tied.safetensors", metadata={"note": "x", "n": 3})
    got, meta = read_safetensors(path)
    assert all(torch.equal(got[k], v) for k, v in sd.items()) and meta["note"] == "x" and meta["n"] == 3
    with pytest.raises(TypeError, match="'step' is a int"):
        rb.save_safetensors({"w": torch.zeros(1), "step": 3}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointMismatchError, match="cut.safetensors: not a readable safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")
    marker = tmp_path / "pwned"
    torch.save({"x": _System(marker)}, tmp_path / "pickle.safetensors")  # a pickle wearing the other suffix
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors file"):
        rb.create_model("resnet18", pretrained=tmp_path / "pickle.safetensors")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_safetensors(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- training checkpoints
def _unsealed(ck: dict) -> dict:
    """The checkpoint without its checksum, so an edited copy is judged on its weights, not as damaged."""
    return {k: v for k, v in ck.items() if k != "checksum"}


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_training_checkpoints_record_version_name_config_and_refuse_other_archs(tmp_path):
    from res_backbone.data import ClsDatasets
    from heads.classification import train as cls_run
    from heads.detection import train as det_run
    from heads.localization import train as loc_run
    from res_backbone.engine.runner import restore_training_state, save_run_checkpoint

    # classification
    cfg = cls_run.ClsTrainConfig(backbone="resnet18", output=str(tmp_path / "cls"))
    data = ClsDatasets(None, None, ["a", "b", "c"], 3, (0.5,) * 3, (0.2,) * 3, (3, 32, 32), 1.0, "image_folder")
    model = rb.create_model("resnet18", num_classes=3)
    state = {"best_top1_err": 50.0, "best_iter": 2, "train_time_s": 1.0}
    payload = cls_run.checkpoint_payload(model, _optimizer(model), None, it=2, iters_per_epoch=1, cfg=cfg,
                                         data=data, state=state)
    cls_path = save_run_checkpoint(payload, cfg.output)
    ck = ckpt_mod.load_checkpoint(cls_path)
    assert ck["library_version"] == rb.__version__ and ck["model_name"] == "resnet18"
    assert ck["config"]["backbone"] == "resnet18" and ck["config"]["batch_size"] == cfg.batch_size
    with pytest.raises(CheckpointMismatchError) as e:  # same family, other depth: keys named
        rb.create_model("resnet34", num_classes=3, pretrained=cls_path)
    assert str(cls_path) in str(e.value) and "missing keys" in str(e.value) and "layer1.2.conv1.weight" in str(e.value)
    with pytest.raises(CheckpointMismatchError, match=r"layer1\.0\.conv1\.weight: checkpoint \(64, 64, 3, 3\) vs "
                                                      r"model \(64, 64, 1, 1\)"):
        rb.create_model("resnet50", num_classes=3, pretrained=cls_path)
    other = rb.create_model("resnet34", num_classes=3)
    with pytest.raises(ckpt_mod.CorruptCheckpointError, match=r"Missing key\(s\).*layer1\.2\.conv1\.weight"):
        restore_training_state(ck, cls_path, other, _optimizer(other))  # --resume into another model

    # detection
    dcfg = det_run.DetTrainConfig(backbone="resnet18", output=str(tmp_path / "det"), detector_kwargs=DET)
    det = build_detector(**DET)
    ddata = det_run.DetData(None, None, None, None, None, None, [1, 5, 9], ["x", "y", "z"])
    det_path = save_run_checkpoint(det_run.checkpoint_payload(det, _optimizer(det), None, 4, 1, dcfg, ddata, 0.1,
                                                              {"AP": 0.1}), dcfg.output)
    dk = ckpt_mod.load_checkpoint(det_path)
    assert dk["library_version"] == rb.__version__ and dk["arch"] == "resnet18" and dk["task"] == "detection"
    assert dk["config"]["backbone"] == "resnet18" and dk["detector_kwargs"] == DET
    loaded, _ = load_detector(det_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), det.state_dict().values()))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)does not fit FasterRCNN.*missing keys.*"
                                                      r"unexpected keys \(\d+\): backbone\..*shape mismatches"):
        load_state_dict_checked(build_detector(**{**DET, "arch": "c4"}), dk["model"], source=str(det_path))
    tampered = {**_unsealed(dk), "detector_kwargs": {**DET, "arch": "c4"}}
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match=r"(?s)tampered\.pt: weights do not fit.*(Missing|Unexpected) key"):
        load_detector(tmp_path / "tampered.pt")

    # localization
    lcfg = loc_run.LocTrainConfig(backbone="resnet18", output=str(tmp_path / "loc"),
                                  localizer_kwargs={"backbone_name": "resnet18", "num_classes": 2, "mode": "scr"})
    from heads.localization import build_localizer

    loc = build_localizer(**lcfg.localizer_kwargs)
    ldata = loc_run.LocData(None, None, None, None, None, ["p", "q"], [1, 2])
    loc_path = save_run_checkpoint(loc_run.checkpoint_payload(loc, _optimizer(loc), None, 2, 1, lcfg, ldata,
                                                              {"best": 40.0, "best_iter": 2, "train_time_s": 1.0}),
                                   lcfg.output)
    lk = ckpt_mod.load_checkpoint(loc_path)
    assert lk["library_version"] == rb.__version__ and lk["model_name"] == "resnet18"
    assert lk["config"]["localizer_kwargs"] == lcfg.localizer_kwargs
    torch.save({**_unsealed(lk), "localizer_kwargs": {**lcfg.localizer_kwargs, "backbone_name": "resnet34"}},
               tmp_path / "loc34.pt")
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)loc34\.pt: weights do not fit.*Missing key.*backbone\.layer1\.2\."):
        load_localizer(tmp_path / "loc34.pt")
