"""Datasets: Fashion-MNIST from the idx files, ImageFolder via Pillow, synthetic; one preprocessing each."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from calibration.datasets import FASHION_MNIST_ENV, load_fashion_mnist, open_dataset
from calibration.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from compress.errors import UserError


def test_fashion_mnist_splits_and_preprocessing():
    ds = open_dataset("fashion-mnist", 32)
    assert len(ds.split("train")) == 60000 and len(ds.split("test")) == 10000
    x, y = next(iter(ds.loader("test", batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale replicated
    images, labels = load_fashion_mnist(ds_root(), "test")
    assert labels[:8].tolist() == y.tolist()
    # the first pixel of the first image, by hand: resize 28->32 keeps the corner close; check normalization range
    lo = (0 - 0.2860) / 0.3530
    hi = (1 - 0.2860) / 0.3530
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5


def ds_root():
    import os

    from calibration.datasets import FASHION_MNIST_DIR
    return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


def test_fashion_mnist_path_override_and_missing(tmp_path, monkeypatch):
    # a tiny idx set in a custom folder
    for prefix, n in (("train", 5), ("t10k", 3)):
        imgs = np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 28, 28) + imgs.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + np.arange(n, dtype=np.uint8).tobytes())
    assert len(open_dataset(f"fashion-mnist:{tmp_path}").split("train")) == 5
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert len(open_dataset("fashion-mnist").split("test")) == 3
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        open_dataset("fashion-mnist")


def _png(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_train_val_resize_crop_normalize(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "cat" / "a.png", (255, 0, 0))
        _png(tmp_path / split / "dog" / "b.png", (0, 0, 255), size=(30, 50))
    ds = open_dataset(f"imagefolder:{tmp_path}", 24)
    assert ds.num_classes == 2 and list(ds.class_names) == ["cat", "dog"]
    assert ds.preprocess.resize == round(24 / 0.875)
    x, y = next(iter(ds.loader("test", batch_size=2)))
    assert x.shape == (2, 3, 24, 24) and y.tolist() == [0, 1]
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0].mean((1, 2)), red, atol=1e-4, rtol=0)


def test_flat_imagefolder_holds_out_every_tenth_image(tmp_path):
    for i in range(20):
        _png(tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.png", (i, i, i))
    ds = open_dataset(f"imagefolder:{tmp_path}", 16)
    assert len(ds.split("test")) == 2 and len(ds.split("train")) == 18


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        open_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        open_dataset(f"imagefolder:{tmp_path / 'noimg'}")
    with pytest.raises(UserError, match="needs a path"):
        open_dataset("imagefolder")
    with pytest.raises(UserError, match="unknown dataset"):
        open_dataset("cifar10")


def test_synthetic_has_no_labels_and_is_deterministic():
    ds = open_dataset("synthetic", 32)
    assert not ds.has_labels and ds.num_classes is None
    a, ya = next(iter(ds.loader("test", batch_size=4)))
    b, _ = next(iter(open_dataset("synthetic", 32).loader("test", batch_size=4)))
    assert torch.equal(a, b) and (ya == -1).all() and a.shape == (4, 3, 32, 32)


def test_preprocess_json_round_trip_and_torchvision_style_resize():
    p = Preprocess((4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize=6)
    assert Preprocess.from_json(p.to_json()) == p
    img = np.zeros((1, 6, 12, 3), dtype=np.uint8)
    img[:, :, 4:8] = 255  # a bright vertical band in the middle columns
    out = p(img)
    assert out.shape == (1, 3, 4, 4)  # shorter side 6 kept, center crop 4x4 of the 6x12 image
    assert torch.allclose(out, torch.ones_like(out))  # the crop sees only the band (columns 4..7)
