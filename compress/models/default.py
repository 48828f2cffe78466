"""The embedded default: a trained MobileNetV3 shipped inside the package, so nothing is trained on first use.

``compress/models/weights/`` holds the float checkpoint (weights stored as float16: half the size; the model
computes in float32 from exactly these values) and ``manifest.json``: its sha256, the architecture, the data it
was trained on, the command that trained it, its measured accuracy and speed.  :func:`load_shipped` checks the
file against the manifest's hash before it loads it (``torch.load(weights_only=True)``, as every checkpoint).

The checkpoint is made by the project's own ``train`` command and packed by ``tools/ship_default.py`` (README:
"The embedded default").
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from compress.errors import UserError

__all__ = ["WEIGHTS_DIR", "MANIFEST", "Shipped", "shipped", "load_shipped", "sha256"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


@dataclass(frozen=True)
class Shipped:
    """What the manifest says the shipped model is."""
    file: str
    sha256: str
    arch: str
    width_mult: float
    minimalistic: bool
    num_classes: int
    dataset: str  # the dataset spec it was trained on ("fashion-mnist": the installed Debian package)
    input_size: int
    facts: dict[str, Any]  # accuracy, speed, training command and time, as measured when it was shipped

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file

    def describe(self) -> str:
        return f"{self.arch} @{self.input_size} on {self.dataset}"


@lru_cache(maxsize=1)
def shipped() -> Shipped:
    """The manifest of the shipped default (UserError when the package was installed without it)."""
    try:
        doc = json.loads(MANIFEST.read_text())
        return Shipped(doc["file"], doc["sha256"], doc["arch"], float(doc["width_mult"]), bool(doc["minimalistic"]),
                       int(doc["num_classes"]), doc["dataset"], int(doc["input_size"]), dict(doc.get("facts", {})))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the embedded default model's manifest {MANIFEST} is missing or invalid ({e}); "
                        f"reinstall the package or pass --weights") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_shipped():
    """The shipped default as a :class:`compress.models.checkpoint.LoadedModel`, its file checked against the
    manifest's sha256 first."""
    from compress.models.checkpoint import load_model

    s = shipped()
    if not s.path.is_file():
        raise UserError(f"the embedded default model {s.path} is missing; reinstall the package or pass --weights")
    if sha256(s.path) != s.sha256:
        raise UserError(f"the embedded default model {s.path} does not match its manifest (sha256); reinstall "
                        f"the package or pass --weights")
    loaded = load_model(s.path)
    loaded.meta.setdefault("input_size", s.input_size)
    return loaded
