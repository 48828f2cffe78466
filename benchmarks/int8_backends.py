"""int8 backends on this CPU, interleaved in ONE run: ORT fp32, ORT's plain ``quantize_static``, torch's own x86
int8 path, and each of our int8 recipes, on MobileNetV3-Large and -Small @224; ratios to ORT fp32.

    python benchmarks/int8_backends.py                          # 1 thread, batch 1 (the headline setting)
    python benchmarks/int8_backends.py --threads 2 --batch 8 --json runs/bench/backends_t2_b8.json

Variants (per model; random torchvision-layout weights, 1000 classes: latency does not depend on weight values):

* ``ort fp32``: our fp32 export, onnxruntime CPU, all graph optimizations;
* ``ort static (defaults)``: ``onnxruntime.quantization.quantize_static`` with its defaults (QDQ, per-tensor,
  int8 activations = S8S8) after ``quant_pre_process`` - what a user gets from the docs' first example;
* ``ort static (u8s8 per-channel)``: the same with uint8 activations and per-channel weights (ORT's x86 advice);
* ``torch x86 int8``: torch's own int8 path - FX graph mode (``torch.ao.quantization.quantize_fx``) with the
  ``x86`` backend's default qconfig mapping (fbgemm/onednn kernels), run in eager PyTorch.  PT2E
  (``quantize_pt2e`` + ``X86InductorQuantizer``) is not in torch 2.13 (it moved to torchao, not installed);
* ``int8`` / ``int8-mixed`` / ... : our recipes (``recipes/*.toml``) through ``compress.quant.core``;
  ``int8 (no dw padding)`` is the int8 recipe without ``depthwise_channel_multiple`` (the graph-shaping ablation).
  int8-mixed plans for latency only here (``tolerable_loss = 1``): with random weights accuracy means nothing.

Every variant is timed in the same rounds, visiting the variants in a rotating order (``eval.latency``'s
interleaving, extended to torch callables), so a neighbour's job hits all of them alike.  Calibration: synthetic
images (``--calibration-size``).  The numbers are this machine's; the committed part is the output format.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

MODELS = (("mobilenet_v3_large", 224), ("mobilenet_v3_small", 224))
RECIPES = ("int8", "int8-mixed")


def _float_model(arch: str):
    import torch

    from compress.models.checkpoint import load_model

    torch.manual_seed(0)
    return load_model(None, arch, num_classes=1000).model.eval()


def _ort_static(fp32_path: Path, reader, wd: Path, plain: bool) -> bytes:
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    from compress.quant.core import quiet

    pre, out = wd / f"pre_{plain}.onnx", wd / f"static_{plain}.onnx"
    with quiet():
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        reader.rewind()
        if plain:
            quantize_static(str(pre), str(out), reader)
        else:
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    reader.rewind()
    return out.read_bytes()


def _torch_x86(model, size: int, calib: list[np.ndarray]):
    """FX graph-mode static int8 with the x86 backend; returns the converted module (or raises)."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (torch.zeros(1, 3, size, size),))
        with torch.no_grad():
            for x in calib:
                prepared(torch.from_numpy(x))
        return convert_fx(prepared)


def _our_recipe(name: str, fp32, source, reader, wd: Path, threads: int, batch: int) -> tuple[bytes, dict]:
    import onnx

    from compress.quant.checks import int8_checks
    from compress.quant.core import calibrate, prepare_float, quantize_prepared
    from recipes.loader import load_recipe

    label = name
    if name == "int8 (no dw padding)":
        rec = load_recipe("int8").with_overrides("quantize", depthwise_channel_multiple=0)
    else:
        rec = load_recipe(name)
    rec = rec.with_overrides("calibration", size=len(reader.indices))  # the holdout must avoid these images
    if rec.mixed_precision.enabled:
        rec = rec.with_overrides("mixed_precision", tolerable_loss=1.0, eval_size=32, profile_runs=20)
    sub = wd / label.replace(" ", "_").replace("(", "").replace(")", "")
    sub.mkdir()
    prepared = prepare_float(fp32, rec.quantize, sub)
    ranges = calibrate(prepared, reader, rec.calibration, sub)
    facts: dict[str, Any] = {}
    extra: list[str] = []
    if rec.mixed_precision.enabled:
        from compress.quant.mixed_precision import plan_for_recipe

        plan = plan_for_recipe(prepared, ranges, rec, source, sub, threads=threads, batch=batch)
        extra = plan.nodes_to_exclude
        facts["fp32_units"] = plan.report["fp32_units"]
        facts["proposed"] = [st["unit"] for st in plan.report["steps"]]
        facts["latency_check"] = plan.report["latency_check"]
    qg = quantize_prepared(prepared, ranges, rec, sub, extra_excluded=extra)
    size = source.preprocess.input_size
    int8_checks(qg.model, onnx.load(str(prepared)), rec.quantize, size)
    return qg.model.SerializeToString(), facts


def _ort_runner(model: bytes, threads: int, batch: int) -> Callable[[], Any]:
    from eval.latency import make_session, random_input

    sess = make_session(model, threads)
    feed = random_input(model, batch)
    return lambda: sess.run(None, feed)


def _torch_runner(module, size: int, batch: int) -> Callable[[], Any]:
    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32))

    def run():
        with torch.no_grad():
            return module(x)

    return run


