"""The embedded default: trained on first use into a side file, cached, resumed after an interruption."""
import pytest

import compress.training.default_model as dm
from compress.errors import UserError
from compress.io import HOME_ENV
from compress.models.checkpoint import read_checkpoint
from compress.training.train import TrainConfig

TINY = TrainConfig(epochs=2, batch_size=32, lr=5e-3, limit_train=128, limit_test=64, seed=0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.setattr(dm, "DEFAULT_TRAIN", TINY)
    return tmp_path


def test_trained_once_then_cached(home, monkeypatch):
    loaded = dm.default_model(progress=False)
    path = home / "models" / "mobilenet_v3_small_fashion-mnist_32.pt"
    assert path.is_file() and not list(path.parent.glob("*.partial.pt"))
    assert loaded.meta["epoch"] == 2 and loaded.meta["input_size"] == 32 and loaded.spec.num_classes == 10

    def no_training(*a, **k):
        raise AssertionError("the cached model must not be retrained")

    monkeypatch.setattr(dm, "train", no_training)
    assert dm.default_model(progress=False).meta["epoch"] == 2


def test_interrupted_training_resumes_from_the_side_file(home, monkeypatch, capsys):
    import compress.training.train as tr

    real_save = tr.save_checkpoint

    def save_then_interrupt(*a, **k):  # Ctrl-C right after the first epoch's checkpoint
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model(progress=False)
    partial = home / "models" / "mobilenet_v3_small_fashion-mnist_32.partial.pt"
    first = read_checkpoint(partial)
    assert first["epoch"] == 1 and not (home / "models" / "mobilenet_v3_small_fashion-mnist_32.pt").exists()
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    loaded = dm.default_model(progress=True)
    assert "resuming" in capsys.readouterr().out
    assert loaded.meta["epoch"] == 2 and [h["epoch"] for h in loaded.meta["history"]] == [1, 2]
    assert loaded.meta["history"][0] == first["history"][0]
    assert not partial.exists()


def test_no_default_for_other_widths(home):
    with pytest.raises(UserError, match="--weights"):
        dm.resolve_model(width_mult=0.75)
