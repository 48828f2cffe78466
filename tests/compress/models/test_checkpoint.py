"""Loading weights: torchvision layout unchanged, our checkpoints, inferred classes, mismatches, unsafe pickles."""
import pickle

import pytest
import torch

from compress.errors import UserError
from compress.models.checkpoint import load_model, save_checkpoint
from compress.models.mobilenetv3 import mobilenet_v3_large, mobilenet_v3_small


def test_torchvision_state_dict_loads_unchanged_and_infers_classes(tmp_path):
    src = mobilenet_v3_small(num_classes=13).eval()
    path = tmp_path / "tv.pth"
    torch.save(src.state_dict(), path)
    loaded = load_model(path, arch="mobilenet_v3_small")
    assert loaded.source == "torchvision" and loaded.spec.num_classes == 13
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), src(x), rtol=0, atol=0)


def test_ddp_prefix_and_wrapper_are_unwrapped(tmp_path):
    src = mobilenet_v3_small(num_classes=4)
    path = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    loaded = load_model(path)
    assert torch.equal(loaded.model.features[0][0].weight, src.features[0][0].weight)


def test_own_checkpoint_restores_architecture_and_meta(tmp_path):
    src = mobilenet_v3_large(width_mult=0.75, num_classes=10)
    path = save_checkpoint(tmp_path / "ours.pt", src, input_size=48, dataset="fashion-mnist", epoch=3)
    loaded = load_model(path)  # no arch given: it comes from the checkpoint
    assert loaded.source == "mnv3-compress"
    assert loaded.spec == src.spec
    assert loaded.meta["input_size"] == 48 and loaded.meta["epoch"] == 3
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_a_contradicting_option_says_what_the_weights_are(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(mobilenet_v3_small(num_classes=10).state_dict(), path)
    with pytest.raises(UserError) as e:
        load_model(path, arch="mobilenet_v3_large")
    msg = str(e.value)
    assert "are mobilenet_v3_small width 1, 10 classes; --arch mobilenet_v3_large contradicts them" in msg
    assert "\n" not in msg


def test_weights_that_do_not_fit_their_recorded_architecture_name_the_first_keys(tmp_path):
    model = mobilenet_v3_small(num_classes=10)
    sd = model.state_dict()
    sd["features.1.block.0.0.weight"] = sd["features.1.block.0.0.weight"][:8]
    path = save_checkpoint(tmp_path / "ours.pt", model)
    state = torch.load(path, weights_only=True)
    state["state_dict"] = sd
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        load_model(path)
    msg = str(e.value)
    assert "do not fit their recorded architecture" in msg and "features.1.block.0.0.weight" in msg


def test_num_classes_conflict_is_reported(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(mobilenet_v3_small(num_classes=10).state_dict(), path)
    with pytest.raises(UserError, match="10 classes"):
        load_model(path, num_classes=5)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch EVIL_RAN",))


def test_pickle_that_runs_code_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"state_dict": _Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        load_model(path)
    assert not (tmp_path / "EVIL_RAN").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps([1, 2, 3])])
def test_corrupt_or_foreign_files_give_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_model("/nonexistent/weights.pt")
