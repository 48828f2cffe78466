"""Bad input through the CLI: one line ``Error: ...`` on stderr, a non-zero exit, no traceback, no output file.

Every case runs ``cli.main`` in-process through click's CliRunner on tiny inputs (MobileNetV3-Small at width 0.5,
32x32) made here; ``MNV3_COMPRESS_HOME`` points into the test's tmp_path so a case that fell back to the embedded
default model would show as a slow test, never as a polluted cache.
"""
from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli import main
from compress.models.checkpoint import save_checkpoint
from compress.models.mobilenetv3 import mobilenet_v3_small

TINY = ["--width-mult", "0.5", "--input-size", "32"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MNV3_COMPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny valid inputs: our checkpoint, a torchvision state_dict, the fp32 ONNX export, a regular file."""
    from calibration.datasets import open_dataset
    from compress.onnx.export import export_onnx

    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = mobilenet_v3_small(width_mult=0.5, num_classes=10)
    ckpt = save_checkpoint(d / "tiny.pt", model, input_size=32, dataset="fashion-mnist")
    torch.save(model.state_dict(), d / "tiny_tv.pth")
    onnx_path = export_onnx(model, d / "tiny.onnx", open_dataset("synthetic", 32).preprocess)
    (d / "a_file").write_text("a regular file, not a directory\n")
    return {"ckpt": ckpt, "tv": d / "tiny_tv.pth", "onnx": onnx_path, "file": d / "a_file", "dir": d}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def invoke(args):
    """Run the CLI in-process.  pytest records warnings; here they reach stderr as in a plain ``python`` run
    (Python's default filters), so a warning printed on the way to an error counts as an extra line."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _show_warning
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


class _Run:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr, self.output = code, stdout, stderr, stdout + stderr


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def invoke_unprivileged(args):
    """The CLI with permission bits binding it.  Root reads and writes whatever the bits say, so under root (as
    CI runs) the command runs in a subprocess that first drops root's capabilities to override file permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, from the bounding set: gone after exec); otherwise in-process."""
    if os.geteuid() != 0:
        return invoke(args)
    import ctypes
    import subprocess

    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    r = subprocess.run([sys.executable, "-m", "cli", *[str(a) for a in args]], cwd=Path(__file__).resolve().parents[1],
                       env=dict(os.environ), capture_output=True, text=True, preexec_fn=drop, timeout=300)
    return _Run(r.returncode, r.stdout, r.stderr)


def screen_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows: a carriage return overwrites the line, so a progress bar that
    cleared itself (tqdm, leave=False) before the error leaves nothing visible."""
    return [shown for shown in (line.split("\r")[-1].strip() for line in text.split("\n")) if shown]


def assert_one_line_error(result, *phrases, code=1):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = screen_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and len(lines[0]) > len("Error: "), result.stderr
    for p in phrases:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def assert_nothing_written(path: Path):
    """``path`` (an output file or directory) does not exist, or is a directory holding no file at all."""
    path = Path(path)
    if path.is_dir():
        assert not [p for p in path.rglob("*") if p.is_file()], list(path.rglob("*"))
    else:
        assert not path.exists()
        if path.parent.is_dir():  # not even a hidden temp file of it
            assert not list(path.parent.glob(f".{path.name}*")), list(path.parent.iterdir())


# -- recipes ----------------------------------------------------------------------------------------

def test_quantize_on_cuda_without_cuda(files, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine that has CUDA
    out = tmp_path / "out"
    assert_one_line_error(invoke(["quantize", "--recipe", "int8-qat", "--weights", files["ckpt"], "--device", "cuda",
                                  "-o", out]), "no CUDA device is visible")
    assert_nothing_written(out)


def _as_torchrun_rank(monkeypatch, rank: int) -> None:
    """The environment torchrun gives process ``rank`` of 2 (no process group is started by these cases)."""
    for k, v in (("WORLD_SIZE", "2"), ("RANK", str(rank)), ("LOCAL_RANK", str(rank))):
        monkeypatch.setenv(k, v)


def test_limit_train_needs_a_recipe_that_trains(files, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(invoke(["quantize", "--recipe", "int8", "--weights", files["ckpt"], "--limit-train", "64",
                                  "-o", out]), "--limit-train", "int8 does not train", "--calibration-size")
    assert_nothing_written(out)


def test_other_ranks_leave_a_recipe_without_training_to_rank_0(files, tmp_path, monkeypatch):
    """Under torchrun a PTQ recipe has nothing to share: rank 1 returns at once, prints and writes nothing."""
    _as_torchrun_rank(monkeypatch, 1)
    out = tmp_path / "out"
    result = invoke(["quantize", "--recipe", "int8", "--weights", files["ckpt"], "-o", out])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and not out.exists()


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_torchrun_refuses_to_train_a_default(tmp_path, monkeypatch, command):
    """Processes launched together cannot train a default one at a time: --train-default is refused before any
    of them joins the process group."""
    _as_torchrun_rank(monkeypatch, 0)
    out = tmp_path / "out"
    recipe = "int8-qat" if command == "quantize" else "netadapt"
    assert_one_line_error(invoke([command, "--recipe", recipe, "--train-default", "--input-size", "48", "-o", out]),
                          "--train-default does not run under torchrun", "--weights")
    assert_nothing_written(out)


def test_prune_limit_train_reaches_the_holdout(files, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(invoke(["prune", "--weights", files["ckpt"], "--limit-train", "500", "--device", "cpu",
                                  "-o", out]), "eval_images = 2000", "the train split has 500")
    assert_nothing_written(out)


def test_unknown_recipe_lists_the_known_ones(files, tmp_path):
    out = tmp_path / "out"
    line = assert_one_line_error(invoke(["quantize", "--recipe", "nope", "--weights", files["ckpt"], "-o", out]),
                                 "unknown recipe 'nope'", "int8", "int8-tuned")
    assert "built-in recipes" in line
    assert_nothing_written(out)


@pytest.mark.parametrize("command, recipe, right", [("prune", "int8", "quantize"), ("quantize", "netadapt", "prune"),
                                                  ("quantize", "netadapt-int8", "prune")])
def test_a_recipe_given_to_the_wrong_command(files, tmp_path, command, recipe, right):
    out = tmp_path / "out"
    assert_one_line_error(invoke([command, "--recipe", recipe, "--weights", files["ckpt"], "-o", out]),
                          f"'mnv3-compress {right} --recipe {recipe}'")
    assert_nothing_written(out)


@pytest.mark.parametrize("toml, phrases", [
    ('[calibration]\nmethod = "magic"\n', ["method = 'magic'", "'minmax'", "'percentile'", "'entropy'"]),
    ('[calibration]\nmethd = "minmax"\n', ["unknown key(s) methd", "allowed keys", "method"]),
    ('[calibration]\nsize = "many"\n', ["size must be an integer"]),
    ('[quantize]\nmin_int8_conv_fraction = 2.0\n', ["min_int8_conv_fraction = 2.0", "allowed: [0.0, 1.0]"]),
    ('[calibration\nmethod = "minmax"\n', ["not valid TOML"]),
], ids=["bad-value", "unknown-key", "wrong-type", "out-of-range", "not-toml"])
def test_invalid_recipe_names_the_key_and_what_is_allowed(files, tmp_path, toml, phrases):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('version = 1\nname = "mine"\ndescription = "a test recipe"\n' + toml)
    out = tmp_path / "out"
    assert_one_line_error(invoke(["quantize", "--recipe", recipe, "--weights", files["ckpt"], "-o", out]),
                          str(recipe), *phrases)
    assert_nothing_written(out)


def test_missing_recipe_file(files, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(invoke(["quantize", "--recipe", tmp_path / "absent.toml", "--weights", files["ckpt"],
                                  "-o", out]), "recipe file not found")
    assert_nothing_written(out)


# -- architecture and weights -------------------------------------------------------------------------

def test_unknown_architecture_option_is_a_usage_error(files, tmp_path):
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke(["export", "--arch", "mobilenet_v9", "--weights", files["ckpt"], "-o", out]),
                          "'mobilenet_v9' is not one of", "mobilenet_v3_small", "--help", code=2)
    assert_nothing_written(out)


def test_unknown_architecture_in_a_checkpoint(files, tmp_path):
    weights = tmp_path / "v9.pt"
    torch.save({"state_dict": torch.load(files["tv"], weights_only=True), "arch": "mobilenet_v9"}, weights)
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke(["export", "--weights", weights, "-o", out]),
                          "unknown architecture 'mobilenet_v9'", "choose one of", "mobilenet_v3_small", "mobilenet_v3_large")
    assert_nothing_written(out)


def _corrupt(files, path: Path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = Path(files["ckpt"]).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("state_dict = {}\n")
    elif kind == "raw-pickle":  # not torch's format (a harmless list, pickle protocol 4)
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=4))


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "text", "raw-pickle"])
def test_corrupt_weights(files, tmp_path, kind):
    weights = tmp_path / "bad.pt"
    _corrupt(files, weights, kind)
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke(["export", "--weights", weights, "-o", out]), "cannot read weights", str(weights))
    assert_nothing_written(out)


def test_weights_without_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "dict.pt")
    for w in (tmp_path / "list.pt", tmp_path / "dict.pt"):
        out = tmp_path / "m.onnx"
        assert_one_line_error(invoke(["export", "--weights", w, "-o", out]), "holds no state_dict")
        assert_nothing_written(out)


def test_missing_weights(tmp_path):
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke(["export", "--weights", tmp_path / "absent.pt", "-o", out]),
                          "weights file not found", "absent.pt")
    assert_nothing_written(out)


def test_weights_path_is_a_directory(tmp_path):
    out = tmp_path / "out" / "m.onnx"
    assert_one_line_error(invoke(["export", "--weights", tmp_path, "-o", out]), "--weights", "is a directory",
                          code=2)
    assert_nothing_written(out.parent)


def test_unreadable_weights(files, tmp_path):
    weights = tmp_path / "locked.pt"
    weights.write_bytes(Path(files["ckpt"]).read_bytes())
    weights.chmod(0)
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke_unprivileged(["export", "--weights", weights, "-o", out]), "--weights",
                          "is not readable", code=2)
    assert_nothing_written(out)


@pytest.mark.parametrize("args, phrases", [
    (["--arch", "mobilenet_v3_large"], ["are mobilenet_v3_small width 0.5, 10 classes", "--arch mobilenet_v3_large "
                                                                                        "contradicts them"]),
    (["--width-mult", "1.0"], ["are mobilenet_v3_small width 0.5, 10 classes", "--width-mult 1 contradicts them"]),
], ids=["other-arch", "other-width"])
def test_options_that_contradict_the_weights(files, tmp_path, args, phrases):
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke(["export", "--weights", files["tv"], *args, "-o", out]), *phrases)
    assert_nothing_written(out)


def test_num_classes_conflict(files, tmp_path):
    out = tmp_path / "m.onnx"
    assert_one_line_error(invoke(["export", "--weights", files["ckpt"], "--num-classes", "5", "-o", out]),
                          "--num-classes 5 contradicts them", "10 classes")
    assert_nothing_written(out)


# -- ONNX models ------------------------------------------------------------------------------------

def _foreign_onnx(channels: int = 3, classes: int = 10) -> onnx.ModelProto:
    """A valid ONNX classifier (constant logits) with input [N, channels, 32, 32] and no metadata."""
    inits = [numpy_helper.from_array(np.zeros((channels, classes), np.float32), "w"),
             numpy_helper.from_array(np.arange(classes, dtype=np.float32), "b")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "foreign",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind", ["garbage", "empty", "checkpoint", "missing"])
def test_corrupt_or_non_onnx_model(files, tmp_path, kind):
    model = tmp_path / "model.onnx"
    if kind == "garbage":
        model.write_bytes(b"\x08\x07\x12\x04junk" + bytes(range(256)))
    elif kind == "empty":
        model.write_bytes(b"")
    elif kind == "checkpoint":
        model.write_bytes(Path(files["ckpt"]).read_bytes())
    out = tmp_path / "out"
    phrase = "model file not found" if kind == "missing" else "is not a valid ONNX model"
    assert_one_line_error(invoke(["eval", model, "--dataset", "synthetic", "--json", out / "r.json"]), phrase)
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["garbage", "missing"])
def test_corrupt_reference_model(files, tmp_path, kind):
    ref = tmp_path / "ref.onnx"
    if kind == "garbage":
        ref.write_bytes(b"not onnx at all")
    out = tmp_path / "out"
    assert_one_line_error(invoke(["eval", files["onnx"], "--dataset", "synthetic", "--limit", "4",
                                  "--reference", ref, "--json", out / "r.json"]), str(ref))
    assert_nothing_written(out)


def test_onnx_input_that_does_not_fit_the_dataset(tmp_path):
    model = tmp_path / "gray.onnx"
    onnx.save(_foreign_onnx(channels=1), str(model))
    out = tmp_path / "out"
    assert_one_line_error(invoke(["eval", model, "--limit", "4", "--json", out / "r.json"]),
                          "model input is [N, 1, 32, 32]", "gives images [N, 3, 32, 32]")
    assert_nothing_written(out)


def test_onnx_outputs_that_do_not_fit_the_dataset(tmp_path):
    model = tmp_path / "five.onnx"
    onnx.save(_foreign_onnx(classes=5), str(model))
    out = tmp_path / "out"
    assert_one_line_error(invoke(["eval", model, "--limit", "4", "--json", out / "r.json"]),
                          "5 outputs", "10 classes")
    assert_nothing_written(out)


# -- image folders ----------------------------------------------------------------------------------

def _image_folder(root: Path, kind: str) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if kind == "no-classes":
        (root / "readme.txt").write_text("no class folders here\n")
    elif kind == "no-images":
        for c in ("cat", "dog"):
            (root / c).mkdir()
            (root / c / "notes.txt").write_text("not an image\n")
    elif kind == "corrupt-image":
        for c in ("cat", "dog"):
            (root / c).mkdir()
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")
        (root / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif kind == "split-mismatch":
        for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "eel"))):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(root / split / c / "0.png")
    return root


@pytest.mark.parametrize("kind, phrase", [
    ("missing", "image folder not found"),
    ("no-classes", "has no class sub-folders"),
    ("no-images", "has no images"),
    ("corrupt-image", "cannot decode image"),
    ("split-mismatch", "have different class folders"),
])
def test_empty_or_malformed_image_folder(tmp_path, kind, phrase):
    root = tmp_path / "images"
    if kind != "missing":
        _image_folder(root, kind)
    out = tmp_path / "out"
    assert_one_line_error(invoke(["train", "--dataset", f"imagefolder:{root}", *TINY, "--epochs", "1",
                                  "--batch-size", "2", "--device", "cpu", "-o", out / "ck.pt"]), phrase)
    assert_nothing_written(out)


# -- output locations -------------------------------------------------------------------------------

def _unwritable(files) -> Path:
    """A directory that cannot be created, even by root: its parent is a regular file."""
    return Path(files["file"]) / "sub"


@pytest.mark.parametrize("where", ["below-a-file", "is-a-file"])
def test_unwritable_output_dir_export(files, where):
    out = _unwritable(files) if where == "below-a-file" else Path(files["file"])
    phrase = "Not a directory" if where == "below-a-file" else "a file of that name exists"
    assert_one_line_error(invoke(["export", "--weights", files["ckpt"], "-o", out / "m.onnx"]),
                          f"cannot create output directory {out}: {phrase}")
    assert_nothing_written(out / "m.onnx")
    assert Path(files["file"]).read_text() == "a regular file, not a directory\n"


def test_unwritable_output_dir_quantize(files):
    out = _unwritable(files)
    assert_one_line_error(invoke(["quantize", "--weights", files["ckpt"], "-o", out]),
                          "cannot create output directory", str(out))
    assert_nothing_written(out)


def test_unwritable_output_dir_train(files):
    out = _unwritable(files)
    assert_one_line_error(invoke(["train", "--weights", files["ckpt"], "--dataset", "synthetic", *TINY,
                                  "-o", out / "ck.pt"]), "cannot create output directory", str(out))
    assert_nothing_written(out)


def test_unwritable_output_dir_eval_json(files):
    out = _unwritable(files)
    assert_one_line_error(invoke(["eval", files["onnx"], "--dataset", "synthetic", "--limit", "4",
                                  "--json", out / "r.json"]), "cannot create output directory", str(out))
    assert_nothing_written(out)


def test_read_only_output_dir(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(invoke_unprivileged(["export", "--weights", files["ckpt"], "-o", locked / "m.onnx"]),
                              "not writable")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


# -- usage errors and --debug -----------------------------------------------------------------------

def test_usage_error_is_one_line_exit_2(tmp_path):
    assert_one_line_error(invoke(["export", "--weights", tmp_path / "x.pt"]), "Missing option '--output'",
                          code=2)
    assert_one_line_error(invoke(["train", "--epochs", "0", "-o", tmp_path / "ck.pt"]), "--epochs", code=2)
    assert_nothing_written(tmp_path / "ck.pt")


def test_debug_shows_the_traceback(tmp_path):
    out = tmp_path / "m.onnx"
    args = ["export", "--weights", tmp_path / "absent.pt", "-o", out]
    plain = invoke(args)
    debug = invoke(["--debug", *args])
    assert plain.exit_code == debug.exit_code == 1
    assert "Traceback" not in plain.stderr
    assert "Traceback (most recent call last)" in debug.stderr and "UserError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()  # the same one-line message, last
    assert_nothing_written(out)
