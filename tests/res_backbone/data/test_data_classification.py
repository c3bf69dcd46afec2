"""Classification data: the Fashion-MNIST path, ImageFolder trees and their errors, transforms."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from res_backbone.data import ImageDecodeError
from res_backbone.data.classification import (
    ClassificationDataError, ImageFolderClassification, Normalize, RandomHorizontalFlip,
    RandomPadCrop, ResizeCenterCrop, TensorClassification, build_cls_datasets, build_cls_transforms,
)
from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError, write_fake_fashion_mnist


@pytest.fixture
def fake_fmnist(tmp_path):
    return write_fake_fashion_mnist(tmp_path / "fmnist", n_train=40, n_test=20)


def _png(path, size=(30, 20), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    for cls, color in (("cat", (250, 0, 0)), ("dog", (0, 250, 0))):
        for i in range(3):
            _png(root / cls / f"{i}.png", color=color)
    _png(root / "dog" / "nested" / "extra.JPG")  # nested and upper-case extension count
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_fashion_mnist_datasets(fake_fmnist):
    data = build_cls_datasets(data_dir=fake_fmnist)
    assert (len(data.train), len(data.val), data.in_chans, data.source) == (40, 20, 1, "fashion_mnist")
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == 10
    assert data.input_size == (1, 28, 28) and data.mean == (0.2860,)
    image, label = data.val[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 3
    raw = data.val.images[3].float() / 255
    assert torch.allclose(image, (raw - 0.2860) / 0.3530, atol=1e-5)  # eval = normalisation only
    rgb = build_cls_datasets(data_dir=fake_fmnist, in_chans=3, limit_train=8, limit_val=4)
    x, _ = rgb.val[0]
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[2]) and len(rgb.train) == 8 and len(rgb.val) == 4


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        build_cls_datasets(data_dir=tmp_path / "nowhere")


def test_batched_items_equal_single_items(fake_fmnist):
    data = build_cls_datasets(data_dir=fake_fmnist)
    batch = data.val.__getitems__([5, 1, 7])
    for (img, label), i in zip(batch, (5, 1, 7)):
        ref_img, ref_label = data.val[i]
        assert torch.equal(img, ref_img) and label == ref_label
    loader = torch.utils.data.DataLoader(data.train, batch_size=8)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 28, 28) and labels.dtype == torch.int64


def test_pad_crop_is_a_zero_filled_translation_per_image():
    torch.manual_seed(3)
    x = torch.randint(1, 255, (6, 2, 7, 9), dtype=torch.uint8)
    out = RandomPadCrop(4)(x)
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = set()
    for i in range(6):
        hits = [(y, z) for y in range(9) for z in range(9) if torch.equal(out[i], padded[i, :, y:y + 7, z:z + 9])]
        assert hits, f"image {i} is not a crop of its padded self"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets are drawn per image
    assert RandomPadCrop(4)(x[0]).shape == (2, 7, 9)


def test_flip_and_normalize():
    torch.manual_seed(0)
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3)
    always = RandomHorizontalFlip(p=1.0)(x)
    assert torch.equal(always, x.flip(-1)) and torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    norm = Normalize((0.5,), (0.25,))(torch.full((1, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(norm, torch.full((1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="3 channels"):
        Normalize((0.5,), (0.25,))(torch.zeros(3, 2, 2))


def test_image_folder_reads_classes_and_sizes(folder):
    ds = ImageFolderClassification(folder, transform=build_cls_transforms(
        train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=16, crop=12))
    assert ds.classes == ["cat", "dog"] and len(ds) == 7 and ds.targets == [0, 0, 0, 1, 1, 1, 1]
    img, label = ds[0]
    assert img.shape == (3, 12, 12) and label == 0
    assert img[0].mean() > 0.9 and img[1].mean() < -0.9  # red, normalised to about +1 / -1
    grey = ImageFolderClassification(folder, in_chans=1)
    g, _ = grey[0]
    assert g.shape == (1, 20, 30) and abs(float(g.mean()) - round(0.299 * 250) / 255) < 1e-6
    data = build_cls_datasets(train_dir=folder, val_dir=folder, input_size=24, limit_train=4)
    assert data.train[0][0].shape == (3, 24, 24) and data.val[0][0].shape == (3, 24, 24)
    assert len(data.train) == 4 and set(data.train.targets) == {0, 1}  # the limit keeps every class
    assert data.input_size == (3, 24, 24) and data.crop_pct == pytest.approx(24 / 27)


def test_crop_larger_than_image_is_resized_first(folder, caplog):
    ds = ImageFolderClassification(folder, transform=ResizeCenterCrop(resize=16, crop=40))
    img, _ = ds[0]  # the stored image is 30x20
    assert img.shape == (3, 40, 40)
    assert "larger than resize" in caplog.text
    data = build_cls_datasets(train_dir=folder, val_dir=folder, input_size=64, resize=48)
    assert data.val[0][0].shape == (3, 64, 64) and data.train[0][0].shape == (3, 64, 64)


def test_empty_class_folder_is_named(folder):
    (folder / "bird").mkdir()
    (folder / "bird" / "readme.md").write_text("x")
    with pytest.raises(ClassificationDataError, match=r"bird holds no images.*1 other file\(s\) there are ignored"):
        ImageFolderClassification(folder)


def test_folder_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderClassification(tmp_path / "missing")
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    with pytest.raises(ClassificationDataError, match="no class folders.*one sub-folder per class"):
        ImageFolderClassification(flat)
    with pytest.raises(ClassificationDataError, match=r"missing \['bird'\], unexpected \['dog'\]"):
        ImageFolderClassification(folder, classes=["bird", "cat"])
    val = tmp_path / "val"
    _png(val / "cat" / "0.png")
    _png(val / "cow" / "0.png")
    with pytest.raises(ClassificationDataError, match=r"missing \['dog'\], unexpected \['cow'\]"):
        build_cls_datasets(train_dir=folder, val_dir=val)


def test_undecodable_image_names_its_path(folder):
    bad = folder / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    ds = ImageFolderClassification(folder)
    index = [str(p) for p, _ in ds.samples].index(str(bad))
    with pytest.raises(ImageDecodeError, match="broken.png"):
        ds[index]


def test_tensor_dataset_checks_shapes():
    with pytest.raises(ClassificationDataError, match="labels of shape"):
        TensorClassification(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ClassificationDataError, match="uint8"):
        TensorClassification(torch.zeros(4, 8, 8), torch.zeros(4))
    rgb = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    grey = TensorClassification(rgb, torch.tensor([0, 1]), in_chans=1)
    expected = (rgb.float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(1).round() / 255
    assert torch.allclose(grey[1][0][0], expected[1])


def test_random_invert_negates_some_images_of_a_batch():
    from res_backbone.data.cls_transforms import RandomInvert, build_cls_transforms

    torch.manual_seed(0)
    x = torch.rand(200, 1, 4, 4)
    y = RandomInvert(0.5)(x)
    negated = torch.isclose(y, 1 - x).flatten(1).all(1)
    kept = torch.isclose(y, x).flatten(1).all(1)
    assert bool((negated | kept).all()) and 60 < int(negated.sum()) < 140
    u8 = torch.full((3, 2, 2), 10, dtype=torch.uint8)
    assert torch.equal(RandomInvert(1.0)(u8), torch.full_like(u8, 245))
    assert torch.equal(RandomInvert(0.0)(x), x)
    with pytest.raises(ValueError, match="invert"):
        RandomInvert(1.5)
    assert "RandomInvert" in repr(build_cls_transforms(train=True, mean=[0.5], std=[0.5], augment="flip", invert=0.5))
    assert "RandomInvert" not in repr(build_cls_transforms(train=False, mean=[0.5], std=[0.5], invert=0.5))
