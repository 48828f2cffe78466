"""``mnv3-compress quantize``: a recipe applied to a float model, end to end, with its evidence.

1. load the model (``--weights``) or the embedded default; export fp32 ONNX (:func:`compress.onnx.export.export_onnx`)
   and shape it for int8 (:func:`compress.quant.core.prepare_float`);
2. run the recipe's strategy, picked from :data:`STRATEGIES` by ``Recipe.strategy``: plain PTQ (calibrate +
   quantize), accuracy-driven tuning (:mod:`compress.quant.tuning`), latency-aware mixed precision
   (:mod:`compress.quant.mixed_precision`) or QAT (:mod:`compress.quant.qat`, exported by
   :mod:`compress.quant.qat_export`);
3. check the int8 graph (:func:`compress.quant.checks.int8_checks`);
4. evaluate fp32 and int8 with :func:`eval.evaluate.evaluate_onnx` (latencies interleaved in one measurement)
   and write ``model_fp32.onnx``, ``model_int8.onnx``, ``recipe.toml``, ``report.json``, ``report.md`` (and
   each strategy's own files) atomically into the output directory.

A strategy that trains (QAT) has a training phase, picked from :data:`TRAINERS`, that runs before step 1.
Launched by ``torchrun``, every process runs that phase together as DDP (:mod:`compress.training.distributed`);
then the process group is left, the other ranks return ``{"rank": ...}`` and rank 0 alone exports, evaluates
and writes, as a single process.  A recipe that does not train has nothing to share: the other ranks return
at once and rank 0 runs it alone.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from calibration.reader import TrainSplitReader
from compress.errors import UserError
from compress.io import ensure_dir, write_bytes, write_text
from compress.onnx.export import export_onnx
from compress.onnx.metadata import get_metadata, set_metadata
from compress.quant.checks import int8_checks
from compress.quant.core import QuantizedGraph, calibrate, prepare_float, quantize_prepared, range_dict
from compress.quant.cpu import cpu_int8_info, resolve_reduce_range
from compress.targets.deploy import Deployment, deploy
from compress.targets.registry import parse_targets
from compress.training import distributed
from compress.training.default_model import resolve_model
from compress.training.distributed import DistContext, choose_device, launch_rank, launched_by_torchrun
from eval.evaluate import evaluate_onnx
from eval.latency import measure_interleaved
from eval.model_info import count_macs
from eval.report import run_header, write_run_report
from recipes.loader import Recipe, load_recipe

__all__ = ["quantize", "STRATEGIES", "TRAINERS", "Setup", "Outcome", "DEFAULT_OUTPUT_DIR"]

DEFAULT_OUTPUT_DIR = "runs/quantize"


@dataclass
class Setup:
    """What every strategy starts from: the recipe, the float model and its shaped graph, the data."""
    recipe: Recipe
    model: Any  # the float MobileNetV3
    source: Any  # calibration.datasets.DataSource
    prepared_path: Path  # the shaped float graph that calibration and quantization read
    reader: TrainSplitReader
    workdir: str
    out: Path
    cpu: dict[str, Any]
    threads: int
    progress: bool
    trained: Any = None  # what the strategy's training phase (TRAINERS) handed over: QAT's QATResult
    fp32: Any = None  # the float model's ONNX export (what the deploy targets build from)
    targets: list = field(default_factory=list)  # the deploy targets asked for (ort-x86 first)


@dataclass
class Outcome:
    """What a strategy hands back: the int8 graph and what the report says about how it was made."""
    graph: QuantizedGraph
    calibration_method: str
    checked_against: onnx.ModelProto | None = None  # the float graph the int8 one must keep whole (None: prepared)
    calibration_used_by: str | None = None  # set when the calibration data served only a baseline
    sections: dict[str, Any] = field(default_factory=dict)  # report keys (tuning, mixed_precision)
    files: dict[str, str] = field(default_factory=dict)  # extra text outputs (name -> content)
    baseline: QuantizedGraph | None = None  # QAT: the calibrated int8-ptq model with the same settings
    # QAT: (int8 ONNX bytes, eval limit) -> the "qat" report section, once the int8 model exists
    finish: Callable[[bytes, int | None], dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # the strategy's own stages (seconds)
    ranges: Any = None  # the calibration's TensorsData, when the strategy calibrated the graph it quantized
    float_model: Any = None  # the float network the int8 graph quantizes, when not the loaded one (QAT)
    float_onnx: onnx.ModelProto | None = None  # its fp32 export (QAT: the folded model's)


def _ptq(s: Setup) -> Outcome:
    ranges = calibrate(s.prepared_path, s.reader, s.recipe.calibration, s.workdir, progress=s.progress)
    return Outcome(quantize_prepared(s.prepared_path, ranges, s.recipe, s.workdir, cpu=s.cpu),
                   s.recipe.calibration.method, ranges=ranges)


def _mixed_precision(s: Setup) -> Outcome:
    from compress.quant.mixed_precision import plan_for_recipe, render_plan

    ranges = calibrate(s.prepared_path, s.reader, s.recipe.calibration, s.workdir, progress=s.progress)
    named = [t for t in s.targets[1:] if t.measurable_here]  # the plan must pay off where it ships
    measure = _target_measure(named[0], s, ranges) if named else None
    mixed = plan_for_recipe(s.prepared_path, ranges, s.recipe, s.source, s.workdir, cpu=s.cpu, threads=s.threads,
                            measure=measure)
    graph = quantize_prepared(s.prepared_path, ranges, s.recipe, s.workdir, cpu=s.cpu,
                              extra_excluded=mixed.nodes_to_exclude)
    return Outcome(graph, s.recipe.calibration.method, sections={"mixed_precision": mixed.report},
                   files={"mixed_precision.md": render_plan(mixed.report)}, ranges=ranges)


def _tuning(s: Setup) -> Outcome:
    from compress.quant.tuning import tune

    result = tune(s.prepared_path, s.reader, s.source, s.recipe, s.workdir, cpu=s.cpu, progress=s.progress)
    return Outcome(result.graph, result.recipe.calibration.method, sections={"tuning": result.report},
                   files={"recipe_tuned.toml": result.recipe.to_toml()})


def _train_qat(rec: Recipe, model, source, out: Path, progress: bool, ctx: DistContext):
    """QAT's training phase (every rank under torchrun): fine-tune with fake quantization, checkpoint to ``out``."""
    from compress.quant.qat_train import QAT_CHECKPOINT, qat_fingerprint, run_qat

    size = source.preprocess.input_size
    # the weight grid follows the CPU that exports the model: rank 0's
    reduce_range, _ = resolve_reduce_range(rec.quantize.reduce_range, distributed.from_main(ctx, cpu_int8_info))
    fingerprint = qat_fingerprint(model, rec.quantize, rec.qat, reduce_range,
                                  data=f"{source.name}|{source.fingerprint}@{size[0]}x{size[1]}")
    return run_qat(model, source, rec.quantize, rec.qat, out / QAT_CHECKPOINT, fingerprint, reduce_range,
                   progress, dist=ctx)


