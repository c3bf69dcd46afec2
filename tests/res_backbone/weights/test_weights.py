"""The weights catalogue against the installed torchvision and timm; identification and conversion.

Every file here is a randomly initialised model saved by torchvision or timm itself; nothing is
downloaded (HF_HUB_OFFLINE=1 in conftest).
"""
import hashlib
import json
import shutil

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from torchvision.models import resnet as tvr

import res_backbone as rb
from res_backbone.weights.cache import find_local, hf_blob_digest, resolve
from res_backbone.weights.catalogue import (
    WEIGHTS,
    entries_by_digest,
    entries_by_filename,
    entries_for,
    get_entry,
    hash_prefix_of,
)
from res_backbone.weights.convert import convert_weights
from res_backbone.weights.files import CheckpointMismatchError, UnreadableWeightsError
from res_backbone.weights.identify import describe_checkpoint, fitting_archs, identify, verify_file
from res_backbone.weights.testing import write_fake_timm_cache

TV_ROWS = [e for e in WEIGHTS if e.source == "torchvision"]
TIMM_ROWS = [e for e in WEIGHTS if e.source == "timm"]
DEPTHS = (18, 34, 50, 101, 152)


# ---------------------------------------------------------------------- the table vs the libraries
@pytest.mark.parametrize("e", TV_ROWS, ids=lambda e: e.name)
def test_torchvision_rows_equal_torchvision_enums(e):
    w = getattr(tvr, e.label.split(".")[0])[e.tv_weights]
    assert w.url == e.url and w.url.endswith("/" + e.filename)
    prefix = e.filename.rsplit("-", 1)[1][:8]
    assert hash_prefix_of(e.filename) == prefix and e.hash_prefixes == {e.filename: prefix}
    metrics = w.meta["_metrics"]["ImageNet-1K"]
    assert (metrics["acc@1"], metrics["acc@5"]) == (e.top1, e.top5) and e.metrics_by == "torchvision"
    t = w.transforms()
    assert t.crop_size == [e.input_size[-1]] and t.crop_size[0] == e.eval_size
    assert abs(t.crop_size[0] / t.resize_size[0] - e.crop_pct) < 1e-9
    assert t.interpolation.value == e.interpolation
    assert tuple(t.mean) == e.mean and tuple(t.std) == e.std
    assert len(w.meta["categories"]) == e.num_classes
    # timm re-hosts the same file on the hub: same URL in its cfg, the repo we look in
    cfg = get_pretrained_cfg(e.name)
    assert cfg.url == e.url and cfg.hf_hub_id == e.hf_repo


def test_every_torchvision_resnet_weight_is_catalogued():
    for depth in DEPTHS:
        for member in getattr(tvr, f"ResNet{depth}_Weights"):
            assert get_entry(f"resnet{depth}.{member.name}").url == member.url


@pytest.mark.parametrize("e", TIMM_ROWS, ids=lambda e: e.name)
def test_timm_rows_equal_timm_pretrained_cfgs(e):
    cfg = get_pretrained_cfg(e.name)
    assert cfg.hf_hub_id == e.hf_repo and e.url == "https://huggingface.co/" + e.hf_repo
    assert cfg.url.rsplit("/", 1)[1] == e.legacy_filename and hash_prefix_of(e.legacy_filename)
    assert (cfg.input_size, cfg.test_input_size) == (e.input_size, e.test_input_size)
    assert (cfg.crop_pct, cfg.test_crop_pct, cfg.interpolation) == (e.crop_pct, e.test_crop_pct, e.interpolation)
    assert (tuple(cfg.mean), tuple(cfg.std), cfg.num_classes) == (e.mean, e.std, e.num_classes)
    assert cfg.license == e.license
    # timm publishes its accuracy at the test size with the test crop; top-5 above top-1
    assert e.eval_size == cfg.test_input_size[-1] and e.eval_crop_pct == cfg.test_crop_pct
    assert 70 < e.top1 < e.top5 < 100


def test_every_timm_a1_and_a1h_weight_is_catalogued():
    names = [n for d in DEPTHS for n in timm.list_pretrained(f"resnet{d}.a1*_in1k")]
    assert "resnet50.a1h_in1k" in names
    assert sorted(names) == sorted(e.name for e in TIMM_ROWS)


def test_parameter_names_are_identical_in_the_three_libraries():
    """Why conversion renames nothing: torchvision, timm and ours share every key and shape."""
    for arch in ("resnet18", "resnet50"):
        with torch.device("meta"):
            shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (
                getattr(torchvision.models, arch)(), timm.create_model(arch), rb.create_model(arch))]
        assert list(shapes[0]) == list(shapes[1]) == list(shapes[2]) and shapes[0] == shapes[1] == shapes[2]


