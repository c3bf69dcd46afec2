import pytest

from heads.meta import MetaError, dumps, loads, model_meta

DET = {"task": "detection", "arch": "resnet18", "config": {"image_size": 256}, "cat_ids": [3, 7],
       "class_names": ["cat", "dog"], "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
       "library_version": "1.2.3"}
CLS = {"task": "classification", "model_name": "resnet20", "classes": ["a", "b", "c"],
       "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1], "input_size": [3, 32, 32], "crop_pct": 0.9,
                          "interpolation": "bicubic"}}
LOC = {"task": "localization", "model_name": "resnet18", "classes": ["x"], "cat_ids": [11], "image_size": 96}


def test_detection_meta_round_trips_through_json():
    meta = model_meta(DET)
    assert meta == {"task": "detection", "arch": "resnet18", "num_classes": 2, "cat_ids": [3, 7],
                    "class_names": ["cat", "dog"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 256,
                    "library_version": "1.2.3", "crop_pct": None, "interpolation": None}
    assert loads(dumps(meta), source="m.onnx", expect_task="detection") == meta


def test_classification_and_localization_meta():
    cls = model_meta(CLS)
    assert (cls["num_classes"], cls["cat_ids"], cls["image_size"], cls["mean"]) == (3, None, 32, [0.1, 0.2, 0.3])
    assert (cls["crop_pct"], cls["interpolation"]) == (0.9, "bicubic")  # exported classifiers crop as evaluation
    loc = model_meta(LOC)
    assert (loc["cat_ids"], loc["image_size"], loc["mean"]) == ([11], 96, [0.485, 0.456, 0.406])


def test_bad_checkpoints_name_the_file_and_the_field():
    with pytest.raises(MetaError, match="model.pt: not a train_det"):
        model_meta({"model": {}}, source="model.pt")
    with pytest.raises(MetaError, match="lacks cat_ids"):
        model_meta({**DET, "cat_ids": None}, source="d.pt")
    with pytest.raises(MetaError, match="2 category ids but 1 class names"):
        model_meta({**DET, "class_names": ["cat"]}, source="d.pt")


def test_exported_metadata_errors():
    with pytest.raises(MetaError, match="f.onnx: no 'res_backbone_meta'"):
        loads(None, source="f.onnx")
    with pytest.raises(MetaError, match="not JSON"):
        loads("{", source="f.onnx")
    with pytest.raises(MetaError, match="a detection model, but a classification model is expected"):
        loads(dumps(model_meta(DET)), source="f.onnx", expect_task="classification")