def _qat(s: Setup) -> Outcome:
    from compress.quant.qat_export import QAT_FLOAT_ONNX, export_qat
    from compress.quant.qat_train import QAT_CHECKPOINT

    rec, qat = s.recipe, s.trained
    graph, qat_prepared = export_qat(qat.model, rec, s.workdir, s.source.preprocess, cpu=s.cpu)
    baseline = None
    if rec.qat.compare_ptq:  # the PTQ baseline: the same [quantize] settings, calibrated
        ranges = calibrate(s.prepared_path, s.reader, rec.calibration, s.workdir, progress=s.progress)
        baseline = quantize_prepared(s.prepared_path, ranges, rec, s.workdir, cpu=s.cpu)

    def finish(int8_bytes: bytes, limit: int | None) -> dict[str, Any]:
        from compress.quant.qat_export import fake_quant_logits
        from eval.accuracy import agreement, predict, topk_accuracy

        fq_logits, labels = fake_quant_logits(qat.model, s.source, limit)
        onnx_logits, _ = predict(int8_bytes, s.source, limit=limit)
        report = {**qat.report, "fake_quant_top1": topk_accuracy(fq_logits, labels, (1,))["top1"],
                  "onnx_vs_fake_quant_agreement": agreement(fq_logits, onnx_logits),
                  "onnx_vs_fake_quant_max_abs_logit_diff": float(np.abs(fq_logits - onnx_logits).max()),
                  "checkpoint": QAT_CHECKPOINT}
        if report["onnx_vs_fake_quant_agreement"] < rec.qat.min_onnx_agreement:
            raise UserError(f"the exported int8 ONNX agrees with the fake-quant model on only "
                            f"{report['onnx_vs_fake_quant_agreement']:.2%} of test images (recipe "
                            f"requires {rec.qat.min_onnx_agreement:.0%}): the export does not reproduce QAT")
        return report

    from compress.quant.qat_export import to_float

    return Outcome(graph, "none (QAT scales)", checked_against=onnx.load(str(qat_prepared)),
                   calibration_used_by=("the int8-ptq baseline only: the QAT model's own scales are exported"
                                        if baseline is not None else None),
                   baseline=baseline, finish=finish, float_model=to_float(qat.model).cpu().eval(),
                   float_onnx=onnx.load(str(Path(qat_prepared).parent / QAT_FLOAT_ONNX)))


