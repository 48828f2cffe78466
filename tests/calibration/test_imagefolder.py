"""imagefolder:PATH with what users' folders hold: JPEG/PNG in any case, every colour mode, stray files, empty
class folders, corrupt and truncated images - decoded in DataLoader workers, errors named in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from calibration.datasets import open_dataset
from compress.errors import UserError

MODES = {"RGB": (200, 30, 30), "L": 128, "RGBA": (30, 200, 30, 128), "CMYK": (0, 255, 255, 0), "P": 3}


def _image(path, mode, size=(48, 40), ext=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    fmt = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG"}[(ext or path.suffix).lower()]
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        img = img.convert("RGB")
    if fmt == "PNG" and mode == "CMYK":  # PNG has no CMYK: such a file holds JPEG data (Pillow reads the content)
        fmt = "JPEG"
    img.save(path, format=fmt)


def make_tree(root, n_per_class=6, classes=("cat", "dog", "owl")):
    """ImageNet's layout (train/ + val/), extensions in every case, all colour modes, a stray text file."""
    exts = [".JPEG", ".jpg", ".png", ".PNG", ".jpeg"]
    modes = list(MODES)
    for split, n in (("train", n_per_class), ("val", 2)):
        for c in classes:
            for i in range(n):
                k = i + hash(c) % 5
                _image(root / split / c / f"img{i}{exts[k % len(exts)]}", modes[k % len(modes)])
            (root / split / c / "notes.txt").write_text("not an image")
            (root / split / c / ".DS_Store").write_bytes(b"\0\1")
    return root


def test_every_mode_and_extension_decodes_to_rgb_and_stray_files_are_ignored(tmp_path):
    root = make_tree(tmp_path / "data")
    ds = open_dataset(f"imagefolder:{root}", 32, workers=0)
    assert ds.num_classes == 3 and len(ds.split("train")) == 18 and len(ds.split("test")) == 6
    x, y = next(iter(ds.loader("train", batch_size=18)))
    assert x.shape == (18, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert sorted(set(y.tolist())) == [0, 1, 2]
    # the same batches decoded in two worker processes
    xw, yw = next(iter(ds.with_workers(2).loader("train", batch_size=18)))
    assert torch.equal(x, xw) and torch.equal(y, yw)
    assert open_dataset(f"imagefolder:{root}", 32).workers >= 1  # image folders decode in workers by default


def test_the_identity_is_the_path_and_the_files(tmp_path):
    a = make_tree(tmp_path / "a")
    ds = open_dataset(f"imagefolder:{a}", 32)
    assert ds.name == f"imagefolder:{a.resolve()}" and len(ds.fingerprint) == 12
    assert open_dataset(f"imagefolder:{a}", 64).fingerprint == ds.fingerprint  # the data, not its size
    _image(a / "train" / "cat" / "new.png", "RGB")
    assert open_dataset(f"imagefolder:{a}", 32).fingerprint != ds.fingerprint


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_bad_image_is_one_line_naming_the_file(tmp_path, workers, damage):
    root = make_tree(tmp_path / "data")
    bad = root / "train" / "dog" / "img1.jpg"
    if damage == "corrupt":
        bad.write_bytes(b"this is not a JPEG at all" * 10)
    else:
        _image(bad, "RGB", size=(300, 300))
        bad.write_bytes(bad.read_bytes()[:600])
    ds = open_dataset(f"imagefolder:{root}", 32, workers=workers)
    with pytest.raises(UserError) as e:
        for _ in ds.loader("train", batch_size=4):
            pass
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot decode image") and str(bad) in msg


def test_an_empty_class_folder_or_split_is_refused(tmp_path):
    root = make_tree(tmp_path / "data")
    (root / "val" / "emu").mkdir()
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "readme.md").write_text("images go here")
    with pytest.raises(UserError, match=r"class folder .*emu has no images"):
        open_dataset(f"imagefolder:{root}")
    flat = tmp_path / "flat"
    _image(flat / "a" / "x.png", "RGB")
    with pytest.raises(UserError, match="too few to hold out"):
        open_dataset(f"imagefolder:{flat}")


def _checkpoint(tmp_path, classes=3):
    from compress.models.checkpoint import save_checkpoint
    from compress.models.mobilenetv3 import mobilenet_v3_small

    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "w.pt", mobilenet_v3_small(width_mult=0.5, num_classes=classes))


def test_quantize_on_an_image_folder_and_the_corrupt_file_error(tmp_path):
    from cli import main

    root = make_tree(tmp_path / "data")
    weights = _checkpoint(tmp_path)
    out = tmp_path / "run"
    args = ["quantize", "--recipe", "int8", "--weights", str(weights), "--dataset", f"imagefolder:{root}",
            "--input-size", "32", "--calibration-size", "12", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["dataset"] == f"imagefolder:{root.resolve()}" and report["evaluation"]["images"] == 6
    assert report["calibration"]["images"] == 12 and report["variants"][1]["accuracy"]["top1"] is not None
    bad = root / "val" / "owl" / "img0.png"
    bad.write_bytes(b"\x89PNG broken")
    again = tmp_path / "again"
    res = CliRunner().invoke(main, args[:-1] + [str(again)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: cannot decode image {bad}: cannot identify image file " \
                                                  f"'{bad}'"
    assert not again.exists() or not [p for p in again.rglob("*") if p.is_file()]
