"""Training: a short run on a Fashion-MNIST subset lowers the loss; resume continues the epoch count."""
import pytest
import torch

from calibration.datasets import open_dataset
from compress.errors import UserError
from compress.models.checkpoint import load_model, read_checkpoint
from compress.training.train import TrainConfig, augment, evaluate, train

SMALL = dict(arch="mobilenet_v3_small", width_mult=0.5, dataset="fashion-mnist", input_size=32, progress=False)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=32, lr=5e-3, limit_train=1024, limit_test=256, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "a.pt"
    return out, train(output=out, config=_cfg(), **SMALL)


def test_short_training_lowers_the_loss(run):
    out, result = run
    source = open_dataset("fashion-mnist", 32)
    untrained = load_model(None, "mobilenet_v3_small", 0.5, num_classes=10).model
    before = evaluate(untrained, source, limit=256)
    after = evaluate(load_model(out).model, source, limit=256)
    assert after["loss"] < before["loss"] - 0.2
    assert after["top1"] > 0.35  # chance is 0.1
    h = result["history"]
    assert h[1]["train_loss"] < h[0]["train_loss"]


def test_checkpoint_holds_what_resume_needs(run):
    out, _ = run
    ck = read_checkpoint(out)
    for key in ("state_dict", "arch", "width_mult", "minimalistic", "num_classes", "input_size", "dataset",
                "epoch", "optimizer", "scheduler", "history"):
        assert key in ck, key
    assert ck["epoch"] == 2 and ck["input_size"] == 32 and ck["dataset"] == "fashion-mnist"


def test_resume_continues_the_epoch_count(run, tmp_path):
    out, _ = run
    res = train(resume=str(out), output=tmp_path / "b.pt", config=_cfg(epochs=3), progress=False)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert read_checkpoint(tmp_path / "b.pt")["epoch"] == 3
    with pytest.raises(UserError, match="already has 3 epochs"):
        train(resume=str(tmp_path / "b.pt"), output=tmp_path / "c.pt", config=_cfg(epochs=3), progress=False)


def test_same_seed_same_weights(tmp_path):
    cfg = _cfg(epochs=1, limit_train=128)
    a = train(output=tmp_path / "a.pt", config=cfg, **SMALL)
    b = train(output=tmp_path / "b.pt", config=cfg, **SMALL)
    sa, sb = read_checkpoint(tmp_path / "a.pt")["state_dict"], read_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["final"]["test_top1"] == b["final"]["test_top1"]


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = augment(x, pad=0, hflip=False, gen=g)
    assert torch.equal(x, y)
    y = augment(x, pad=2, hflip=True, gen=g)
    assert y.shape == x.shape and not torch.equal(x, y)


def test_synthetic_data_cannot_train(tmp_path):
    with pytest.raises(UserError, match="labels"):
        train(output=tmp_path / "s.pt", config=_cfg(epochs=1), arch="mobilenet_v3_small", dataset="synthetic",
              input_size=32, num_classes=10, progress=False)
