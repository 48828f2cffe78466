"""Load and save weights: torchvision, timm and this project's own checkpoints.

* torchvision: a plain state_dict (``features.0.0.weight`` ...) loads unchanged.
* timm (``mobilenetv3_large_100`` / ``mobilenetv3_small_100`` / ``_075``): detected and mapped by
  :mod:`compress.models.timm` (its BN eps and width rounding reproduced).
* ours: a dict with ``state_dict`` plus the architecture (``arch``, ``width_mult``, ``minimalistic``,
  ``num_classes``, optional ``spec`` for pruned networks) and training facts.

Everything is read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from compress.errors import UserError
from compress.io import atomic_path
from compress.models.mobilenetv3 import ARCHS, ArchSpec, MobileNetV3, arch_spec
from compress.models.infer import InferredArch, check_requested, infer_architecture
from compress.models.timm import TIMM_BN_EPS, is_timm_layout, timm_to_torchvision

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


@dataclass
class LoadedModel:
    model: MobileNetV3
    spec: ArchSpec
    source: str  # "torchvision", "timm", "mnv3-compress" or "random"
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's other fields (input_size, dataset ...)


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` and one-line errors for every way a file can be bad."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"weights file not found: {p}")
    if not p.is_file():
        raise UserError(f"weights path is not a file: {p}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing: keep stderr one line
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the global a pickle would import ("GLOBAL posix.system"); any
        # other failure ("Unsupported operand 0") is a file that is not a checkpoint at all
        found = re.search(r"GLOBAL (\S+)|[Uu]nsupported global:? (?:GLOBAL )?(\S+)", str(e))
        if found:
            raise UserError(f"refusing to load {p}: it is not a plain weights file (it imports "
                            f"{(found.group(1) or found.group(2)).rstrip('.,')}, which could run code; only "
                            f"weights_only checkpoints are accepted)") from None
        detail = str(e).split("WeightsUnpickler error:")[-1]
        lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
        first = lines[0][:200] if lines else type(e).__name__
        raise UserError(f"cannot read weights {p}: corrupt or not a PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read weights {p}: corrupt or not a PyTorch checkpoint ({first[:200]})") from None


def unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded object into (state_dict, metadata); strip DDP's ``module.`` prefix."""
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                meta = {k: v for k, v in obj.items() if k not in _WRAPPER_KEYS}
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("weights file holds no state_dict (expected a mapping of parameter names to tensors)")
    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in obj.items())
    return sd, meta


def fit_report(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], limit: int = 3) -> str | None:
    """Describe the first mismatching keys/shapes between a model and a state_dict (None if they fit)."""
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [f"{k} {list(sd[k].shape)} vs model {list(v.shape)}"
              for k, v in model_sd.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"missing {missing[:limit]}" + (f" (+{len(missing) - limit} more)" if len(missing) > limit else ""))
    if unexpected:
        parts.append(f"unexpected {unexpected[:limit]}" + (f" (+{len(unexpected) - limit} more)" if len(unexpected) > limit else ""))
    if shapes:
        parts.append(f"shape {shapes[:limit]}" + (f" (+{len(shapes) - limit} more)" if len(shapes) > limit else ""))
    return "; ".join(parts) or None


def load_model(weights: str | os.PathLike | None = None, arch: str | None = None, width_mult: float | None = None,
               minimalistic: bool | None = None, num_classes: int | None = None) -> LoadedModel:
    """Build a model and load ``weights`` into it (random init when ``weights`` is None).

    The architecture (large / small, width multiplier, minimalistic, classes) is read from the weights: our
    checkpoints record it (``spec``, pruned networks included); torchvision- and timm-layout state_dicts are read
    by :func:`compress.models.infer.infer_architecture`.  An explicit option that contradicts the weights is a
    one-line error saying what they are.  Without weights: ``arch`` (default ``mobilenet_v3_small``), width 1.0.
    """
    if arch is not None and arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    if weights is None:
        spec = arch_spec(arch or "mobilenet_v3_small", width_mult or 1.0, bool(minimalistic), num_classes or 1000)
        return LoadedModel(MobileNetV3(spec), spec, "random")
    sd, meta = unwrap_state_dict(read_checkpoint(weights))
    source = "mnv3-compress" if "arch" in meta else "torchvision"
    bn_eps = float(meta.get("bn_eps", 0.001))
    if is_timm_layout(sd):
        sd, source, bn_eps = timm_to_torchvision(sd), "timm", TIMM_BN_EPS
    if "spec" in meta:
        try:
            spec = ArchSpec.from_dict(dict(meta["spec"]))
        except (TypeError, ValueError) as e:
            raise UserError(f"{weights}: invalid architecture description: {e}") from None
        found = InferredArch(spec.arch, spec.width_mult, spec.minimalistic, spec.num_classes, spec)
    else:
        found = infer_architecture(sd, bn_eps)
        spec = found.spec
        recorded = meta.get("arch")
        if recorded is not None and recorded not in ARCHS:
            raise UserError(f"{weights}: unknown architecture {recorded!r}; choose one of: {', '.join(ARCHS)}")
        if recorded is not None and recorded != found.arch:
            raise UserError(f"{weights} says it is {recorded} but its weights are {found.describe()}")
    check_requested(found, weights, arch, width_mult, minimalistic, num_classes)
    model = MobileNetV3(spec)
    problem = fit_report(model.state_dict(), sd)
    if problem:
        raise UserError(f"weights {weights} do not fit their recorded architecture ({found.describe()}): {problem}")
    model.load_state_dict(sd)
    return LoadedModel(model, spec, source, meta)


def save_checkpoint(path: str | os.PathLike, model: MobileNetV3, **meta: Any) -> Path:
    """Write ``{'state_dict', 'arch', 'width_mult', 'minimalistic', 'num_classes', 'spec', **meta}`` atomically."""
    spec = model.spec
    obj = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": spec.arch, "width_mult": spec.width_mult, "minimalistic": spec.minimalistic,
        "num_classes": spec.num_classes, "bn_eps": spec.bn_eps, "spec": spec.to_dict(), **meta,
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