def test_lookups():
    assert get_entry("resnet50.IMAGENET1K_V2") is get_entry("resnet50.tv2_in1k")
    assert get_entry("resnet50.IMAGENET1K_V2").filename == "resnet50-11ad3fa6.pth"
    with pytest.raises(KeyError, match="resnet34.tv_in1k, resnet34.a1_in1k"):
        get_entry("resnet34.tv2_in1k")
    assert [e.name for e in entries_by_digest("f37072fd" + "0" * 56)] == ["resnet18.tv_in1k"]
    assert [e.name for e in entries_by_filename("resnet50_a1_0-14fe96d1.pth")] == ["resnet50.a1_in1k"]
    assert entries_by_filename("model.safetensors") == []
    assert [e.tag for e in entries_for("resnet50")] == ["tv2_in1k", "tv_in1k", "a1_in1k", "a1h_in1k"]
    assert hash_prefix_of("resnet50-0676ba61.pth") == "0676ba61" and hash_prefix_of("resnet50.pth") is None


# ---------------------------------------------------------------------- more places to find weights
def test_timm_hub_copy_of_torchvision_weights_and_enum_tag(tmp_torch_home, tmp_path):
    """timm's re-hosted ``timm/resnet18.tv_in1k`` is found for torchvision's entry, by either tag name."""
    tv = torchvision.models.resnet18().eval()
    snap = tmp_path / "hf_cache" / "models--timm--resnet18.tv_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file(tv.state_dict(), str(snap / "model.safetensors"))
    path, cfg = resolve("resnet18", "IMAGENET1K_V1")
    assert path == snap / "model.safetensors" and cfg["tag"] == "tv_in1k"
    m = rb.create_model("resnet18", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), tv(x))


def test_legacy_timm_release_file_in_torch_hub(tmp_torch_home):
    """timm < 0.9 cached ``resnet18_a1_0-d63eafa0.pth`` under torch hub; it counts as a1_in1k."""
    path = tmp_torch_home / "hub" / "checkpoints" / "resnet18_a1_0-d63eafa0.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    assert find_local(get_entry("resnet18.a1_in1k")) == path
    assert rb.create_model("resnet18", pretrained="a1_in1k").pretrained_cfg["interpolation"] == "bicubic"


# ---------------------------------------------------------------------- identification
def test_fitting_archs_by_keys_and_shapes():
    with torch.device("meta"):
        sd18, sd50 = torchvision.models.resnet18().state_dict(), torchvision.models.resnet50().state_dict()
        wide = torchvision.models.wide_resnet50_2().state_dict()
        cifar = rb.create_model("resnet20").state_dict()
    assert fitting_archs(sd18) == ["resnet18"] and fitting_archs(sd50) == ["resnet50"]
    assert fitting_archs({"module." + k: v for k, v in sd50.items()}) == ["resnet50"]
    assert fitting_archs(wide) == []  # same depths and blocks as resnet50, twice the width
    assert fitting_archs(cifar) == ["resnet20", "plain20"]  # option-A shortcuts hold no parameters
    assert fitting_archs({"weight": torch.zeros(1)}) == []


def test_describe_detector_style_prefix(tmp_path):
    sd = {"backbone.body." + k: v for k, v in torchvision.models.resnet18().state_dict().items()}
    sd["roi_heads.box.weight"] = torch.zeros(2, 2)
    torch.save({"model": sd, "iteration": 3}, tmp_path / "det.pth")
    info, clean, _ = describe_checkpoint(tmp_path / "det.pth")
    assert info.prefix == "backbone.body." and info.ignored == 1 and info.archs == ["resnet18"]
    assert info.num_params == 11_689_512 and "conv1.weight" in clean  # torchvision's resnet18 count


def test_hf_blob_is_checked_against_its_sha256_name(tmp_path):
    snap = write_fake_timm_cache(tmp_path / "hub", ["resnet18"])["resnet18.a1_in1k"]
    digest = hf_blob_digest(snap)
    assert digest == hashlib.sha256(snap.read_bytes()).hexdigest()
    rep = verify_file(snap)
    assert rep.status == "match" and rep.exit_code == 0
    assert rep.by_name and "resnet18.a1_in1k" in rep.by_name[0] and rep.info["archs"] == ["resnet18"]
    assert identify(snap, rep.sha256)[0].name == "resnet18.a1_in1k"
    blob = snap.resolve()
    blob.chmod(0o644)
    with open(blob, "ab") as f:  # a damaged download: the blob no longer hashes to its name
        f.write(b"\0")
    rep = verify_file(snap, load=False)
    assert rep.status == "mismatch" and rep.exit_code == 1


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pth")
    for name in ("junk.pth", "list.pth", "missing.pth"):
        rep = verify_file(tmp_path / name)
        assert rep.error and rep.exit_code == 2, name
    with pytest.raises(UnreadableWeightsError, match="list.pth: no state dict found"):
        describe_checkpoint(tmp_path / "list.pth")


