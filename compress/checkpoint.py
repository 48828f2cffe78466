"""Load and save weights: torchvision, timm and this project's own checkpoints.

* torchvision: a plain state_dict (``features.0.0.weight`` ...) loads unchanged.
* timm (``mobilenetv3_large_100`` / ``mobilenetv3_small_100``): detected by ``conv_stem.weight`` and
  mapped key by key.  timm's BatchNorm uses ``eps=1e-5`` where torchvision uses ``1e-3``, and its head is a
  1x1 ``conv_head`` with bias instead of a Linear; both are reproduced so outputs match timm's.  At other
  widths (``mobilenetv3_large_075``) timm rounds channel counts differently, so they are read from the
  weights (:func:`timm_widths`).  timm's ``tf_*`` ports (BN eps 1e-3, TF 'SAME' padding) have the same keys
  and cannot be told apart from a state_dict: they load, but do not reproduce timm's outputs.
* ours: a dict with ``state_dict`` plus the architecture (``arch``, ``width_mult``, ``minimalistic``,
  ``num_classes``, optional ``spec`` for pruned networks) and training facts.

Everything is read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""
from __future__ import annotations

import dataclasses
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
from compress.mobilenetv3 import ARCHS, ArchSpec, MobileNetV3, arch_spec

TIMM_BN_EPS = 1e-5
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


def is_timm_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_stem.weight" in sd


_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def timm_to_torchvision(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Map a timm MobileNetV3 state_dict onto torchvision's keys."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    blocks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _TIMM_BLOCK.match(k)
        if m:
            blocks.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = v
        elif k.startswith("conv_stem."):
            out["features.0.0." + k[len("conv_stem."):]] = v
        elif k.startswith("bn1."):
            out["features.0.1." + k[len("bn1."):]] = v
        elif k == "conv_head.weight":
            out["classifier.0.weight"] = v.flatten(1)
        elif k == "conv_head.bias":
            out["classifier.0.bias"] = v
        elif k.startswith("classifier."):
            out["classifier.3." + k[len("classifier."):]] = v
        else:
            out[k] = v  # unknown: reported as unexpected by the fit check
    for n, key in enumerate(sorted(blocks)):
        b = blocks[key]
        pre = f"features.{n + 1}"
        subs: list[tuple[str, str]] = []
        if any(s.startswith("conv_pwl.") for s in b):  # InvertedResidual
            has_se = any(s.startswith("se.") for s in b)
            proj = 3 if has_se else 2
            subs = [("conv_pw.", f"{pre}.block.0.0."), ("bn1.", f"{pre}.block.0.1."),
                    ("conv_dw.", f"{pre}.block.1.0."), ("bn2.", f"{pre}.block.1.1."),
                    ("se.conv_reduce.", f"{pre}.block.2.fc1."), ("se.conv_expand.", f"{pre}.block.2.fc2."),
                    ("conv_pwl.", f"{pre}.block.{proj}.0."), ("bn3.", f"{pre}.block.{proj}.1.")]
        elif any(s.startswith("conv_dw.") for s in b):  # DepthwiseSeparable (no expansion conv)
            has_se = any(s.startswith("se.") for s in b)
            proj = 2 if has_se else 1
            subs = [("conv_dw.", f"{pre}.block.0.0."), ("bn1.", f"{pre}.block.0.1."),
                    ("se.conv_reduce.", f"{pre}.block.1.fc1."), ("se.conv_expand.", f"{pre}.block.1.fc2."),
                    ("conv_pw.", f"{pre}.block.{proj}.0."), ("bn2.", f"{pre}.block.{proj}.1.")]
        else:  # ConvBnAct: the last 1x1 conv of the features
            subs = [("conv.", f"{pre}.0."), ("bn1.", f"{pre}.1.")]
        for s, v in b.items():
            for src, dst in subs:
                if s.startswith(src):
                    out[dst + s[len(src):]] = v
                    break
            else:
                out[f"blocks.{key[0]}.{key[1]}.{s}"] = v
    return out


def timm_widths(spec: ArchSpec, sd: Mapping[str, torch.Tensor]) -> ArchSpec:
    """Take the channel counts of ``spec`` from a (mapped) timm state_dict.

    At ``width_mult != 1`` timm sizes each expansion as ``make_divisible(rounded in_ch * ratio)`` where
    torchvision uses ``make_divisible(table expansion * width_mult)`` (``mobilenetv3_large_075``: 64 vs 48
    in block 2), and it keeps the classifier's hidden width at 1280 / 1024 where torchvision scales it.
    Kernels, strides and activations stay the table's; ``spec`` is returned unchanged when the weights do not
    have its block structure, so the fit check names the mismatch.
    """
    n = len(spec.blocks)
    keys = {"stem": "features.0.0.weight", "last": f"features.{n + 1}.0.weight", "hidden": "classifier.0.weight"}
    if any(k not in sd for k in keys.values()) or f"features.{n + 2}.0.weight" in sd:
        return spec
    blocks, in_ch = [], int(sd[keys["stem"]].shape[0])
    for i, b in enumerate(spec.blocks):
        pre = f"features.{i + 1}.block"
        convs = sorted((int(k.split(".")[3]), v) for k, v in sd.items()
                       if re.fullmatch(rf"{re.escape(pre)}\.\d+\.0\.weight", k))
        dw = [v for _, v in convs if v.ndim == 4 and v.shape[1] == 1 and v.shape[0] > 1]
        fc1 = [v for k, v in sd.items() if re.fullmatch(rf"{re.escape(pre)}\.\d+\.fc1\.weight", k)]
        if len(dw) != 1 or len(convs) < 2 or len(fc1) > 1:
            return spec
        se = int(fc1[0].shape[0]) if fc1 else 0
        blocks.append(dataclasses.replace(b, in_ch=in_ch, expanded=int(dw[0].shape[0]),
                                          out_ch=int(convs[-1][1].shape[0]), se_channels=se))
        in_ch = blocks[-1].out_ch
    try:
        return spec.replace(blocks=tuple(blocks), last_conv=int(sd[keys["last"]].shape[0]),
                            last_channel=int(sd[keys["hidden"]].shape[0]))
    except ValueError:
        return spec


def infer_num_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("classifier.3.weight", "classifier.weight"):
        if key in sd and sd[key].ndim == 2:
            return int(sd[key].shape[0])
    return None


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

    Architecture facts come from the arguments, then from the checkpoint's own metadata, then defaults
    (``mobilenet_v3_small``, width 1.0).  ``num_classes`` is inferred from the classifier when not given.
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
    inferred = infer_num_classes(sd)
    if num_classes is not None and inferred is not None and num_classes != inferred:
        raise UserError(f"--num-classes {num_classes} does not fit {weights}: its classifier has {inferred} classes")
    if "spec" in meta and arch in (None, meta.get("arch")):
        try:
            spec = ArchSpec.from_dict(dict(meta["spec"]))
        except (TypeError, ValueError) as e:
            raise UserError(f"{weights}: invalid architecture description: {e}") from None
    else:
        a = arch or meta.get("arch") or "mobilenet_v3_small"
        if a not in ARCHS:
            raise UserError(f"{weights}: unknown architecture {a!r}; choose one of: {', '.join(ARCHS)}")
        wm = width_mult if width_mult is not None else float(meta.get("width_mult", 1.0))
        mini = minimalistic if minimalistic is not None else bool(meta.get("minimalistic", False))
        spec = arch_spec(a, wm, mini, num_classes or inferred or 1000, bn_eps=bn_eps)
        if source == "timm":
            spec = timm_widths(spec, sd)
    model = MobileNetV3(spec)
    problem = fit_report(model.state_dict(), sd)
    if problem:
        desc = f"{spec.arch} (width_mult={spec.width_mult}{', minimalistic' if spec.minimalistic else ''})"
        raise UserError(f"weights {weights} do not fit {desc}: {problem}")
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
