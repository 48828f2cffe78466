"""Which model a command works on: the shipped embedded default, never silent training; --train-default opts in
(cached per data identity, validated, retrained when stale, resumed after an interruption); the data follows the
checkpoint, and a model whose classes do not fit the default data says what to pass."""
import gzip
import struct
import time

import numpy as np
import pytest
import torch

import compress.training.default_model as dm
from compress.errors import UserError
from compress.io import HOME_ENV
from compress.models.checkpoint import read_checkpoint, save_checkpoint
from compress.models.default import shipped
from compress.models.mobilenetv3 import mobilenet_v3_small
from compress.training.train import TrainConfig

TINY = TrainConfig(epochs=2, batch_size=32, lr=5e-3, limit_train=128, limit_test=64, seed=0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.setattr(dm, "DEFAULT_TRAIN", TINY)
    return tmp_path


def no_training(*a, **k):
    raise AssertionError("nothing may be trained here")


def _fake_fashion_mnist(root, seed=0, n_train=300, n_test=100):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        imgs = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 28, 28) + imgs.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + labels.tobytes())
    return root


def test_no_weights_means_the_shipped_default_and_no_training(home, monkeypatch):
    monkeypatch.setattr(dm, "train", no_training)
    s = shipped()
    loaded, source = dm.resolve_model()
    assert (loaded.spec.arch, loaded.spec.num_classes, source.name) == (s.arch, s.num_classes, s.dataset)
    assert source.preprocess.input_size == (s.input_size, s.input_size)
    assert not (home / "models").exists()  # nothing cached: the package holds it
    # latency work on synthetic data uses the same weights, at any input size
    loaded, source = dm.resolve_model(dataset="synthetic", input_size=64)
    assert loaded.spec.arch == s.arch and source.kind == "synthetic" and source.preprocess.input_size == (64, 64)


@pytest.mark.parametrize("kw", ["other-arch", {"input_size": 224}], ids=["other-arch", "other-size"])
def test_any_other_default_is_refused_within_seconds(home, monkeypatch, kw):
    monkeypatch.setattr(dm, "train", no_training)
    if kw == "other-arch":
        kw = {"arch": next(a for a in ("mobilenet_v3_small", "mobilenet_v3_large") if a != shipped().arch)}
    t = time.time()
    with pytest.raises(UserError) as e:
        dm.resolve_model(**kw)
    msg = str(e.value)
    assert time.time() - t < 30 and "\n" not in msg
    for phrase in ("--weights", "--random-init", "--train-default", "min on this machine", "embedded default is"):
        assert phrase in msg, (phrase, msg)


def test_train_default_trains_once_per_data_identity_then_reuses_it(home, tmp_path, monkeypatch):
    a = _fake_fashion_mnist(tmp_path / "a", seed=0)
    b = _fake_fashion_mnist(tmp_path / "b", seed=1)
    m1, s1 = dm.resolve_model(arch="mobilenet_v3_small", dataset=f"fashion-mnist:{a}", train_default=True,
                              progress=False)
    assert s1.name == f"fashion-mnist:{a.resolve()}" and m1.meta["dataset"] == s1.name
    assert m1.meta["dataset_fingerprint"] == s1.fingerprint and m1.meta["cache_format"] == dm.CACHE_FORMAT
    m2, s2 = dm.resolve_model(arch="mobilenet_v3_small", dataset=f"fashion-mnist:{b}", train_default=True,
                              progress=False)
    assert s2.fingerprint != s1.fingerprint  # another directory is other data: its own cache
    assert dm.default_checkpoint_path("mobilenet_v3_small", s1) != dm.default_checkpoint_path("mobilenet_v3_small", s2)
    assert len(list((home / "models").glob("*.pt"))) == 2
    monkeypatch.setattr(dm, "train", no_training)
    again, _ = dm.resolve_model(arch="mobilenet_v3_small", dataset=f"fashion-mnist:{a}", train_default=True)
    assert again.meta["dataset"] == s1.name and again.meta["epoch"] == 2  # reused, not retrained


@pytest.mark.parametrize("stale", ["recipe", "format", "data"])
def test_a_stale_cached_default_is_retrained_with_a_notice(home, tmp_path, monkeypatch, capsys, stale):
    data = _fake_fashion_mnist(tmp_path / "d")
    spec = f"fashion-mnist:{data}"
    dm.resolve_model(arch="mobilenet_v3_small", dataset=spec, train_default=True, progress=False)
    path = next((home / "models").glob("*.pt"))
    state = read_checkpoint(path)
    if stale == "recipe":
        state["train_config"] = {**state["train_config"], "lr": 1.0}
    elif stale == "format":
        state["cache_format"] = dm.CACHE_FORMAT - 1
    else:
        state["dataset_fingerprint"] = "0" * 12
    torch.save(state, path)
    capsys.readouterr()
    loaded, _ = dm.resolve_model(arch="mobilenet_v3_small", dataset=spec, train_default=True, progress=True)
    out = capsys.readouterr().out
    assert "Notice: the cached default" in out and "is stale" in out
    fresh = read_checkpoint(path)
    assert fresh["train_config"]["lr"] == TINY.lr and fresh["cache_format"] == dm.CACHE_FORMAT


def test_interrupted_training_resumes_from_the_side_file(home, tmp_path, monkeypatch, capsys):
    import compress.training.train as tr

    spec = f"fashion-mnist:{_fake_fashion_mnist(tmp_path / 'd')}"
    real_save = tr.save_checkpoint

    def save_then_interrupt(*a, **k):  # Ctrl-C right after the first epoch's checkpoint
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dm.resolve_model(arch="mobilenet_v3_small", dataset=spec, train_default=True, progress=False)
    partial = next((home / "models").glob("*.partial.pt"))
    first = read_checkpoint(partial)
    assert first["epoch"] == 1 and not [p for p in (home / "models").glob("*.pt") if p != partial]
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    loaded, _ = dm.resolve_model(arch="mobilenet_v3_small", dataset=spec, train_default=True, progress=True)
    assert "resuming" in capsys.readouterr().out
    assert loaded.meta["epoch"] == 2 and [h["epoch"] for h in loaded.meta["history"]] == [1, 2]
    assert loaded.meta["history"][0] == first["history"][0] and not partial.exists()


def test_the_data_follows_the_checkpoint_and_a_misfit_says_what_to_pass(home, tmp_path):
    data = _fake_fashion_mnist(tmp_path / "d")
    mine = save_checkpoint(tmp_path / "mine.pt", mobilenet_v3_small(num_classes=10), input_size=16,
                           dataset=f"fashion-mnist:{data.resolve()}")
    _, source = dm.resolve_model(mine)
    assert source.name == f"fashion-mnist:{data.resolve()}" and source.preprocess.input_size == (16, 16)
    imagenet = tmp_path / "tv.pth"
    torch.save(mobilenet_v3_small(num_classes=1000).state_dict(), imagenet)
    with pytest.raises(UserError) as e:
        dm.resolve_model(imagenet)
    msg = str(e.value)
    assert "1000 classes" in msg and "the default dataset" in msg and "--dataset imagefolder:PATH" in msg
    assert "--dataset synthetic" in msg and "\n" not in msg
    _, synthetic = dm.resolve_model(imagenet, dataset="synthetic")
    assert synthetic.kind == "synthetic" and synthetic.preprocess.input_size == (224, 224)
    gone = save_checkpoint(tmp_path / "gone.pt", mobilenet_v3_small(num_classes=10), dataset="fashion-mnist:/nope")
    with pytest.raises(UserError, match="was trained on fashion-mnist:/nope, which cannot be opened here"):
        dm.resolve_model(gone)
