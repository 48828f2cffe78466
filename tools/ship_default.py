"""Pack a ``train`` checkpoint as the embedded default model (compress/models/weights/) with its manifest.

    mnv3-compress train --arch mobilenet_v3_large --input-size 32 --epochs 10 --lr 0.005 --pad-crop 0 --seed 0 \\
        -o runs/default/large32.pt
    mnv3-compress train --weights runs/default/large32.pt --input-size 48 --epochs 3 --lr 0.001 --pad-crop 0 \\
        --seed 0 -o runs/default/large48.pt
    python tools/ship_default.py runs/default/large48.pt

The weights are stored as float16 (half the size); the shipped model IS those values, so its accuracy is
measured here, on the full test split of the data it was trained on, from the float16 weights, and recorded in
``manifest.json`` with the file's sha256, the training recipe and command, the data's identity and the code
version the checkpoint records.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIRST = 1000  # the test split's first images: the test suite's accuracy check of the shipped file
_TRAIN_FLAGS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "schedule": "--schedule",
                "pad_crop": "--pad-crop", "seed": "--seed"}


def train_commands(ckpt: dict, out: str = "CKPT") -> list[str]:
    """The ``mnv3-compress train`` lines that reproduce the checkpoint, oldest first: a fine-tune
    (``started_from`` recorded) is its parent's commands, then ``--weights PARENT`` with its own recipe."""
    cfg = ckpt["train_config"]
    origin = ckpt.get("started_from") or {}
    commands: list[str] = []
    if "train_config" in origin:  # a fine-tune of a checkpoint this project trained: the same architecture
        parent = {"arch": ckpt["arch"], "width_mult": ckpt.get("width_mult", 1.0), **origin}
        commands = train_commands(parent, out="PARENT")
        args = ["--weights PARENT"]
    elif origin:
        args = [f"--weights {origin.get('file', 'WEIGHTS')}"]
    else:
        args = [f"--arch {ckpt['arch']}"]
        if ckpt.get("width_mult", 1.0) != 1.0:
            args.append(f"--width-mult {ckpt['width_mult']}")
    if ckpt["dataset"] != "fashion-mnist":
        args.append(f"--dataset {ckpt['dataset']}")
    args.append(f"--input-size {ckpt['input_size']}")
    args += [f"{flag} {cfg[key]}" for key, flag in _TRAIN_FLAGS.items()]
    return commands + ["mnv3-compress train " + " ".join(args) + f" -o {out}"]


def train_seconds(ckpt: dict) -> float:
    """Training time of the checkpoint and of every checkpoint it was fine-tuned from."""
    own = sum(h["seconds"] for h in ckpt.get("history", []))
    origin = ckpt.get("started_from") or {}
    return own + (train_seconds(origin) if "history" in origin else 0.0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by 'mnv3-compress train'")
    args = p.parse_args(argv)

    from calibration.datasets import open_dataset
    from compress.io import write_bytes, write_json
    from compress.models.checkpoint import load_model, read_checkpoint
    from compress.models.default import MANIFEST, WEIGHTS_DIR, sha256
    from compress.training.train import evaluate

    ckpt = read_checkpoint(args.checkpoint)
    missing = [k for k in ("train_config", "history", "dataset", "dataset_fingerprint", "code_version", "preprocess")
               if k not in ckpt]
    if missing:
        raise SystemExit(f"{args.checkpoint} is not a train checkpoint of this version (no {', '.join(missing)})")
    keep = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")}
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    name = f"{ckpt['arch']}_{ckpt['dataset'].split(':')[0]}_{ckpt['input_size']}.pt"
    out = WEIGHTS_DIR / name
    buf = io.BytesIO()
    torch.save({"state_dict": half, **keep, "trained_by": train_commands(ckpt),
                "source_checkpoint_sha256": hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()}, buf)
    write_bytes(out, buf.getvalue())

    loaded = load_model(out)  # the float16 values, computed in float32: what every command will use
    source = open_dataset(ckpt["dataset"], ckpt["input_size"])
    if source.fingerprint != ckpt["dataset_fingerprint"]:
        raise SystemExit(f"the data here ({source.fingerprint}) is not the data it was trained on "
                         f"({ckpt['dataset_fingerprint']})")
    test = evaluate(loaded.model, source)
    first = evaluate(loaded.model, source, limit=FIRST)  # what the test suite re-measures, to the image
    manifest = {"file": name, "sha256": sha256(out), "arch": ckpt["arch"], "width_mult": ckpt["width_mult"],
                "minimalistic": ckpt["minimalistic"], "num_classes": ckpt["num_classes"], "dataset": ckpt["dataset"],
                "input_size": ckpt["input_size"],
                "facts": {"test_top1": round(test["top1"], 6), "test_images": test["images"],
                          "test_top1_fp32_checkpoint": ckpt["history"][-1]["test_top1"],
                          f"test_top1_first_{FIRST}": round(first["top1"], 6),
                          "train_commands": train_commands(ckpt), "train_config": ckpt["train_config"],
                          "train_seconds": round(train_seconds(ckpt), 1),
                          "epochs": len(ckpt["history"]), "dataset_fingerprint": ckpt["dataset_fingerprint"],
                          "code_version": ckpt["code_version"], "file_bytes": out.stat().st_size}}
    write_json(MANIFEST, manifest)
    print(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    main()
