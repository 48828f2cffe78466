"""The shipped default model: the file is the one its manifest names (sha256), a changed copy is refused, the
accuracy the manifest states is re-measured on real data, and the recorded commands rebuild it."""
import json
import shutil
import sys
from pathlib import Path

import pytest

import compress.models.default as default
from calibration.datasets import open_dataset
from compress.errors import UserError
from compress.training.train import evaluate

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def copy_of_weights(tmp_path, monkeypatch):
    """The shipped weights and manifest copied to a folder the module reads instead."""
    for f in default.WEIGHTS_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(default, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(default, "MANIFEST", tmp_path / "manifest.json")
    default.shipped.cache_clear()
    yield tmp_path
    default.shipped.cache_clear()


def test_the_shipped_file_is_the_one_the_manifest_names():
    s = default.shipped()
    assert s.path.is_file() and default.sha256(s.path) == s.sha256
    assert s.path.stat().st_size == s.facts["file_bytes"]
    assert [p.name for p in default.WEIGHTS_DIR.glob("*.pt")] == [s.file]  # one model, no stale leftovers
    loaded = default.load_shipped()
    assert (loaded.spec.arch, loaded.spec.num_classes, loaded.meta["input_size"]) == (s.arch, s.num_classes,
                                                                                       s.input_size)
    assert loaded.meta["dataset_fingerprint"] == s.facts["dataset_fingerprint"]


def test_a_changed_copy_is_refused_and_a_missing_one_named(copy_of_weights):
    s = default.shipped()
    blob = bytearray(s.path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    s.path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="does not match its manifest"):
        default.load_shipped()
    s.path.unlink()
    with pytest.raises(UserError, match="is missing; reinstall the package or pass --weights"):
        default.load_shipped()
    (copy_of_weights / "manifest.json").write_text("{}")
    default.shipped.cache_clear()
    with pytest.raises(UserError, match="manifest .* is missing or invalid"):
        default.shipped()


def test_its_stated_accuracy_holds_on_the_real_test_images():
    s = default.shipped()
    key = next(k for k in s.facts if k.startswith("test_top1_first_"))
    n = int(key.rsplit("_", 1)[1])
    source = open_dataset(s.dataset, s.input_size)
    assert source.fingerprint == s.facts["dataset_fingerprint"]  # the data it was measured on is the data here
    got = evaluate(default.load_shipped().model, source, limit=n)
    assert got["images"] == n
    assert abs(got["top1"] - s.facts[key]) <= 2 / n  # the same images, the same model: at most a rounding flip
    assert s.facts["test_top1"] >= 0.91 and s.facts["test_images"] == 10000


def test_the_recorded_commands_rebuild_a_fine_tune_from_its_parent():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from ship_default import train_commands, train_seconds
    finally:
        sys.path.remove(str(ROOT / "tools"))
    cfg = {"epochs": 10, "lr": 0.005, "batch_size": 128, "schedule": "onecycle", "pad_crop": 0, "seed": 0}
    parent = {"train_config": cfg, "dataset": "fashion-mnist", "input_size": 32, "history": [{"seconds": 100.0}]}
    child = {"arch": "mobilenet_v3_large", "dataset": "fashion-mnist", "input_size": 48,
             "train_config": {**cfg, "epochs": 3, "lr": 0.001}, "history": [{"seconds": 7.0}] * 3,
             "started_from": parent}
    first, second = train_commands(child)
    assert first.startswith("mnv3-compress train --arch mobilenet_v3_large --input-size 32 --epochs 10 --lr 0.005")
    assert first.endswith("-o PARENT")
    assert second.startswith("mnv3-compress train --weights PARENT --input-size 48 --epochs 3 --lr 0.001")
    assert train_seconds(child) == 121.0
    shipped_facts = default.shipped().facts
    assert shipped_facts["train_commands"][-1].endswith("-o CKPT")
    assert json.loads(json.dumps(shipped_facts))  # the manifest is plain JSON
