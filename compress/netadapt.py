"""NetAdapt (Yang et al., 2018) as used for MobileNetV3 (Howard et al., 2019, §4.2): ``mnv3-compress prune``.

Start from a trained network.  Each iteration makes one *proposal* per channel group
(:func:`compress.prune.channel_groups`: one block's expansion, or the bottleneck of all blocks sharing a
residual stream, or the head): the smallest cut, in steps of 8 channels, whose latency - predicted by the
measured per-layer table (:mod:`compress.latency_table`) - is at least ``delta = delta_ratio x L(seed)``
lower.  Each proposal keeps its most important channels (``importance``), gets a short fine-tune on the
train split, and is scored on a held-out subset of the TRAIN split (never the test split).  The kept
proposal maximises ``dAccuracy / |dLatency|`` (``selection = "ratio"``, the MobileNetV3 rule) or the
accuracy itself (``"min_drop"``, NetAdapt's original rule).  Its whole-network latency is then measured
(onnxruntime, the deployment's threads and batch, interleaved with the seed model); the loop stops once that
measurement and the table's prediction are both at most ``target_latency_ratio`` of the seed's (one noisy
measurement alone does not end the search).  A longer fine-tune follows, and the result is
measured on the full test split against the unpruned model, latencies timed interleaved in one run.

Outputs (each written atomically): ``model_fp32.onnx`` (the pruned float network), ``reference_fp32.onnx``
(the unpruned one), ``arch.json`` (the pruned architecture as data), ``model.pt`` (checkpoint with the
architecture), ``recipe.toml``, ``report.json`` / ``report.md`` with every iteration in ``trajectory``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from calibration.datasets import DataSource
from compress.errors import UserError
from compress.latency_table import LatencyTable, agreement
from compress.mobilenetv3 import ArchSpec, MobileNetV3, count_params
from compress.prune import (DIVISOR, ChannelGroup, channel_groups, pruned_spec, save_arch, shrink_group,
                            structure_problems)

__all__ = ["prune", "holdout_split", "propose", "select", "DEFAULT_OUTPUT_DIR"]

DEFAULT_OUTPUT_DIR = "runs/prune-netadapt"
CANDIDATE_DEPTH = 6  # cuts per group whose units are timed up front in one batch
MEASURE_ROUNDS = 5  # interleaved rounds (seed vs current) after every iteration
FINAL_ROUNDS = 10  # interleaved rounds of the final measurement


# -- data: fine-tune pool and holdout, both from the TRAIN split --------------------------------------------

def holdout_split(n_train: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of the train split: its first ``holdout`` images score proposals, the rest
    fine-tune them."""
    if holdout >= n_train:
        raise UserError(f"eval_images = {holdout} leaves no training images (the train split has {n_train})")
    perm = np.random.default_rng(seed).permutation(n_train)
    return perm[:holdout], perm[holdout:]


def _subsource(source: DataSource, train_idx: np.ndarray, holdout_idx: np.ndarray) -> DataSource:
    """``source`` whose "train" split is ``train_idx`` and whose "test" split is the holdout (both TRAIN)."""
    full = source._splits["train"]
    return dataclasses.replace(source, _splits={"train": lambda: Subset(full(), train_idx.tolist()),
                                                "test": lambda: Subset(full(), holdout_idx.tolist())})


def _finetune(model: MobileNetV3, source: DataSource, pool: np.ndarray, holdout: np.ndarray, steps: int,
              batch_size: int, lr: float, offset: int, seed: int) -> dict[str, float]:
    """``steps`` AdamW steps (cosine decay) on pool images from ``offset`` on; holdout top-1 and loss."""
    from compress.train import TrainConfig, evaluate, fit

    if steps <= 0:
        r = evaluate(model, _subsource(source, pool[:1], holdout))
        return {"top1": r["top1"], "loss": r["loss"]}
    take = np.take(pool, np.arange(offset, offset + steps * batch_size), mode="wrap")
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, schedule="cosine", seed=seed)
    res = fit(model, _subsource(source, take, holdout), cfg, progress=False)
    model.eval()
    return {"top1": res["final"]["test_top1"], "loss": res["final"]["test_loss"]}


