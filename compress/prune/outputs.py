"""The outputs of one ``prune`` run (rank 0): the pruned and reference models, their test-split evaluation, one
interleaved latency measurement of every variant, the optional int8 step (netadapt-int8) and the report with the
search's trajectory, the latency table's accuracy and the final fine-tune."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calibration.source import DataSource
from compress.io import write_text
from compress.models.checkpoint import save_checkpoint
from compress.models.mobilenetv3 import ArchSpec, MobileNetV3, count_params
from compress.onnx.export import export_onnx
from compress.prune.channels import save_arch
from compress.prune.latency_table import agreement
from compress.training.distributed import DistContext
from eval.evaluate import evaluate_onnx
from eval.latency import measure_interleaved
from eval.report import run_header, write_run_report
from recipes.loader import Recipe

__all__ = ["PruneRun", "FINAL_ROUNDS"]

FINAL_ROUNDS = 10  # interleaved rounds of the final measurement


class PruneRun:
    """The outputs of one prune run: the models, their test-split evaluation, one interleaved latency run and the
    report (the search's trajectory, the latency table's accuracy, the final fine-tune)."""

    def __init__(self, rec: Recipe, loaded, source: DataSource, out: Path, eval_limit, weights, progress: bool,
                 t_start: float, targets: str | None = None) -> None:
        self.rec, self.cfg, self.loaded, self.source, self.out = rec, rec.prune, loaded, source, out
        self.eval_limit, self.weights, self.progress, self.t_start = eval_limit, weights, progress, t_start
        self.targets = targets
        self.size = source.preprocess.input_size

    def write_models(self, seed_model: MobileNetV3, pruned: MobileNetV3, stop: str) -> dict[str, bytes]:
        src, out, w = self.source, self.out, self.weights
        meta = {"dataset": src.name, "input_size": self.size[0], "preprocess": src.preprocess.to_json()}
        export_onnx(seed_model, out / "reference_fp32.onnx", src.preprocess, recipe="fp32",
                    extra_meta={"dataset": src.name, "weights": str(w) if w else "default"})
        export_onnx(pruned, out / "model_fp32.onnx", src.preprocess, recipe=f"{self.rec.name}:fp32",
                    extra_meta={"dataset": src.name, "pruned_from": str(w) if w else "default"})
        save_arch(out / "arch.json", pruned.spec)
        save_checkpoint(out / "model.pt", pruned, **meta, netadapt={"recipe": self.rec.name, "stop": stop})
        write_text(out / "recipe.toml", self.rec.to_toml())
        return {"fp32": (out / "reference_fp32.onnx").read_bytes(),
                "netadapt-fp32": (out / "model_fp32.onnx").read_bytes()}

    def quantize_pruned(self) -> tuple[list[dict[str, Any]], dict[str, Any], bytes]:
        """netadapt-int8: the recipe's [quantize] / [calibration] applied to the pruned checkpoint (int8/); the
        int8 variant, then one per other deploy target (their latency is their runtime's: not measured here)."""
        from compress.quant.pipeline import quantize

        q = quantize(self.rec.replace(command="quantize"), weights=self.out / "model.pt", dataset=self.source.name,
                     input_size=self.size[0], workers=self.source.workers,
                     output_dir=self.out / "int8", eval_limit=self.eval_limit, threads=self.cfg.threads,
                     latency=False, progress=self.progress, targets=self.targets)
        qv = next(v for v in q["variants"] if v["name"] == "int8")
        variants = [{**qv, "name": "netadapt-int8", "file": "int8/model_int8.onnx", "recipe": self.rec.name}]
        variants += [{**v, "name": f"netadapt-int8/{v['target']}", "file": f"int8/{v['file']}", "recipe": self.rec.name}
                     for v in q["variants"] if v.get("target") not in (None, "ort-x86")]
        quantized = {"report": "int8/report.json", "checks": q.get("checks"), "quantization": q.get("quantization"),
                     "targets": q.get("targets")}
        return variants, quantized, (self.out / "int8" / "model_int8.onnx").read_bytes()

    def finish(self, search, final_history: list[dict[str, Any]]) -> dict[str, Any]:
        seed_model, pruned, cfg, src = search.seed_model, search.current, self.cfg, self.source
        models = self.write_models(seed_model, pruned, search.stop)
        ev_ref = evaluate_onnx(models["fp32"], dataset=src, limit=self.eval_limit, threads=cfg.threads, latency=False)
        ev_pruned = evaluate_onnx(models["netadapt-fp32"], dataset=src, limit=self.eval_limit, threads=cfg.threads,
                                  reference=models["fp32"], latency=False)
        variants = [{"name": "fp32", "file": "reference_fp32.onnx", "is_reference": True, **ev_ref},
                    {"name": "netadapt-fp32", "file": "model_fp32.onnx", "is_reference": False,
                     "recipe": self.rec.name, **ev_pruned}]
        quantized = None
        if cfg.quantize_after:
            int8_variants, quantized, models["netadapt-int8"] = self.quantize_pruned()
            variants += int8_variants
        lat = measure_interleaved(models, threads=cfg.threads, batch=cfg.batch, rounds=FINAL_ROUNDS)
        for v in variants:
            v["latency_ms"] = lat.get(v["name"])  # another target's artifact: timed in its runtime, not here
        search.timings["total"] = time.time() - self.t_start
        extra = self.report(search, final_history, lat, ev_ref, ev_pruned, quantized)
        write_run_report(self.out, variants, extra)
        return {"variants": variants, **extra, "output_dir": str(self.out)}

    def report(self, search, final_history, lat, ev_ref, ev_pruned, quantized) -> dict[str, Any]:
        cfg, table, seed_model, pruned, trajectory = self.cfg, search.table, search.seed_model, search.current, \
            search.trajectory
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
        return {
            **run_header("prune", self.rec, seed_model.spec, self.weights, self.loaded.source, self.size,
                         self.source.identity),
            "outputs": {"pruned_onnx": "model_fp32.onnx", "reference_onnx": "reference_fp32.onnx",
                        "architecture": "arch.json", "checkpoint": "model.pt"},
            "deployment": {"threads": cfg.threads, "batch": cfg.batch, "runtime": "onnxruntime CPU"},
            "summary": {"speedup": round(speedup, 4), "latency_ratio": round(1 / speedup, 4),
                        "top1_reference": ref_top1, "top1_pruned": p_top1,
                        "top1_drop_pt": None if ref_top1 is None or p_top1 is None
                        else round(100 * (ref_top1 - p_top1), 3),
                        "params_reference": count_params(seed_model), "params_pruned": count_params(pruned),
                        "iterations": len(trajectory) - 1, "stop": search.stop},
            "evaluation": {"split": "test", "images": self.eval_limit or len(self.source.split("test")),
                           "search_holdout": f"{cfg.eval_images} TRAIN images (seeded permutation, seed {cfg.seed})"},
            "netadapt": {"trajectory_top1": "holdout TRAIN images (the variants' top-1 is the test split)",
                         "selection": cfg.selection, "importance": cfg.importance, "delta_ratio": cfg.delta_ratio,
                         "delta_ms": round(cfg.delta_ratio * pred[0], 5),
                         "target_latency_ratio": cfg.target_latency_ratio, "finetune_steps": cfg.finetune_steps,
                         "finetune_settings": search.settings, "final_finetune": final_history,
                         "data_parallel": _data_parallel(search.ctx, cfg)},
            "architecture": {"reference": _channels(seed_model.spec), "pruned": _channels(pruned.spec)},
            "latency_table": lut,
            "trajectory": trajectory,
            "quantized": quantized,
            "timings_s": {k: round(v, 2) for k, v in search.timings.items()},
        }


def _data_parallel(ctx: DistContext, cfg) -> dict[str, Any]:
    out: dict[str, Any] = {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                           "batch_per_process": cfg.batch_size, "global_batch": cfg.batch_size * ctx.world_size}
    if ctx.distributed:
        out["decisions"] = ("every rank ran the same search; latency measured on rank 0 and broadcast, the kept "
                            "proposal chosen on rank 0, holdout accuracy summed over ranks")
    return out


def _channels(spec: ArchSpec) -> dict[str, Any]:
    return {"stem": spec.stem_channels, "blocks": [[b.in_ch, b.expanded, b.out_ch, b.se_channels] for b in spec.blocks],
            "last_conv": spec.last_conv, "last_channel": spec.last_channel}