# the recipe's strategy (Recipe.strategy) -> how it makes the int8 graph
STRATEGIES: dict[str, Callable[[Setup], Outcome]] = {
    "ptq": _ptq, "tuning": _tuning, "mixed_precision": _mixed_precision, "qat": _qat}
# the strategies that train first (on every rank under torchrun) -> their training phase, handed to Setup.trained
TRAINERS: dict[str, Callable[[Recipe, Any, Any, Path, bool, DistContext], Any]] = {"qat": _train_qat}


def _resolve_recipe(recipe: str | os.PathLike | Recipe, calibration_size: int | None, limit_train: int | None
                    ) -> Recipe:
    rec = (recipe if isinstance(recipe, Recipe) else load_recipe(recipe)).require_command("quantize")
    if calibration_size is not None:
        rec = rec.with_overrides("calibration", size=int(calibration_size))
    if limit_train is not None:
        if rec.strategy not in TRAINERS:
            raise UserError(f"--limit-train limits the training images of a QAT recipe; {rec.name} does not train "
                            f"(it calibrates on --calibration-size train images)")
        rec = rec.with_overrides("qat", limit_train=int(limit_train))
    return rec


def _facts(rec: Recipe, outcome: Outcome) -> dict[str, Any]:
    """How the int8 model was made: the report's ``quantization`` section and the model's metadata."""
    q, g = rec.quantize, outcome.graph
    return {
        "format": q.format, "weights": "int8 per-channel symmetric" if q.per_channel else "int8 per-tensor symmetric",
        "activations": q.activation_type, "reduce_range": g.reduce_range, "reduce_range_reason": g.reduce_range_reason,
        "hswish": q.hswish, "hard_sigmoid": q.hard_sigmoid, "fixed_qparam_tensors": len(g.fixed_qparams),
        "folded_gate_scales": g.folded_gate_scales, "calibration_method": outcome.calibration_method,
        "weight_bits": q.weight_bits, "nodes_excluded": g.excluded,
    }


def _int8_bytes(graph: QuantizedGraph, fp32: onnx.ModelProto, rec: Recipe, facts: dict[str, Any]) -> bytes:
    """The int8 graph with its metadata: the float model's (preprocessing, architecture ...), the recipe, how it
    was quantized, and the network's MACs (its padded graph executes more, see eval.model_info)."""
    meta: dict[str, Any] = dict(get_metadata(fp32))
    meta.update({"recipe": rec.name, "quantization": facts, "macs": count_macs(fp32)})
    model = set_metadata(graph.model, meta)
    model.producer_name = "mnv3-compress"
    return model.SerializeToString()


def _evaluate(models: dict[str, bytes], source, eval_limit, threads: int, latency: bool) -> dict[str, dict]:
    """Accuracy of every model on the test split (agreement with fp32), latencies in one interleaved run."""
    out = {name: evaluate_onnx(data, dataset=source, limit=eval_limit, threads=threads, latency=False,
                               reference=None if name == "fp32" else models["fp32"])
           for name, data in models.items()}
    if latency:
        lat = measure_interleaved(models, threads=threads, batch=1)
        for name in models:
            out[name]["latency_ms"] = lat[name]
    return out


