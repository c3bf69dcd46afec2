"""tools/analyze_data.py end to end on a tiny json, and bad input (the detection reader's errors, exit 2)."""
import json

import pytest

import analyze_data
from res_backbone.data import CocoDetection
from res_backbone.data.coco import CocoFormatError
from tests.res_backbone.data.test_data_analysis import ann, write_set


@pytest.fixture
def tiny(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 160, "height": 120} for i in range(1, 5)]
    anns = [ann(k, 1 + k % 4, 3, [10 + 7 * k, 10 + 5 * k, 8 + k, 9 + k]) for k in range(12)]
    return write_set(tmp_path / "data", images, anns, [{"id": 3, "name": "dot"}])


def test_end_to_end(tiny, tmp_path, capsys):
    path, root = tiny
    cfg = tmp_path / "det.yaml"
    cfg.write_text("backbone: resnet18\nimage_size: 160\nanchor_sizes: [32, 64, 128, 256, 512]\nlr: 0.02\n")
    out = tmp_path / "out"
    rc = analyze_data.main(["--json", str(path), "--images", str(root), "--output", str(out), "--config", str(cfg),
                            "--aspect-ratios", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "anchor coverage" in printed and "advice:" in printed and "--anchor-sizes" in printed
    report = json.loads((out / "analysis.json").read_text())
    assert report["num_boxes"] == 12 and report["image_size"] == 160
    anchors = report["anchors"]
    assert anchors["detector"] == {"backbone": "resnet18", "arch": "fpn"}
    assert anchors["current"]["anchors"]["aspect_ratios"] == [[1]]  # the flag beat the defaults
    assert anchors["current"]["anchors"]["anchor_sizes"][0] == [32]  # from --config
    assert anchors["fitted"]["coverage"]["iou_0.5"] > anchors["current"]["coverage"]["iou_0.5"]
    for name in ("sizes.png", "aspect.png", "coverage.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize("content", ['{"images": []', '{"images": [], "annotations": []}',
                                     '{"images": [{"id": 1}], "annotations": [], "categories": []}'])
def test_bad_json_gives_the_readers_error(tmp_path, caplog, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CocoFormatError) as reader:
        CocoDetection(path, tmp_path)
    rc = analyze_data.main(["--json", str(path), "--images", str(tmp_path), "--output", str(tmp_path / "o"),
                            "--no-progress"])
    assert rc == 2 and str(reader.value) in caplog.text and str(path) in caplog.text


def test_missing_json_and_bad_flags(tmp_path, caplog):
    rc = analyze_data.main(["--json", str(tmp_path / "none.json"), "--images", str(tmp_path), "--output", str(tmp_path)])
    assert rc == 2 and "annotation file not found" in caplog.text and "none.json" in caplog.text
    rc = analyze_data.main(["--json", str(tmp_path / "none.json"), "--images", str(tmp_path), "--output", str(tmp_path),
                            "--anchor-sizes", "auto", "16"])
    assert rc == 2 and "stands alone" in caplog.text


def test_a_set_without_boxes_is_reported_not_crashed(tmp_path, capsys):
    path, root = write_set(tmp_path / "data", [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}], [],
                           [{"id": 1, "name": "x"}])
    rc = analyze_data.main(["--json", str(path), "--images", str(root), "--output", str(tmp_path / "o"),
                            "--image-size", "auto", "--no-progress"])
    assert rc == 0 and "classes without any box: ['x']" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "analysis.json").read_text())["anchors"]["current"]["coverage"]["boxes"] == 0
