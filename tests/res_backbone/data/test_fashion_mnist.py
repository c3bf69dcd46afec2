"""The Fashion-MNIST idx reader: round trips, the install message, malformed files named."""
import gzip

import numpy as np
import pytest

from res_backbone.data.fashion_mnist import (
    FashionMNISTNotFoundError,
    IdxFormatError,
    load_fashion_mnist,
    read_idx,
    write_fake_fashion_mnist,
    write_idx,
)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", arr)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_fake_set_in_real_layout(tmp_path, monkeypatch):
    folder = write_fake_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10)
    images, labels = load_fashion_mnist("train", folder)
    assert images.shape == (20, 28, 28) and str(images.dtype) == "torch.uint8"
    assert labels.tolist() == [i % 10 for i in range(20)]
    monkeypatch.setenv("RB_FASHION_MNIST", str(folder))
    images, labels = load_fashion_mnist("test", limit=4)
    assert images.shape == (4, 28, 28) and labels.tolist() == [0, 1, 2, 3]


def test_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError, match="apt-get install -y dataset-fashion-mnist") as err:
        load_fashion_mnist("train", tmp_path / "nowhere")
    assert "train-images-idx3-ubyte" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", tmp_path)


def test_malformed_files_are_named(tmp_path):
    bad_magic = tmp_path / "x-idx1-ubyte"
    bad_magic.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(IdxFormatError, match="not an idx file") as err:
        read_idx(bad_magic)
    assert str(bad_magic) in str(err.value)
    truncated = tmp_path / "t-idx3-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") * 3 + b"\0" * 10)
    with pytest.raises(IdxFormatError, match=r"\(5, 5, 5\) needs 141"):
        read_idx(truncated)
    wrong_type = tmp_path / "f-idx1-ubyte"
    wrong_type.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\0" * 4)
    with pytest.raises(IdxFormatError, match="0x0d"):
        read_idx(wrong_type)
    broken_gz = tmp_path / "b-idx1-ubyte.gz"
    broken_gz.write_bytes(gzip.compress(b"\0\0\x08\x01" + b"\0" * 100)[:20])
    with pytest.raises(IdxFormatError, match="cannot be read"):
        read_idx(broken_gz)


def test_labels_out_of_range_and_count_mismatch(tmp_path):
    folder = write_fake_fashion_mnist(tmp_path, n_train=10, n_test=10)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 12))
    with pytest.raises(IdxFormatError, match="label 12"):
        load_fashion_mnist("test", folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(IdxFormatError, match="same N"):
        load_fashion_mnist("test", folder)
