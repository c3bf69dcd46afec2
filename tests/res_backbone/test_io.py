"""res_backbone.io: atomic writes leave the old file or the whole new one, and no temporary file behind."""
import json

import pytest
import torch

from res_backbone.io import atomic_target, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_create_folders_and_leave_no_temporary(tmp_path):
    atomic_write_text("héllo\n", tmp_path / "a" / "t.txt")
    atomic_write_bytes(b"\x00\x01", tmp_path / "a" / "b.bin")
    atomic_write_json({"x": [1, 2]}, tmp_path / "a" / "j.json", separators=(",", ":"))
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "a" / "c.pt")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "j.json").read_text() == '{"x":[1,2]}'
    assert torch.equal(torch.load(tmp_path / "a" / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "c.pt", "j.json", "t.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json({"ap": 1}, path)
    with pytest.raises(TypeError):
        atomic_write_json({"ap": object()}, path)
    with pytest.raises(RuntimeError), atomic_target(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"ap": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_before_rename_sees_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": 1}, path)
    seen = []
    atomic_torch_save({"v": 2}, path, before_rename=lambda: seen.append(torch.load(path, weights_only=True)["v"]))
    assert seen == [1] and torch.load(path, weights_only=True)["v"] == 2
