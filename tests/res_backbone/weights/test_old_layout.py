"""Files written before the weights modules moved into ``res_backbone/weights/`` still load, tensor for tensor.

``tests/fixtures/old_layout/`` was written at b529055 (``res_backbone/pretrained.py``,
``serialization.py``... still in place) by ``make_old_fixtures.py.txt`` there: a tiny ResNet-20 after
two SGD steps, saved as a ``train_cls``-style run checkpoint (with optimiser, RNG state and checksum)
and with ``save_safetensors``; ``manifest.json`` holds each tensor's shape, dtype and SHA-256 as
written then.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import res_backbone as rb
from heads.classification import load_classifier
from res_backbone.engine.checkpoint import load_checkpoint
from res_backbone.weights.files import read_checkpoint, read_safetensors
from res_backbone.weights.load import load_safetensors

OLD = Path(__file__).resolve().parents[2] / "fixtures" / "old_layout"
MANIFEST = json.loads((OLD / "manifest.json").read_text())


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _assert_same_as_written(sd):
    expected = MANIFEST["tensors"]
    assert sorted(sd) == sorted(expected)
    for k, v in sd.items():
        assert list(v.shape) == expected[k]["shape"] and str(v.dtype) == expected[k]["dtype"], k
        assert _digest(v) == expected[k]["sha256"], k


def test_fixtures_stay_small():
    assert sum(p.stat().st_size for p in OLD.iterdir()) < 1 << 20


def test_old_run_checkpoint_loads_with_its_checksum():
    ckpt = load_checkpoint(OLD / "checkpoint_best.pt")  # refuses the file if a byte of it changed since
    assert ckpt["model_name"] == "resnet20" and ckpt["task"] == "classification" and ckpt["iter"] == 2
    assert ckpt["library_version"] == "0.1.0" and ckpt["optimizer"]["state"]  # momentum buffers kept
    _assert_same_as_written(ckpt["model"])


def test_old_run_checkpoint_into_a_model():
    sd, meta = read_checkpoint(OLD / "checkpoint_best.pt")
    _assert_same_as_written(sd)
    assert meta["model_kwargs"] == MANIFEST["model_kwargs"]
    model = rb.create_model(meta["model_name"], **meta["model_kwargs"], pretrained=OLD / "checkpoint_best.pt")
    _assert_same_as_written(model.state_dict())
    assert model.pretrained_cfg["mean"] == pytest.approx([0.2860]) and model.pretrained_cfg["input_size"] == [1, 28, 28]
    clf, info = load_classifier(OLD / "checkpoint_best.pt")
    _assert_same_as_written(clf.state_dict())
    assert info["classes"] == [f"class{i}" for i in range(10)]


def test_old_safetensors_file():
    sd, meta = read_safetensors(OLD / "tiny_resnet20.safetensors")
    _assert_same_as_written(sd)
    assert meta["config"] == MANIFEST["model_kwargs"] and meta["model_name"] == "resnet20"
    assert meta["library"] == "res_backbone" and meta["library_version"] == "0.1.0"
    model = rb.create_model("resnet20", **MANIFEST["model_kwargs"])
    assert load_safetensors(model, OLD / "tiny_resnet20.safetensors")["classes"] == meta["classes"]
    _assert_same_as_written(model.state_dict())
    same = rb.create_model("resnet20", **MANIFEST["model_kwargs"], pretrained=OLD / "tiny_resnet20.safetensors")
    _assert_same_as_written(same.state_dict())