def quantize(recipe: str | os.PathLike | Recipe = "int8", weights: str | os.PathLike | None = None,
             arch: str | None = None, dataset: str | None = None, input_size: int | None = None,
             calibration_size: int | None = None, output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
             eval_limit: int | None = None, threads: int = 1, latency: bool = True,
             progress: bool = True, device: str = "auto", limit_train: int | None = None, targets: str | None = None,
             **model_options: Any) -> dict[str, Any]:
    """Apply ``recipe`` to a float model and write the deployable int8 model with its evidence.

    ``weights=None`` uses the embedded default (:mod:`compress.models.default`).  Writes
    ``model_fp32.onnx``, ``model_int8.onnx``, ``recipe.toml`` (the resolved recipe), ``report.json`` and
    ``report.md`` into ``output_dir`` - each atomically, the report last.  Accuracy is measured on the first
    ``eval_limit`` test images (all when None); latency with ``threads`` threads at batch 1, both variants
    interleaved in one measurement.  ``device`` (auto / cpu / cuda) is where a QAT recipe trains (under
    torchrun: GPU ``LOCAL_RANK``); export and evaluation run on the CPU.  ``limit_train`` trains QAT on the first
    N train images.  ``targets`` (``"ort-x86,openvino,..."``, :mod:`compress.targets`) also writes and measures
    each target's artifact from the same scales (``scales.json``).  ``model_options`` (``width_mult``,
    ``minimalistic``, ``num_classes``, ``workers``, ``train_default``, ``random_init``) go to
    :func:`compress.training.default_model.resolve_model`.  Returns the
    report (``report.json``'s content); under torchrun, ranks other than 0 return ``{"rank", "world_size",
    "output_dir"}`` once training is done, having written nothing.
    """
    t_start = time.time()
    rec = _resolve_recipe(recipe, calibration_size, limit_train)
    deploy_to = parse_targets(targets)  # a missing runtime fails now, not after training
    rank, world_size, local_rank = launch_rank()
    choose_device(device, local_rank)  # --device cuda without CUDA: the same one-line error on every rank
    trainer = TRAINERS.get(rec.strategy)
    if rank != 0 and trainer is None:  # nothing to share: rank 0 runs this recipe alone
        return {"rank": rank, "world_size": world_size, "output_dir": str(output_dir)}
    _check_launch(model_options)
    out = ensure_dir(output_dir) if rank == 0 else Path(output_dir)
    loaded, source = resolve_model(weights, arch, dataset=dataset, input_size=input_size,
                                   progress=progress and rank == 0, **model_options)
    size = source.preprocess.input_size
    timings: dict[str, float] = {}
    trained, ctx = _train(trainer, rec, loaded.model, source, out, progress, device, timings)
    if ctx is not None and not ctx.is_main:  # training is done: rank 0 exports, evaluates and writes
        return {"rank": ctx.rank, "world_size": ctx.world_size, "output_dir": str(out)}
    with tempfile.TemporaryDirectory(prefix="mnv3-quantize.") as wd:
        t = time.time()
        fp32_path, fp32, prepared_path = _export(loaded.model, source, weights, rec, Path(wd))
        timings["export_s"] = time.time() - t

        t = time.time()
        reader = TrainSplitReader(source, rec.calibration.size, rec.calibration.batch_size, rec.calibration.seed,
                                  progress=progress)
        setup = Setup(rec, loaded.model, source, prepared_path, reader, wd, out, cpu_int8_info(), threads, progress,
                      trained, fp32, deploy_to)
        outcome = STRATEGIES[rec.strategy](setup)
        timings.update(outcome.timings)
        timings["quantize_s"] = time.time() - t + timings.get(f"{rec.strategy}_train_s", 0.0)
        checks = int8_checks(outcome.graph.model, outcome.checked_against or onnx.load(str(prepared_path)),
                             rec.quantize, size)
        facts = _facts(rec, outcome)
        models = {"fp32": fp32_path.read_bytes(), "int8": _int8_bytes(outcome.graph, fp32, rec, facts)}
        if outcome.baseline is not None:
            models["ptq"] = _int8_bytes(outcome.baseline, fp32, rec, {**facts, "calibration_method":
                                                                      rec.calibration.method})
        t = time.time()
        evals = _evaluate(models, source, eval_limit, threads, latency)
        qat_report = outcome.finish(models["int8"], eval_limit) if outcome.finish else None
        timings["evaluate_s"] = time.time() - t
        deployed = None
        if len(deploy_to) > 1:
            t = time.time()
            deployed = deploy(deploy_to, _deployment(setup, outcome, models, fp32, loaded.model, eval_limit,
                                                     latency), evals)
            timings["targets_s"] = time.time() - t

    variants = _write_models(out, rec, models, evals, outcome)
    ref_top1, q_top1 = evals["fp32"]["accuracy"]["top1"], evals["int8"]["accuracy"]["top1"]
    calibration = _calibration_section(reader, outcome, rec)
    extra = {
        **run_header("quantize", rec, loaded.spec, weights, loaded.source, size, source.identity),
        "evaluation": {"split": "test", "images": eval_limit or len(source.split("test")),
                       "top1_drop_pt": None if ref_top1 is None or q_top1 is None
                       else round(100 * (ref_top1 - q_top1), 3)},
        "calibration": calibration, "quantization": facts, "checks": checks, "cpu": setup.cpu,
        "tuning": outcome.sections.get("tuning"), "qat": qat_report,
        "mixed_precision": outcome.sections.get("mixed_precision"),
        "timings_s": {k: round(v, 2) for k, v in timings.items()} | {"total": round(time.time() - t_start, 2)},
    }
    notes = list(_qat_notes(qat_report)) if qat_report else []
    if deployed is not None:
        extra["targets"] = {"table": deployed["table"], "results": deployed["results"]}
        variants += [_target_variant(r) for r in deployed["results"][1:]]
        notes += deployed["notes"]
    variants[1]["target"] = "ort-x86"
    write_run_report(out, variants, extra, notes=notes)
    return {"variants": variants, **extra, "output_dir": str(out)}


