"""Regenerate tests/golden/*.json from torchvision and timm (the tests never import this file).

Run with an environment that has torchvision and timm (no network: no pretrained weights are used)::

    /work/refvenv/bin/python tools/make_golden.py            # all references
    /work/refvenv/bin/python tools/make_golden.py mobilenet_v3_small mobilenetv3_small_100
    /work/refvenv/bin/python tools/make_golden.py mobilenet_v3_large_1000   # an ImageNet head at 224x224

Every state_dict entry of each reference model is set to ``synth_tensor(key, shape)``, defined once in
tests/compress/models/test_reference_layouts.py and read from there (that module needs pytest, which the reference
environment lacks, so the ``synth_*`` functions are lifted out of its source).  The model runs in eval mode on
``synth_input(size)`` and the file records the state_dict layout, the parameter count and the logits.  Most
references have a 10-class head at 64x64 (small files); ``<name>_1000`` are the four checkpoints users bring with
their 1000-class ImageNet head, at the ImageNet input size 224.
"""
from __future__ import annotations
import __future__

import ast
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULE = ROOT / "tests" / "compress" / "models" / "test_reference_layouts.py"
GOLDEN_DIR = ROOT / "tests" / "golden"
MAX_BYTES = 50_000


def _synth_namespace() -> dict[str, Any]:
    """Execute only ``_MASK`` and the ``synth_*`` functions of the test module."""
    tree = ast.parse(TEST_MODULE.read_text())
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name.startswith("synth_"))
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "_MASK" for t in n.targets))]
    ns: dict[str, Any] = {"math": math, "zlib": zlib, "torch": torch, "__name__": "synth"}
    code = compile(ast.Module(body=keep, type_ignores=[]), str(TEST_MODULE), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)
    return ns


def _torchvision(arch: str, width_mult: float) -> Callable[[int], torch.nn.Module]:
    def build(num_classes: int) -> torch.nn.Module:
        from torchvision.models import mobilenetv3 as tv
        setting, last_channel = tv._mobilenet_v3_conf(arch, width_mult=width_mult)
        return tv.MobileNetV3(setting, last_channel, num_classes=num_classes)
    return build


def _timm(name: str) -> Callable[[int], torch.nn.Module]:
    def build(num_classes: int) -> torch.nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    return build


# name -> (library, builder, our arch, width_mult, minimalistic, odd input size or None, num_classes, input size)
REFERENCES: dict[str, tuple[str, Callable[[int], torch.nn.Module], str, float, bool, int | None, int, int]] = {
    "mobilenet_v3_large": ("torchvision", _torchvision("mobilenet_v3_large", 1.0), "mobilenet_v3_large", 1.0, False, None, 10, 64),
    "mobilenet_v3_small": ("torchvision", _torchvision("mobilenet_v3_small", 1.0), "mobilenet_v3_small", 1.0, False, None, 10, 64),
    "mobilenet_v3_large_075": ("torchvision", _torchvision("mobilenet_v3_large", 0.75), "mobilenet_v3_large", 0.75, False, None, 10, 64),
    "mobilenet_v3_small_075": ("torchvision", _torchvision("mobilenet_v3_small", 0.75), "mobilenet_v3_small", 0.75, False, None, 10, 64),
    "mobilenetv3_large_100": ("timm", _timm("mobilenetv3_large_100"), "mobilenet_v3_large", 1.0, False, None, 10, 64),
    "mobilenetv3_small_100": ("timm", _timm("mobilenetv3_small_100"), "mobilenet_v3_small", 1.0, False, None, 10, 64),
    "mobilenetv3_large_075": ("timm", _timm("mobilenetv3_large_075"), "mobilenet_v3_large", 0.75, False, None, 10, 64),
    "mobilenetv3_small_075": ("timm", _timm("mobilenetv3_small_075"), "mobilenet_v3_small", 0.75, False, None, 10, 64),
    # timm's only minimal models are TF ports (BN eps 1e-3, 'SAME' padding); 65 = 2**6 + 1 makes SAME symmetric
    "tf_mobilenetv3_large_minimal_100": ("timm", _timm("tf_mobilenetv3_large_minimal_100"), "mobilenet_v3_large", 1.0, True, 65, 10, 64),
    "tf_mobilenetv3_small_minimal_100": ("timm", _timm("tf_mobilenetv3_small_minimal_100"), "mobilenet_v3_small", 1.0, True, 65, 10, 64),
    # the checkpoints users bring, with their ImageNet head at the ImageNet size
    "mobilenet_v3_large_1000": ("torchvision", _torchvision("mobilenet_v3_large", 1.0), "mobilenet_v3_large", 1.0, False, None, 1000, 224),
    "mobilenet_v3_small_1000": ("torchvision", _torchvision("mobilenet_v3_small", 1.0), "mobilenet_v3_small", 1.0, False, None, 1000, 224),
    "mobilenetv3_large_100_1000": ("timm", _timm("mobilenetv3_large_100"), "mobilenet_v3_large", 1.0, False, None, 1000, 224),
    "mobilenetv3_small_100_1000": ("timm", _timm("mobilenetv3_small_100"), "mobilenet_v3_small", 1.0, False, None, 1000, 224),
}


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[float(f"{v:.8g}") for v in row] for row in t.tolist()]