def interleaved(runners: dict[str, Callable[[], Any]], threads: int, batch: int, rounds: int,
                round_time_s: float, warmup: int = 5) -> dict[str, dict[str, Any]]:
    """``eval.latency.measure_interleaved`` for callables (ORT sessions and torch modules alike)."""
    from eval.latency import summarize_rounds

    names = list(runners)
    per_round = {}
    for n in names:
        times = []
        for _ in range(warmup):
            t0 = time.perf_counter_ns()
            runners[n]()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        per_round[n] = int(np.clip(round_time_s * 1e3 / max(float(np.median(times)), 1e-3), 3, 500))
    times_by = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = []
            for _ in range(per_round[n]):
                t0 = time.perf_counter_ns()
                runners[n]()
                t.append((time.perf_counter_ns() - t0) / 1e6)
            times_by[n].append(np.asarray(t))
    return {n: summarize_rounds(times_by[n], threads, batch) for n in names}


def build(models, recipes, threads: int, batch: int, calib_size: int, with_torch: bool, ablation: bool,
          wd: Path) -> tuple[dict[str, Callable], dict[str, Any]]:
    """{variant: runner} for every model, and facts (sizes, plans, why a variant is n/a)."""
    import onnx
    import torch

    from calibration.datasets import open_dataset
    from calibration.reader import TrainSplitReader
    from compress.onnx.export import export_onnx

    torch.set_num_threads(threads)
    runners: dict[str, Callable] = {}
    facts: dict[str, Any] = {}
    for arch, size in models:
        tag = f"{'large' if 'large' in arch else 'small'}@{size}"
        model = _float_model(arch)
        source = open_dataset("synthetic", size)
        reader = TrainSplitReader(source, calib_size, min(32, calib_size))
        fp32_path = export_onnx(model, wd / f"{tag}_fp32.onnx", source.preprocess)
        fp32 = onnx.load(str(fp32_path))
        f: dict[str, Any] = {"weights": "random init (torchvision layout, 1000 classes)", "na": {}, "plans": {}}
        runners[f"{tag} | ort fp32"] = _ort_runner(fp32_path.read_bytes(), threads, batch)
        runners[f"{tag} | ort static (defaults)"] = _ort_runner(_ort_static(fp32_path, reader, wd, True), threads,
                                                               batch)
        runners[f"{tag} | ort static (u8s8 per-channel)"] = _ort_runner(_ort_static(fp32_path, reader, wd, False),
                                                                        threads, batch)
        if with_torch:
            try:
                reader.rewind()
                calib = [next(iter(b.values())) for b in iter(reader.get_next, None)]
                reader.rewind()
                runners[f"{tag} | torch x86 int8 (fx)"] = _torch_runner(_torch_x86(model, size, calib[:4]), size, batch)
            except Exception as e:  # recorded and printed as n/a
                f["na"]["torch x86 int8 (fx)"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        names = list(recipes) + (["int8 (no dw padding)"] if ablation else [])
        rwd = wd / tag
        rwd.mkdir()
        for name in names:
            blob, plan_facts = _our_recipe(name, fp32, source, reader, rwd, threads, batch)
            runners[f"{tag} | ours: {name}"] = _ort_runner(blob, threads, batch)
            if plan_facts:
                f["plans"][name] = plan_facts
        facts[tag] = f
    return runners, facts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--round-time", type=float, default=0.25, help="seconds per variant and round (default: 0.25)")
    p.add_argument("--calibration-size", type=int, default=64, help="synthetic calibration images (default: 64)")
    p.add_argument("--models", default="large,small", help="comma list of large / small (default: both)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"our recipes (default: {','.join(RECIPES)})")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip torch's x86 int8 path")
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip 'int8 (no dw padding)'")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    from compress.quant.cpu import cpu_int8_info
    from eval.model_info import machine_info

    wanted = {s.strip() for s in args.models.split(",")}
    models = [(a, s) for a, s in MODELS if a.rsplit("_", 1)[-1] in wanted]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="int8-backends.") as tmp:
        runners, facts = build(models, recipes, args.threads, args.batch, args.calibration_size, args.torch,
                               args.ablation, Path(tmp))
        res = interleaved(runners, args.threads, args.batch, args.rounds, args.round_time)
    cpu = cpu_int8_info()
    result = {"machine": machine_info(), "cpu_int8": cpu, "threads": args.threads, "batch": args.batch,
              "rounds": args.rounds, "models": facts, "latency_ms": res, "seconds": round(time.time() - t0, 1)}
    print(f"int8 backends: {args.threads} thread(s), batch {args.batch}, {args.rounds} interleaved rounds "
          f"({cpu['machine']}, VNNI: {', '.join(cpu['vnni']) or 'no'}); ratio = ORT fp32 median / variant median")
    print(f"{'model':<10} {'variant':<34} {'median ms':>10} {'p90 ms':>9} {'cv':>6} {'vs ort fp32':>12}")
    for name, r in res.items():
        tag, variant = name.split(" | ", 1)
        base = res[f"{tag} | ort fp32"]["median"]
        print(f"{tag:<10} {variant:<34} {r['median']:>10.3f} {r['p90']:>9.3f} {r['cv']:>6.3f} "
              f"{base / r['median']:>11.2f}x")
    for tag, f in facts.items():
        for variant, why in f["na"].items():
            print(f"{tag:<10} {variant:<34} {'n/a':>10}  ({why})")
        for name, plan in f["plans"].items():
            check = plan["latency_check"]
            checked = "" if not check else (f"; proposed {', '.join(plan['proposed'])}: measured {check['plan_ms']:.3f} "
                                            f"ms vs all-int8 {check['int8_all_ms']:.3f} ms -> "
                                            f"{'kept' if check['kept'] else 'reverted'}")
            print(f"{tag:<10} plan of {name}: fp32 units {', '.join(plan['fp32_units']) or '(none)'}{checked}")
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
