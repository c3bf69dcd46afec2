"""Export to ONNX / .pt2 / TorchScript and back: same outputs as eager PyTorch, metadata inside, clear errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import det_checkpoint  # noqa: E402  (this folder's conftest)
from heads.export import export_checkpoint, export_model, load_checkpoint_model
from heads.exported import is_exported_file, load_exported
from heads.meta import MetaError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def det_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det_export")
    ckpt = det_checkpoint(tmp / "det.pt")
    return ckpt, {fmt: export_checkpoint(ckpt, fmt, tmp / f"det.{fmt}") for fmt in ("onnx", "pt2")}


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_detector_file_matches_eager_at_two_sizes(det_files, fmt):
    ckpt, files = det_files
    model, _ = load_checkpoint_model(ckpt)
    fast = model.inference_copy()
    exported = load_exported(files[fmt], expect_task="detection")
    assert exported.meta["cat_ids"] == [3, 7, 9] and exported.meta["format"] == fmt and exported.meta["min_size"] >= 32
    torch.manual_seed(1)
    for h, w in ((128, 160), (96, 128)):  # one file, two sizes (dynamic H and W)
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            a = fast(x, [(h, w - 7)])[0]
        b = exported(x, [(h, w - 7)])[0]
        assert a["boxes"].shape[0] > 0 and torch.equal(a["labels"], b["labels"])
        assert (a["boxes"] - b["boxes"]).abs().max() < 1e-3 and (a["scores"] - b["scores"]).abs().max() < 1e-4
    assert is_exported_file(files[fmt]) and not is_exported_file(ckpt)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_image_without_proposals_gives_empty_outputs(det_files, fmt):
    """pytorch/vision#2380: torchvision's exported Faster R-CNN fails when nothing survives. An image size of
    0 x 0 clips every anchor to nothing: empty tensors flow through NMS, RoIAlign and the box head. A .pt2 file
    used to stop there (torch.export asserted that NMS keeps at least 2 boxes: heads.export.nms_may_keep_none)."""
    exported = load_exported(det_files[1][fmt])
    if fmt == "pt2":  # torchvision's fake NMS kernel bounds the kept count by 2 from below; lifted while exporting
        graph = torch.export.load(str(det_files[1][fmt])).graph
        asserts = [str(n.args) for n in graph.nodes if "assert_scalar" in str(n.target)]
        assert asserts and not [a for a in asserts if ">= 2" in a]
    out = exported(torch.randn(1, 3, 96, 96), [(0, 0)])[0]
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)


@pytest.mark.slow
def test_zero_detections_do_not_crash_the_onnx_graph(tmp_path):
    """pytorch/vision#2380, the usual way: boxes exist but every score is under the threshold."""
    ckpt = det_checkpoint(tmp_path / "none.pt", box_score_thresh=1.0)  # no score is above 1: nothing survives
    exported = load_exported(export_checkpoint(ckpt, "onnx", tmp_path / "none.onnx"))
    out = exported(torch.randn(1, 3, 128, 128), [(128, 128)])[0]
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)


def _cls_checkpoint(path, in_chans=3):
    from res_backbone import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3, in_chans=in_chans)
    torch.save({"model": model.state_dict(), "model_name": "resnet20", "task": "classification",
                "model_kwargs": {"num_classes": 3, "in_chans": in_chans}, "classes": ["a", "b", "c"],
                "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [in_chans, 32, 32]}}, path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_classifier_any_batch_and_size(tmp_path, fmt):
    ckpt = _cls_checkpoint(tmp_path / "cls.pt")
    model, meta = load_checkpoint_model(ckpt)
    exported = load_exported(export_model(model, meta, fmt, tmp_path / f"cls.{fmt}"))
    for shape in ((1, 3, 32, 32), (5, 3, 40, 48)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert (model(x) - exported(x)).abs().max() < 1e-4
    assert exported.meta["class_names"] == ["a", "b", "c"] and exported.meta["cat_ids"] is None


def test_backbone_export_gives_every_level(tmp_path):
    ckpt = _cls_checkpoint(tmp_path / "cls.pt")
    model, meta = load_checkpoint_model(ckpt, "backbone")
    exported = load_exported(export_model(model, meta, "pt2", tmp_path / "bb.pt2"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    got = exported(x)
    assert list(got) == list(ref) and all((ref[k] - got[k]).abs().max() < 1e-4 for k in ref)


def test_bad_files_are_named(tmp_path, det_files):
    ckpt, files = det_files
    with pytest.raises(MetaError, match="a detection model, but a classification model is expected"):
        load_exported(files["pt2"], expect_task="classification")
    with pytest.raises(ValueError, match="not an ONNX, .pt2 or TorchScript file"):
        load_exported(ckpt)
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "nope.onnx")
    import onnx

    bare = onnx.load(str(files["onnx"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(MetaError, match="bare.onnx: no 'res_backbone_meta' metadata"):
        load_exported(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX file"):
        load_exported(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="TorchScript is not offered for detectors"):
        export_checkpoint(ckpt, "torchscript", tmp_path / "det.ts")


def test_export_tool_verifies_on_images(tmp_path, capsys):
    import export as export_tool

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    cls = _cls_checkpoint(tmp_path / "cls.pt")
    out = tmp_path / "cls.onnx"
    assert export_tool.main(["--checkpoint", str(cls), "--format", "onnx", "--output", str(out),
                             "--verify-images", str(tmp_path / "imgs")]) == 0
    report = json.loads((tmp_path / "cls.onnx.verify.json").read_text())
    assert report["passed"] and report["cases"] == 6 and report["max_abs"] < 1e-4
    assert "-> OK" in capsys.readouterr().out.replace(" ->", "->").replace("  ", " ") or report["passed"]
    assert export_tool.main(["--checkpoint", str(cls), "--format", "onnx", "--output", str(out)]) == 2  # no images
    assert export_tool.main(["--checkpoint", str(tmp_path / "missing.pt"), "--format", "pt2",
                             "--output", str(tmp_path / "m.pt2")]) == 2


def test_a_missing_deploy_package_names_the_extra(monkeypatch):
    import builtins

    from heads.export import MissingDeployDependency, require

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(MissingDeployDependency, match=r"onnxruntime is not installed: pip install -e '\.\[deploy\]'"):
        require("onnxruntime")