def _target_measure(target, s: Setup, ranges) -> Callable:
    """int8-mixed's acceptance check in ``target``'s runtime: the all-int8 graph and the plan, each as the
    target's artifact (built from its own scale table, the plan's fp32 nodes excluded), timed interleaved."""
    from compress.targets.base import BuildInputs
    from compress.targets.table import ScaleTable
    from eval.latency import interleave

    def measure(all_int8, candidate, excluded) -> tuple[dict[str, Any], dict[str, Any], str]:
        batch = target.fixed_batch or 1
        x = np.zeros((batch, 3, *s.source.preprocess.input_size), np.float32)
        calls = {}
        for key, model, fp32_nodes in (("int8_all", all_int8, []), ("plan", candidate, list(excluded))):
            table = ScaleTable.from_int8(model, s.fp32, range_dict(ranges), fp32_nodes)
            wd = Path(s.workdir) / f"mixed-{target.name}-{key}"
            wd.mkdir(parents=True, exist_ok=True)
            artifact = target.build(BuildInputs(s.model, s.fp32, table, s.recipe, s.source.preprocess.input_size,
                                                wd, [x]))
            calls[key] = (lambda run: lambda: run(x))(target.runner(artifact, s.threads))
        lat = interleave(calls, threads=s.threads, batch=batch, rounds=5, round_time_s=0.1)
        return lat["int8_all"], lat["plan"], target.name

    return measure


def _check_launch(model_options: dict[str, Any]) -> None:
    if launched_by_torchrun() and model_options.get("train_default"):
        raise UserError("--train-default does not run under torchrun (every process would train it): train the "
                        "default once without torchrun, then launch with --weights")


def _train(trainer, rec: Recipe, model, source, out: Path, progress: bool, device: str, timings: dict[str, float]):
    """The recipe's training (QAT), as DDP under torchrun: (what it returns, the process context), or (None,
    None) for recipes that do not train."""
    if trainer is None:
        return None, None
    t = time.time()
    with distributed.session(device) as ctx:
        trained = trainer(rec, model, source, out, progress and ctx.is_main, ctx)
    timings[f"{rec.strategy}_train_s"] = time.time() - t
    return trained, ctx


def _export(model, source, weights, rec: Recipe, wd: Path) -> tuple[Path, onnx.ModelProto, Path]:
    """The float model's ONNX (path and proto) and the prepared graph calibration and quantization read."""
    fp32_path = wd / "model_fp32.onnx"
    export_onnx(model, fp32_path, source.preprocess, recipe="fp32",
                extra_meta={"dataset": source.name, "weights": str(weights) if weights else "default"})
    fp32 = onnx.load(str(fp32_path))
    return fp32_path, fp32, prepare_float(fp32, rec.quantize, wd)


def _calibration_section(reader, outcome: Outcome, rec: Recipe) -> dict[str, Any] | None:
    if outcome.calibration_used_by:
        return {**reader.describe(), "method": rec.calibration.method, "used_by": outcome.calibration_used_by}
    if outcome.finish is not None:
        return None  # QAT without a baseline: nothing was calibrated
    return {**reader.describe(), "method": outcome.calibration_method}


