"""tools/weights.py: list, verify (MATCH / MISMATCH and exit codes), convert; random weights only."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import res_backbone as rb

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "weights.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("weights_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def r18_files(tmp_path_factory):
    """The same random torchvision resnet18 under its true hash name and under the real V1 name."""
    d = tmp_path_factory.mktemp("r18")
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    tmp = d / "tmp.pth"
    torch.save(model.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    honest = d / f"resnet18-{digest[:8]}.pth"
    os.link(tmp, honest)
    liar = d / "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 name, random contents
    tmp.rename(liar)
    return {"honest": honest, "liar": liar, "digest": digest, "model": model.eval()}


def test_help_explains_every_subcommand_flag_and_exit_code(tool, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("list", "verify", "convert", "exit status"))
    for sub, flags in {"list": ("--arch", "--dir", "--present", "--json"),
                       "verify": ("--no-load", "--json", "--quiet", "FILE", "1 some file's SHA-256 differs"),
                       "convert": ("--to", "--arch", "--force", "IN", "OUT", "torchvision", "timm", "res_backbone"),
                       "export-hub": ("CHECKPOINT", "FOLDER", "--force", "local-dir:FOLDER")}.items():
        with pytest.raises(SystemExit):
            tool.main([sub, "--help"])
        out = capsys.readouterr().out
        assert all(f in out for f in flags), (sub, out)


def test_verify_cli_match_and_mismatch_exit_code(r18_files):
    """The issue's target, as a user runs it: one honest file, one under torchvision's real name."""
    proc = subprocess.run([sys.executable, str(TOOL), "verify", str(r18_files["honest"]), str(r18_files["liar"])],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr
    honest, liar = proc.stdout.split("resnet18-f37072fd.pth  (")
    short = r18_files["digest"][:8]
    assert f"MATCH     file name says hash prefix {short}, and the contents hash to it" in honest
    assert (f"MISMATCH  file name says hash prefix f37072fd, contents hash to {short}...: "
            "the file is not what its name says") in liar
    assert "by name   ResNet18_Weights.IMAGENET1K_V1" in liar and "no catalogued file has this hash" in liar
    assert "resnet18-shaped state dict" in liar and "classifier 1000 classes" in liar


def test_verify_json_and_unreadable(tool, r18_files, tmp_path, capsys):
    assert tool.main(["verify", "--json", str(r18_files["honest"])]) == 0
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["status"] == "match" and rep["sha256"] == r18_files["digest"] and rep["info"]["archs"] == ["resnet18"]
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"<html>404</html>")  # a failed download, real name
    assert tool.main(["verify", str(r18_files["honest"]), str(tmp_path / "resnet50-0676ba61.pth")]) == 2
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "UNREADABLE" in out and "weights-only" in out


def test_list_finds_files_in_caches_and_dirs(tool, tmp_torch_home, tmp_path, capsys):
    tv = tmp_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), tv)
    extra = tmp_path / "weights"
    extra.mkdir()
    legacy = extra / "resnet50_a1_0-14fe96d1.pth"  # timm's GitHub release name, in a --dir
    legacy.write_bytes(b"x")
    assert tool.main(["list", "--arch", "resnet18"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("resnet18.tv_in1k"))
    assert "IMAGENET1K_V1" in row and "69.758" in row and str(tv) in row
    assert next(line for line in out.splitlines() if line.startswith("resnet18.a1_in1k")).endswith("-")
    assert "2 weights, 1 present locally" in out
    assert tool.main(["list", "--json", "--present", "--dir", str(extra)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"resnet18.tv_in1k", "resnet50.a1_in1k"}
    assert rows["resnet50.a1_in1k"]["local"] == [str(legacy)] and rows["resnet50.a1_in1k"]["hash_prefixes"]


def test_convert_round_trip_identical_logits(tool, r18_files, tmp_path, capsys):
    """torchvision .pth -> timm .pth -> .safetensors -> res_backbone: same logits at every step."""
    steps = [(r18_files["honest"], tmp_path / "timm.pth", ["--to", "timm"]),
             (tmp_path / "timm.pth", tmp_path / "hub.safetensors", []),
             (tmp_path / "hub.safetensors", tmp_path / "ours.pth", ["--to", "res_backbone"])]
    for src, dst, extra in steps:
        assert tool.main(["convert", str(src), str(dst), *extra]) == 0
        assert "checked: loaded" in capsys.readouterr().out
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = r18_files["model"](x)
        tm = timm.create_model("resnet18", checkpoint_path=str(tmp_path / "timm.pth")).eval()
        assert torch.equal(tm(x), ref)
        assert torch.equal(rb.create_model("resnet18", pretrained=tmp_path / "ours.pth").eval()(x), ref)


def test_convert_errors_and_exit_codes(tool, r18_files, tmp_path, capsys):
    out = tmp_path / "o.pth"
    assert tool.main(["convert", str(r18_files["honest"]), str(out), "--arch", "resnet50"]) == 1
    err = capsys.readouterr().err
    assert str(r18_files["honest"]) in err and "layer1.0.conv1.weight: file (64, 64, 3, 3) vs resnet50 (64, 64, 1, 1)" in err
    assert tool.main(["convert", str(tmp_path / "nope.pth"), str(out)]) == 2
    assert "nope.pth: no such file" in capsys.readouterr().err
    torch.save({"epoch": 1}, tmp_path / "meta_only.pth")
    assert tool.main(["convert", str(tmp_path / "meta_only.pth"), str(out)]) == 2
    assert "no state dict found" in capsys.readouterr().err
    # the name claims torchvision's V1 weights, the contents disagree: converted, with a note
    assert tool.main(["convert", str(r18_files["liar"]), str(out), "--to", "res_backbone"]) == 0
    assert "not f37072fd: the catalogue's data config was not used" in capsys.readouterr().out
    assert tool.main(["convert", str(r18_files["liar"]), str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err


def test_export_hub_cli_writes_a_folder_timm_loads(tool, tmp_path, capsys):
    from res_backbone.weights.testing import write_tiny_cls_checkpoint

    ckpt = write_tiny_cls_checkpoint(tmp_path / "best.pth")
    assert tool.main(["export-hub", str(ckpt), str(tmp_path / "hub")]) == 0
    out = capsys.readouterr().out
    assert "rb_resnet20, 10 classes" in out and "bitwise equal" in out and "local-dir:" in out
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    ref = rb.create_model("resnet20", num_classes=10, in_chans=1, pretrained=str(ckpt)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    assert tool.main(["export-hub", str(ckpt), str(tmp_path / "hub")]) == 1  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert tool.main(["export-hub", str(tmp_path / "missing.pth"), str(tmp_path / "h2")]) == 2


def test_hub_folder_as_train_cls_pretrained(tool, tmp_path, caplog):
    """The reverse: a timm hub folder of an rb_* model given to train_cls.py --pretrained."""
    from PIL import Image

    from res_backbone.weights.testing import write_tiny_cls_checkpoint

    import train_cls  # tools/ is on pytest's pythonpath

    hub = tmp_path / "hub"
    assert tool.main(["export-hub", str(write_tiny_cls_checkpoint(tmp_path / "c.pth")), str(hub)]) == 0
    for c in ("left", "right"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (28, 28), 60 * i + 10).save(tmp_path / "tree" / c / f"{i}.png")
    tree = str(tmp_path / "tree")
    rc = train_cls.main(
        ["--backbone", "resnet20", "--threads", "1", "--train-dir", tree, "--val-dir", tree, "--in-chans", "1",
         "--input-size", "28", "--batch-size", "2", "--max-iters", "1", "--no-progress", "--workers", "0",
         "--output", str(tmp_path / "run"), "--pretrained", str(hub)])
    assert rc == 0
    assert f"pretrained {hub / 'model.safetensors'} has a 10-class classifier" in caplog.text
    assert "every other layer loaded" in caplog.text

