"""int8 vs fp32 latency on this CPU: the embedded default and MobileNetV3-Large @224, 1 thread, batch 1.

Every model is measured in ONE interleaved run (``eval.latency.measure_interleaved``: sessions built first,
rounds alternate between models), so machine drift hits all alike.  The int8 models are made by the int8
recipe's own functions (``compress.quant.core``), calibrated on Fashion-MNIST train images at the model's size.

Besides fp32 vs the recipe's int8, the candidates behind the recipe's choices are measured in the same run:

* h-swish / SE-gate forms: ``hardswish:op`` (what torch exports; ORT expands it to float HardSigmoid * x
  between DequantizeLinear/QuantizeLinear), ``x_relu6:op``, ``x_relu6:relu6`` (integer-only: QLinearAdd +
  QLinearMul, gates read with fixed scale 1/255);
* activation type: uint8 (U8S8) vs int8 (S8S8) for the recipe's form.

Weights: the embedded default's own (``--default-weights`` to measure another checkpoint at the default's
architecture and size); random init for Large @224 (no ImageNet weights exist here), as latency does not depend
on weight values.

    python benchmarks/int8_latency.py                    # both models, all candidates
    python benchmarks/int8_latency.py --no-forms --rounds 9 --json runs/bench/int8_latency.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LARGE_224 = ("mobilenet_v3_large", 224)
FORMS = (("hardswish", "op"), ("x_relu6", "op"), ("x_relu6", "relu6"))


def configs() -> tuple[tuple[str, int], ...]:
    """(architecture, input size): the embedded default, then Large @224."""
    from compress.models.default import shipped

    s = shipped()
    return ((s.arch, s.input_size), LARGE_224)


def _float_model(arch: str, size: int, weights: str | None):
    """(LoadedModel, source description)."""
    from compress.models.checkpoint import load_model
    from compress.models.default import load_shipped, shipped

    if weights:
        return load_model(weights, arch), weights
    if (arch, size) != LARGE_224:
        return load_shipped(), f"embedded default ({shipped().file})"
    import torch

    torch.manual_seed(0)
    return load_model(None, arch, num_classes=10), "random init"


def build_variants(arch: str, size: int, weights: str | None, forms: bool, calib: int, wd: Path) -> tuple[dict, dict]:
    """{variant name: ONNX bytes} for one architecture, plus facts about how they were made."""
    import onnx

    from calibration.datasets import open_dataset
    from calibration.reader import TrainSplitReader
    from compress.onnx.export import export_onnx
    from compress.quant.checks import int8_checks
    from compress.quant.core import calibrate, prepare_float, quantize_prepared
    from recipes.loader import load_recipe

    loaded, src = _float_model(arch, size, weights)
    source = open_dataset("fashion-mnist", size)
    tag = f"{'small' if 'small' in arch else 'large'}@{size}"
    fp32_path = export_onnx(loaded.model, wd / f"{tag}_fp32.onnx", source.preprocess)
    fp32 = onnx.load(str(fp32_path))
    recipe = load_recipe("int8")
    reader = TrainSplitReader(source, calib, 32)
    out = {f"{tag} fp32": fp32_path.read_bytes()}
    todo = [("int8", recipe)]
    if forms:
        for hs, hg in FORMS:
            todo.append((f"int8 {hs}:{hg}", recipe.with_overrides("quantize", hswish=hs, hard_sigmoid=hg)))
        todo.append(("int8 s8s8", recipe.with_overrides("quantize", activation_type="int8")))
    facts = {"weights": src, "recipe_form": f"{recipe.quantize.hswish}:{recipe.quantize.hard_sigmoid}",
             "calibration_images": calib}
    for name, rec in todo:
        sub = wd / f"{tag}_{len(out)}"
        sub.mkdir()
        prepared = prepare_float(fp32, rec.quantize, sub)
        qg = quantize_prepared(prepared, calibrate(prepared, reader, rec.calibration, sub), rec, sub)
        int8_checks(qg.model, onnx.load(str(prepared)), rec.quantize, (size, size))
        out[f"{tag} {name}"] = qg.model.SerializeToString()
    return out, facts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--round-time", type=float, default=0.25, help="seconds per model and round (default: 0.25)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calibration-size", type=int, default=128, help="train images (latency does not depend on it)")
    p.add_argument("--default-weights", default=None,
                   help="checkpoint measured in place of the embedded default (its architecture and size)")
    p.add_argument("--no-forms", dest="forms", action="store_false", help="only fp32 vs the recipe's int8")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    from compress.quant.cpu import cpu_int8_info, resolve_reduce_range
    from eval.latency import measure_interleaved
    from eval.model_info import machine_info

    t0 = time.time()
    models: dict[str, bytes] = {}
    facts = {}
    with tempfile.TemporaryDirectory(prefix="int8-bench.") as tmp:
        for i, (arch, size) in enumerate(configs()):
            m, f = build_variants(arch, size, args.default_weights if i == 0 else None, args.forms,
                                  args.calibration_size, Path(tmp))
            models.update(m)
            facts[f"{arch}@{size}"] = f
    res = measure_interleaved(models, threads=args.threads, batch=1, rounds=args.rounds,
                              round_time_s=args.round_time)
    cpu = cpu_int8_info()
    result = {"machine": machine_info(), "cpu_int8": cpu, "reduce_range": resolve_reduce_range("auto", cpu),
              "threads": args.threads, "batch": 1, "rounds": args.rounds, "models": facts,
              "latency_ms": res, "seconds": round(time.time() - t0, 1)}

    print(f"int8 vs fp32, {args.threads} thread(s), batch 1, {args.rounds} interleaved rounds "
          f"({cpu['machine']}, VNNI: {', '.join(cpu['vnni']) or 'no'})")
    for key, f in facts.items():
        print(f"  {key}: weights {f['weights']}; recipe int8 form {f['recipe_form']}")
    print(f"{'variant':<34} {'median ms':>10} {'p90 ms':>9} {'cv':>6}  speedup vs fp32")
    for name, r in res.items():
        tag = name.split(" ")[0]
        base = res[f"{tag} fp32"]["median"]
        print(f"{name:<34} {r['median']:>10.3f} {r['p90']:>9.3f} {r['cv']:>6.3f}  {base / r['median']:.2f}x")
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