def _deployment(s: Setup, outcome: Outcome, models: dict[str, bytes], fp32: onnx.ModelProto, model, eval_limit,
                latency: bool) -> Deployment:
    """What the targets are built from: the reference int8 graph, the float network it quantizes, its ranges."""
    quantized_graph = outcome.checked_against or onnx.load(str(s.prepared_path))
    ranges = outcome.ranges
    if ranges is None:  # tuning / QAT: the ranges of every tensor of the graph it quantized, minmax
        from recipes.sections import CalibrationConfig

        with tempfile.TemporaryDirectory(dir=s.workdir, prefix="ranges.") as tmp:
            path = Path(tmp) / "graph.onnx"
            onnx.save(quantized_graph, str(path))
            ranges = calibrate(path, s.reader, CalibrationConfig(method="minmax"), s.workdir)
    s.reader.rewind()
    batches = []
    while (item := s.reader.get_next()) is not None:
        batches.append(item["input"])
    s.reader.rewind()
    return Deployment(s.recipe, outcome.graph, models["int8"], models["fp32"], outcome.float_model or model,
                      outcome.float_onnx or fp32, range_dict(ranges), s.source, batches, Path(s.workdir), s.out,
                      eval_limit, s.threads, latency, s.progress, "qat" if outcome.finish else "calibration")


def _target_variant(r: dict[str, Any]) -> dict[str, Any]:
    """A target's artifact as a report variant (its latency is in its own runtime: in ``targets``, not here)."""
    return {"name": f"int8/{r['target']}", "target": r["target"], "runtime": r["runtime"], "file": r["file"],
            "is_reference": False, "accuracy": r["accuracy"], "agreement": r["agreement_with_float"],
            "latency_ms": None, "size_bytes": r["size_bytes"]}


def _write_models(out: Path, rec: Recipe, models: dict[str, bytes], evals: dict[str, dict], outcome: Outcome
                  ) -> list[dict[str, Any]]:
    """The models, the resolved recipe and the strategy's own files; returns the report's variants."""
    write_bytes(out / "model_fp32.onnx", models["fp32"])
    write_bytes(out / "model_int8.onnx", models["int8"])
    write_text(out / "recipe.toml", rec.to_toml())
    if "ptq" in models:
        write_bytes(out / "model_int8_ptq.onnx", models["ptq"])
    for name, text in outcome.files.items():
        write_text(out / name, text)
    variants = [
        {"name": "fp32", "file": "model_fp32.onnx", "is_reference": True, **evals["fp32"]},
        {"name": "int8", "file": "model_int8.onnx", "is_reference": False, "recipe": rec.name, **evals["int8"]},
    ]
    if "ptq" in models:
        variants.append({"name": "int8-ptq", "file": "model_int8_ptq.onnx", "is_reference": False,
                         "recipe": f"{rec.name} without QAT (calibrated, {rec.calibration.method})", **evals["ptq"]})
    return variants


def _qat_notes(q: dict[str, Any]) -> list[str]:
    """report.md's QAT section: training, freeze points, and how the export matches the fake-quant model."""
    lines = ["", "## Quantization-aware training", "",
             f"{q['epochs']} epoch(s) from the float model"
             + (" (a finished checkpoint, reused: no training in this run)" if q["resumed_from_epoch"] >= q["epochs"]
                else f", resumed from epoch {q['resumed_from_epoch']}" if q["resumed_from_epoch"] else "")
             + f"; {q['activation_sites']} activation and {q['weight_sites']} weight fake quantizers "
               f"({q['machinery']}). Freeze points: {'; '.join(q['freeze_events']) or 'restored from the checkpoint'}.",
             "", "| epoch | train loss | fake-quant test top-1 | seconds |", "|---:|---:|---:|---:|"]
    dp = q.get("data_parallel") or {}
    if dp.get("world_size", 1) > 1:
        lines[4:4] = ["", f"Trained as DistributedDataParallel on {dp['world_size']} processes ({dp['backend']}, "
                          f"{dp['batch_per_process']} images per process, global batch {dp['global_batch']}): "
                          f"{dp['observers']}; BN statistics: {dp['bn_statistics']}. Rank 0 exported and evaluated."]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {100 * h['test_top1']:.2f} % | {h['seconds']:.0f} |"
              for h in q["history"]]
    lines += ["", f"Exported with the QAT model's own scales and zero points (no calibration): the fake-quant torch "
                  f"model scores {100 * q['fake_quant_top1']:.2f} % and the int8 ONNX predicts the same class on "
                  f"{100 * q['onnx_vs_fake_quant_agreement']:.2f} % of the evaluated test images (max abs logit "
                  f"difference {q['onnx_vs_fake_quant_max_abs_logit_diff']:.3f}). Checkpoint: `{q['checkpoint']}`."]
    return lines
