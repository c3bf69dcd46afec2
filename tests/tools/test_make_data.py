"""tools/make_data.py: the built-in sets rendered from the command line, byte-identical for the same seed."""
import hashlib
import importlib.util
from pathlib import Path

import pytest

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("tool_make_data", ROOT / "tools" / "make_data.py")
make_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_data)


def _hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_help_lists_the_sets(capsys):
    with pytest.raises(SystemExit) as e:
        make_data.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(k in out for k in ("shapes", "fmnist-loc", "fmnist-det"))
    with pytest.raises(SystemExit) as e:
        make_data.main(["shapes", "--help"])
    assert e.value.code == 0 and "--num-train" in capsys.readouterr().out


@pytest.mark.parametrize("command,extra", [
    ("shapes", ["--image-size", "64"]),
    ("fmnist-loc", ["--canvas", "32", "--scale", "16", "24"]),
    ("fmnist-det", ["--canvas", "64", "--scale", "18", "30"]),
])
def test_each_set_is_written_and_reproducible(tmp_path, capsys, command, extra):
    fm = write_fake_fashion_mnist(tmp_path / "fm", n_train=20, n_test=40)
    args = ["--num-train", "3", "--num-val", "2", "--seed", "1", *extra]
    if command != "shapes":
        args += ["--root", str(fm)]
    for name in ("a", "b"):
        assert make_data.main([command, "--out", str(tmp_path / name), *args]) == 0
    assert "val_json" in capsys.readouterr().out
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert a == b and "annotations/instances_val.json" in a and "train/000003.png" in a


def test_missing_fashion_mnist_exits_2(tmp_path, capsys):
    assert make_data.main(["fmnist-det", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err