# -- proposals and selection ------------------------------------------------------------------------------

def _candidates(spec: ArchSpec, group: ChannelGroup):
    """(channels, spec) for every cut of ``group`` in steps of 8 that keeps the block structure."""
    for k in range(group.channels - DIVISOR, DIVISOR - 1, -DIVISOR):
        new = pruned_spec(spec, {group.name: k})
        if not structure_problems(spec, new):
            yield k, new


def propose(spec: ArchSpec, table: LatencyTable, delta_ms: float) -> list[dict[str, Any]]:
    """One proposal per group: the smallest cut whose predicted latency is at least ``delta_ms`` lower."""
    groups = channel_groups(spec)
    first = [s for g in groups for _, s in list(_candidates(spec, g))[:CANDIDATE_DEPTH]]
    table.measure(table.missing(first))  # time the likely units in one batch
    base = table.predict(spec)
    out = []
    for g in groups:
        for k, new in _candidates(spec, g):
            pred = table.predict(new)
            if base - pred >= delta_ms:
                out.append({"group": g.name, "kind": g.kind, "channels": [g.channels, k], "spec": new,
                            "predicted_ms": pred, "saved_ms": base - pred})
                break
    return out


def select(proposals: list[dict[str, Any]], rule: str, reference_top1: float) -> int:
    """Index of the kept proposal: max ``(top1 - reference) / saved`` ("ratio") or max top1 ("min_drop");
    ties go to the lower holdout loss."""
    if not proposals:
        raise ValueError("no proposals to select from")
    if rule == "ratio":
        key = [((p["top1"] - reference_top1) / p["saved_ms"], -p["loss"]) for p in proposals]
    elif rule == "min_drop":
        key = [(p["top1"], -p["loss"]) for p in proposals]
    else:
        raise UserError(f"selection must be 'ratio' or 'min_drop', got {rule!r}")
    return max(range(len(proposals)), key=lambda i: key[i])


# -- the loop ---------------------------------------------------------------------------------------------

def _onnx_bytes(model: MobileNetV3, size: tuple[int, int]) -> bytes:
    from compress.export import to_onnx

    return to_onnx(model, size).SerializeToString()


