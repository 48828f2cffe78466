"""The project's ONNX metadata (``mnv3_compress.*`` metadata_props) and I/O names: a leaf, no torch.

Every model the tool writes records how to feed it (``preprocess``), its recipe and architecture; the
evaluator reads them back without importing torch or the model zoo.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import onnx

__all__ = ["META_PREFIX", "INPUT_NAME", "OUTPUT_NAME", "set_metadata", "get_metadata"]

META_PREFIX = "mnv3_compress."
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def set_metadata(model: onnx.ModelProto, meta: Mapping[str, Any]) -> onnx.ModelProto:
    """Set ``mnv3_compress.<key>`` metadata_props (values that are not strings are stored as JSON)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        full = key if key.startswith(META_PREFIX) else META_PREFIX + key
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if full in existing:
            existing[full].value = text
        else:
            p = model.metadata_props.add()
            p.key, p.value = full, text
    return model


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """``mnv3_compress.*`` metadata_props without the prefix."""
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