# ---------------------------------------------------------------------- conversion
def test_res_backbone_safetensors_records_layout_arch_and_cfg(tmp_path):
    """(The tv -> timm -> safetensors -> ours logits round trip is in tests/tools/test_weights_tool.py.)"""
    from safetensors import safe_open

    tv = torchvision.models.resnet18(num_classes=7).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}}, tmp_path / "ddp.pth")
    res = convert_weights(tmp_path / "ddp.pth", tmp_path / "ours.safetensors", to="res_backbone")
    assert res.arch == "resnet18" and res.weights is None and "122 tensors equal" in res.checks[0]
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(tv.state_dict())  # prefix gone, names unchanged
    assert meta["format"] == "pt" and meta["layout"] == "res_backbone" and meta["arch"] == "resnet18"
    assert meta["source"] == "ddp.pth" and json.loads(meta["model_kwargs"]) == {"num_classes": 7, "in_chans": 3}
    assert json.loads(meta["pretrained_cfg"])["num_classes"] == 7
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(rb.create_model("resnet18", num_classes=7, pretrained=tmp_path / "ours.safetensors").eval()(x), tv(x))


def test_convert_carries_the_catalogue_data_config(tmp_path):
    """A file identified as timm's a1_in1k (by its hub path) keeps bicubic / 288 test size."""
    snap = write_fake_timm_cache(tmp_path / "hub", ["resnet18"])["resnet18.a1_in1k"]
    res = convert_weights(snap, tmp_path / "a1.safetensors", to="res_backbone")
    assert res.weights == "resnet18.a1_in1k"
    m = rb.create_model("resnet18", pretrained=tmp_path / "a1.safetensors")
    assert m.pretrained_cfg["interpolation"] == "bicubic" and list(m.pretrained_cfg["test_input_size"]) == [3, 288, 288]


def test_convert_errors_name_file_and_key(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointMismatchError, match=r"r18.pth does not fit --arch resnet34: missing layer1.2"):
        convert_weights(tmp_path / "r18.pth", tmp_path / "o.pth", arch="resnet34")
    shapes = r"layer1.0.conv1.weight: file \(64, 64, 3, 3\) vs resnet50 \(64, 64, 1, 1\)"
    with pytest.raises(CheckpointMismatchError, match=shapes):
        convert_weights(tmp_path / "r18.pth", tmp_path / "o.pth", arch="resnet50")
    with pytest.raises(ValueError, match="unknown output suffix '.txt'"):
        convert_weights(tmp_path / "r18.pth", tmp_path / "o.txt")
    with pytest.raises(ValueError, match="would overwrite the input"):
        convert_weights(tmp_path / "r18.pth", tmp_path / "r18.pth", overwrite=True)
    shutil.copy(tmp_path / "r18.pth", tmp_path / "taken.pth")
    with pytest.raises(FileExistsError, match="taken.pth exists"):
        convert_weights(tmp_path / "r18.pth", tmp_path / "taken.pth")
    rb_ckpt = tmp_path / "cifar.pth"
    torch.save(rb.create_model("resnet20", num_classes=10).state_dict(), rb_ckpt)
    with pytest.raises(CheckpointMismatchError, match="fit resnet20, plain20 alike; pass --arch"):
        convert_weights(rb_ckpt, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="torchvision has no 'resnet20'"):
        convert_weights(rb_ckpt, tmp_path / "c.pth", arch="resnet20")
    assert not (tmp_path / "c.pth").exists()  # refused before writing
    res = convert_weights(rb_ckpt, tmp_path / "c.pth", arch="resnet20", to="res_backbone")
    assert res.pretrained_cfg["mean"] == [0.4914, 0.4822, 0.4465]  # the registry's CIFAR default
    grey = tmp_path / "grey.pth"
    torch.save(rb.create_model("resnet18", in_chans=1).state_dict(), grey)
    with pytest.raises(ValueError, match="takes 3 input channels, the weights have 1"):
        convert_weights(grey, tmp_path / "g.pth", to="torchvision")
    assert convert_weights(grey, tmp_path / "g.safetensors", to="timm").checks