def _measure_pair(seed_bytes: bytes, cur_bytes: bytes, threads: int, batch: int
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    from eval.latency import measure_interleaved

    r = measure_interleaved({"seed": seed_bytes, "current": cur_bytes}, threads=threads, batch=batch,
                            rounds=MEASURE_ROUNDS, round_time_s=0.1)
    return r["seed"], r["current"]


def _summary(g: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in g.items() if k not in ("spec", "model")}


def prune(recipe: Any = "netadapt", weights: str | os.PathLike | None = None, arch: str | None = None,
          dataset: str = "fashion-mnist", input_size: int | None = None,
          output_dir: str | os.PathLike | None = None, eval_limit: int | None = None,
          progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Run NetAdapt with ``recipe``'s ``[prune]`` section on a trained float model and write the outputs.

    ``weights=None`` uses the embedded default.  ``overrides`` replace ``[prune]`` keys (e.g.
    ``target_latency_ratio=0.8``).  ``eval_limit`` caps the final test-split evaluation (all when None).
    Returns the report (``report.json``'s content) plus ``output_dir``.
    """
    from compress.default_model import resolve_model
    from compress.io import ensure_dir
    from compress.train import TrainConfig, fit
    from recipes.loader import Recipe, load_recipe

    t_start = time.time()
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if overrides:
        rec = rec.with_overrides("prune", **overrides)
    cfg = rec.prune
    out = ensure_dir(output_dir or DEFAULT_OUTPUT_DIR)
    old_threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        loaded, source = resolve_model(weights, arch, dataset=dataset, input_size=input_size, progress=progress)
        if not source.has_labels:
            raise UserError("pruning needs labelled data for its fine-tunes: use fashion-mnist or imagefolder:PATH")
        size = source.preprocess.input_size
        seed_model = loaded.model.eval()
        holdout, pool = holdout_split(len(source.split("train")), cfg.eval_images, cfg.seed)
        timings: dict[str, float] = {}

        # the seed: measured latency, table prediction, holdout accuracy
        t = time.time()
        table = LatencyTable(size[0], cfg.threads, cfg.batch, progress=progress)
        seed_bytes = _onnx_bytes(seed_model, size)
        seed_lat, _ = _measure_pair(seed_bytes, seed_bytes, cfg.threads, cfg.batch)
        seed_pred = table.predict(seed_model.spec)
        delta_ms = cfg.delta_ratio * seed_pred
        seed_acc = _finetune(seed_model, source, pool, holdout, 0, cfg.batch_size, cfg.lr, 0, cfg.seed)
        timings["setup_s"] = time.time() - t
        trajectory = [{"iteration": 0, "proposal": None, "spec": seed_model.spec.to_dict(),
                       "latency_ms": seed_lat, "latency_ratio": 1.0, "predicted_ms": round(seed_pred, 5),
                       "top1": seed_acc["top1"], "holdout_loss": seed_acc["loss"],
                       "params": count_params(seed_model), "seconds": round(timings["setup_s"], 1)}]
        if progress:
            tqdm.write(f"seed: {seed_lat['median']:.4f} ms measured, {seed_pred:.4f} ms predicted "
                       f"(delta {1000 * delta_ms:.2f} us), holdout top-1 {100 * seed_acc['top1']:.2f}%")

        # the NetAdapt iterations
        t_search = time.time()
        current, cur_acc, stop = seed_model, seed_acc, "max_iterations"
        ratio = pred_ratio = 1.0
        bar = tqdm(total=cfg.max_iterations, desc="netadapt", disable=not progress)
        for it in range(1, cfg.max_iterations + 1):
            if max(ratio, pred_ratio) <= cfg.target_latency_ratio:
                stop = "target met"
                break
            t_it = time.time()
            proposals = propose(current.spec, table, delta_ms)
            if not proposals:
                stop = "no proposal can cut delta further"
                break
            offset = (it - 1) * cfg.finetune_steps * cfg.batch_size
            for p in tqdm(proposals, desc=f"iteration {it} proposals", leave=False, disable=not progress):
                group = next(g for g in channel_groups(current.spec) if g.name == p["group"])
                p["model"] = shrink_group(current, group, p["channels"][1], cfg.importance)
                p.update(_finetune(p["model"], source, pool, holdout, cfg.finetune_steps, cfg.batch_size,
                                   cfg.lr, offset, cfg.seed + it))
            best = select(proposals, cfg.selection, cur_acc["top1"])
            chosen = proposals[best]
            current, cur_acc = chosen["model"], {"top1": chosen["top1"], "loss": chosen["loss"]}
            seed_lat_it, cur_lat = _measure_pair(seed_bytes, _onnx_bytes(current, size), cfg.threads, cfg.batch)
            ratio = cur_lat["median"] / seed_lat_it["median"]
            pred_ratio = chosen["predicted_ms"] / seed_pred
            trajectory.append({
                "iteration": it, "proposal": chosen["group"], "channels": chosen["channels"],
                "spec": current.spec.to_dict(), "latency_ms": cur_lat, "seed_latency_ms": seed_lat_it["median"],
                "latency_ratio": round(ratio, 4), "predicted_ratio": round(pred_ratio, 4), "predicted_ms": round(chosen["predicted_ms"], 5),
                "top1": chosen["top1"], "holdout_loss": chosen["loss"], "params": count_params(current),
                "proposals": [_summary(p) for p in proposals], "seconds": round(time.time() - t_it, 1)})
            bar.update(1)
            bar.set_postfix(ratio=f"{ratio:.3f}", top1=f"{100 * cur_acc['top1']:.2f}", group=chosen["group"])
            if progress:
                tqdm.write(f"iteration {it}: {chosen['group']} {chosen['channels'][0]}->{chosen['channels'][1]}, "
                           f"latency {cur_lat['median']:.4f} ms ({ratio:.3f}x seed measured, {pred_ratio:.3f}x "
                           f"predicted), holdout top-1 "
                           f"{100 * chosen['top1']:.2f}% ({len(proposals)} proposals, "
                           f"{time.time() - t_it:.0f}s)")
        else:
            if max(ratio, pred_ratio) <= cfg.target_latency_ratio:
                stop = "target met"
        bar.close()
        timings["search_s"] = time.time() - t_search

        # the long fine-tune: all non-holdout train images, holdout accuracy per epoch
        t = time.time()
        final_history: list[dict[str, Any]] = []
        if cfg.final_finetune_epochs > 0 and current is not seed_model:
            tc = TrainConfig(epochs=cfg.final_finetune_epochs, batch_size=cfg.batch_size, lr=cfg.final_lr,
                             schedule="onecycle", seed=cfg.seed)
            if progress:
                tqdm.write(f"final fine-tune: {cfg.final_finetune_epochs} epoch(s) on {len(pool)} train images "
                           f"('test top-1' below is the {len(holdout)}-image TRAIN holdout)")
            res = fit(current, _subsource(source, pool, holdout), tc, progress=progress, eval_name="holdout")
            final_history = res["history"]
        current.eval()
        timings["final_finetune_s"] = time.time() - t

        # outputs and the final measurement on the test split
        result = _finish(rec, loaded, source, seed_model, current, trajectory, table, out, eval_limit, weights,
                         final_history, stop, timings, t_start, progress)
        return result
    finally:
        torch.set_num_threads(old_threads)


def _finish(rec, loaded, source, seed_model, pruned, trajectory, table, out: Path, eval_limit, weights,
            final_history, stop, timings, t_start, progress) -> dict[str, Any]:
    from compress.checkpoint import save_checkpoint
    from compress.export import export_onnx
    from compress.io import write_text
    from eval.evaluate import evaluate_onnx
    from eval.latency import measure_interleaved
    from eval.report import run_header, write_run_report

    cfg = rec.prune
    size = source.preprocess.input_size
    meta = {"dataset": source.name, "input_size": size[0], "preprocess": source.preprocess.to_json()}
    export_onnx(seed_model, out / "reference_fp32.onnx", source.preprocess, recipe="fp32",
                extra_meta={"dataset": source.name, "weights": str(weights) if weights else "default"})
    export_onnx(pruned, out / "model_fp32.onnx", source.preprocess, recipe=f"{rec.name}:fp32",
                extra_meta={"dataset": source.name, "pruned_from": str(weights) if weights else "default"})
    save_arch(out / "arch.json", pruned.spec)
    save_checkpoint(out / "model.pt", pruned, **meta, netadapt={"recipe": rec.name, "stop": stop})
    write_text(out / "recipe.toml", rec.to_toml())

    ref_bytes = (out / "reference_fp32.onnx").read_bytes()
    fp32_bytes = (out / "model_fp32.onnx").read_bytes()
    ev_ref = evaluate_onnx(ref_bytes, dataset=source, limit=eval_limit, threads=cfg.threads, latency=False)
    ev_pruned = evaluate_onnx(fp32_bytes, dataset=source, limit=eval_limit, threads=cfg.threads,
                              reference=ref_bytes, latency=False)
    variants = [{"name": "fp32", "file": "reference_fp32.onnx", "is_reference": True, **ev_ref},
                {"name": "netadapt-fp32", "file": "model_fp32.onnx", "is_reference": False, "recipe": rec.name,
                 **ev_pruned}]
    models = {"fp32": ref_bytes, "netadapt-fp32": fp32_bytes}
    quantized = None
    if cfg.quantize_after:
        from compress.quantize import quantize

        q = quantize(rec, weights=out / "model.pt", dataset=source.name, input_size=size[0],
                     output_dir=out / "int8", eval_limit=eval_limit, threads=cfg.threads, latency=False,
                     progress=progress)
        qv = next(v for v in q["variants"] if v["name"] == "int8")
        variants.append({**qv, "name": "netadapt-int8", "file": "int8/model_int8.onnx", "recipe": rec.name})
        models["netadapt-int8"] = (out / "int8" / "model_int8.onnx").read_bytes()
        quantized = {"report": "int8/report.json", "checks": q.get("checks"), "quantization": q.get("quantization")}
    lat = measure_interleaved(models, threads=cfg.threads, batch=cfg.batch, rounds=FINAL_ROUNDS)
    for v in variants:
        v["latency_ms"] = lat[v["name"]]

    # how the latency table's predictions compare with whole-network measurements
    pred = [table.predict(ArchSpec.from_dict(p["spec"])) for p in trajectory]
    meas = [p["latency_ms"]["median"] for p in trajectory]
    lut = {"path": str(table.path), "units": len(table.entries), "measured_this_run": table.measured_here,
           "base_ms": round(table.base, 5), "trajectory": agreement(pred, meas),
           "final": {"predicted_ms": round(table.predict(pruned.spec), 5),
                     "measured_ms": lat["netadapt-fp32"]["median"],
                     "seed_predicted_ms": round(table.predict(seed_model.spec), 5),
                     "seed_measured_ms": lat["fp32"]["median"]},
           "breakdown_seed_ms": dict(table.breakdown(seed_model.spec)),
           "breakdown_pruned_ms": dict(table.breakdown(pruned.spec))}
    ref_top1, p_top1 = ev_ref["accuracy"]["top1"], ev_pruned["accuracy"]["top1"]
    speedup = lat["fp32"]["median"] / lat["netadapt-fp32"]["median"]
    timings["total"] = time.time() - t_start
    extra = {
        **run_header("prune", rec, seed_model.spec, weights, loaded.source, size, source.name),
        "outputs": {"pruned_onnx": "model_fp32.onnx", "reference_onnx": "reference_fp32.onnx",
                    "architecture": "arch.json", "checkpoint": "model.pt"},
        "deployment": {"threads": cfg.threads, "batch": cfg.batch, "runtime": "onnxruntime CPU"},
        "summary": {"speedup": round(speedup, 4), "latency_ratio": round(1 / speedup, 4),
                    "top1_reference": ref_top1, "top1_pruned": p_top1,
                    "top1_drop_pt": None if ref_top1 is None or p_top1 is None else round(100 * (ref_top1 - p_top1), 3),
                    "params_reference": count_params(seed_model), "params_pruned": count_params(pruned),
                    "iterations": len(trajectory) - 1, "stop": stop},
        "evaluation": {"split": "test", "images": eval_limit or len(source.split("test")),
                       "search_holdout": f"{cfg.eval_images} TRAIN images (seeded permutation, seed {cfg.seed})"},
        "netadapt": {"trajectory_top1": "holdout TRAIN images (the variants' top-1 is the test split)",
                     "selection": cfg.selection, "importance": cfg.importance, "delta_ratio": cfg.delta_ratio,
                     "delta_ms": round(cfg.delta_ratio * pred[0], 5),
                     "target_latency_ratio": cfg.target_latency_ratio, "finetune_steps": cfg.finetune_steps,
                     "final_finetune": final_history},
        "architecture": {"reference": _channels(seed_model.spec), "pruned": _channels(pruned.spec)},
        "latency_table": lut,
        "trajectory": trajectory,
        "quantized": quantized,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    write_run_report(out, variants, extra)
    return {"variants": variants, **extra, "output_dir": str(out)}


def _channels(spec: ArchSpec) -> dict[str, Any]:
    return {"stem": spec.stem_channels, "blocks": [[b.in_ch, b.expanded, b.out_ch, b.se_channels] for b in spec.blocks],
            "last_conv": spec.last_conv, "last_channel": spec.last_channel}