def make_golden(name: str, ns: dict[str, Any]) -> dict[str, Any]:
    library, build, arch, width_mult, minimalistic, odd, num_classes, size = REFERENCES[name]
    model = build(num_classes).eval()
    layout = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    sd = ns["synth_state_dict"](layout)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        x = ns["synth_input"](size)
        logits = model(x)
        g: dict[str, Any] = {
            "name": name, "library": library, "arch": arch, "width_mult": width_mult, "minimalistic": minimalistic,
            "num_classes": num_classes, "params": sum(p.numel() for p in model.parameters()),
            "bn_eps": sorted({m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}),
            "versions": {"torch": torch.__version__, library: __import__(library).__version__},
            "synth_checksum": ns["synth_checksum"](sd), "input": list(x.shape), "logits": _rounded(logits),
        }
        if odd:
            g["odd_size"] = odd
            g["logits_odd"] = _rounded(model(ns["synth_input"](odd)))
    std, spread = float(logits.std()), float((logits[0] - logits[1]).std())
    if not 1e-3 < std < 1e3 or spread < 0.05 * std or not torch.isfinite(logits).all():
        raise SystemExit(f"{name}: logits std {std:.3g} (between inputs {spread:.3g}) are degenerate; "
                         "retune synth_tensor")
    g["state_dict"] = layout
    return g


def write(g: dict[str, Any]) -> Path:
    """One top-level field per line, the state_dict layout one entry per line: small and diff-friendly."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in g.items() if k != "state_dict"]
    rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in g["state_dict"])
    lines.append(f' "state_dict": [\n  {rows}\n ]')
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    json.loads(text)
    if len(text.encode()) > MAX_BYTES:
        raise SystemExit(f"{g['name']}: golden would be {len(text)} bytes (> {MAX_BYTES})")
    path = GOLDEN_DIR / f"{g['name']}.json"
    path.write_text(text)
    return path


def main(argv: list[str]) -> None:
    names = argv or list(REFERENCES)
    unknown = [n for n in names if n not in REFERENCES]
    if unknown:
        raise SystemExit(f"unknown reference(s) {unknown}; choose from {list(REFERENCES)}")
    torch.set_num_threads(1)
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    ns = _synth_namespace()
    for name in names:
        g = make_golden(name, ns)
        path = write(g)
        print(f"{path.relative_to(ROOT)}: {len(g['state_dict'])} entries, {g['params']} params, "
              f"logits std {torch.tensor(g['logits']).std():.3g}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
