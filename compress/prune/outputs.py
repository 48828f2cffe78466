"""The outputs of one ``prune`` run (rank 0): the pruned and reference models, their test-split evaluation, one
interleaved latency measurement of every variant, the optional int8 step (netadapt-int8: the pruned AND the
unpruned network through the same int8 recipe, for the target the search ran on) and the report with the
search's trajectory, the latency table's accuracy and the final fine-tune.

Latency is measured in the search's target runtime: ONNX Runtime for ``ort-x86``; for another target (OpenVINO)
each variant is that target's own artifact (its fp32, and the int8 artifact built from the same scales), timed in
its runtime.  A target whose CPU is not this one (``ort-arm64``) gets the table's prediction for the device and
this machine's ONNX Runtime measurement, labelled as such."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx

from calibration.source import DataSource
from compress.io import write_text
from compress.models.checkpoint import save_checkpoint
from compress.models.mobilenetv3 import ArchSpec, MobileNetV3, count_params
from compress.onnx.export import export_onnx
from compress.prune.channels import save_arch
from compress.prune.latency_table import agreement
from compress.prune.unit_timing import Timing, measure_artifacts
from compress.training.distributed import DistContext
from eval.evaluate import evaluate_onnx
from eval.report import run_header, write_run_report
from recipes.loader import Recipe

__all__ = ["PruneRun", "FINAL_ROUNDS"]

FINAL_ROUNDS = 10  # interleaved rounds of the final measurement


class PruneRun:
    """The outputs of one prune run: the models, their test-split evaluation, one interleaved latency run and the
    report (the search's trajectory, the latency table's accuracy, the final fine-tune)."""

    def __init__(self, rec: Recipe, loaded, source: DataSource, out: Path, eval_limit, weights, progress: bool,
                 t_start: float, timing: Timing | None = None) -> None:
        self.rec, self.cfg, self.loaded, self.source, self.out = rec, rec.prune, loaded, source, out
        self.eval_limit, self.weights, self.progress, self.t_start = eval_limit, weights, progress, t_start
        self.size = source.preprocess.input_size
        self.timing = timing or Timing()
        # where the variants are timed: the target's runtime when it runs here, else ONNX Runtime on this CPU
        self.timed_on = self.timing.target if self.timing.measurable_here else "ort-x86"

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

    def quantize(self, weights, folder: str, name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
        """The recipe's [quantize] / [calibration] on ``weights`` (None: the embedded default) into ``folder``,
        for the search's target; returns its report variant (the target's artifact, evaluated in its runtime),
        a summary and ``{"ort-x86": int8 ONNX, target: its artifact}``."""
        from compress.quant.pipeline import quantize

        target = self.timing.target
        q = quantize(self.rec.replace(command="quantize"), weights=weights, dataset=self.source.name,
                     input_size=self.size[0], workers=self.source.workers, output_dir=self.out / folder,
                     eval_limit=self.eval_limit, threads=self.cfg.threads, latency=False, progress=self.progress,
                     targets=None if target == "ort-x86" else target)
        key = "int8" if target == "ort-x86" else f"int8/{target}"
        qv = next(v for v in q["variants"] if v["name"] == key)
        artifacts = {"ort-x86": (self.out / folder / "model_int8.onnx").read_bytes(),
                     target: (self.out / folder / qv["file"]).read_bytes()}
        variant = {**qv, "name": name, "file": f"{folder}/{qv['file']}", "recipe": self.rec.name, "target": target}
        summary = {"report": f"{folder}/report.json", "checks": q.get("checks"),
                   "quantization": q.get("quantization"), "target": target}
        return variant, summary, artifacts

    def measure(self, fp32: dict[str, bytes], int8: dict[str, dict[str, bytes]], modules: dict[str, Any]
                ) -> dict[str, dict[str, Any]]:
        """Every variant in one interleaved measurement, in the runtime ``timed_on`` names (``modules``: the
        torch networks of the fp32 variants, which ExecuTorch builds its fp32 programs from)."""
        timing = Timing(self.timed_on, "fp32")
        artifacts = {k: timing.artifact(onnx.load_from_string(v), (3, *self.size), self.cfg.batch,
                                        module=modules.get(k)) for k, v in fp32.items()}
        artifacts.update({k: v[self.timed_on] for k, v in int8.items()})
        return measure_artifacts(artifacts, Timing(self.timed_on, "int8"), self.size, self.cfg.threads,
                                 self.cfg.batch, FINAL_ROUNDS, round_time_s=0.2)

    def finish(self, search, final_history: list[dict[str, Any]]) -> dict[str, Any]:
        seed_model, pruned, cfg, src = search.seed_model, search.current, self.cfg, self.source
        models = self.write_models(seed_model, pruned, search.stop)
        ev_ref = evaluate_onnx(models["fp32"], dataset=src, limit=self.eval_limit, threads=cfg.threads, latency=False)
        ev_pruned = evaluate_onnx(models["netadapt-fp32"], dataset=src, limit=self.eval_limit, threads=cfg.threads,
                                  reference=models["fp32"], latency=False)
        variants = [{"name": "fp32", "file": "reference_fp32.onnx", "is_reference": True, **ev_ref},
                    {"name": "netadapt-fp32", "file": "model_fp32.onnx", "is_reference": False,
                     "recipe": self.rec.name, **ev_pruned}]
        quantized, int8 = None, {}
        if cfg.quantize_after:
            ref_variant, _, int8["int8"] = self.quantize(self.weights, "int8-reference", "int8")
            variant, quantized, int8["netadapt-int8"] = self.quantize(self.out / "model.pt", "int8", "netadapt-int8")
            ref_variant["is_reference"] = False
            quantized["top1"] = variant["accuracy"]["top1"]
            variants += [ref_variant, variant]
        lat = self.measure(models, int8, {"fp32": seed_model, "netadapt-fp32": pruned})
        for v in variants:
            v["latency_ms"] = lat[v["name"]]
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
        int8 = "netadapt-int8" in lat and self.timing.precision == "int8"
        seed_key, pruned_key = ("int8", "netadapt-int8") if int8 else ("fp32", "netadapt-fp32")
        lut = {"path": str(table.path), "timing": self.timing.key, "channel_step": search.step,
               "units": len(table.entries), "measured_this_run": table.measured_here,
               "base_ms": round(table.base, 5), "anchor": table.anchor, "weights": table.weights,
               "trajectory" if table.device is None else "trajectory_vs_host_proxy": agreement(pred, meas),
               "final": {"predicted_ms": round(table.predict(pruned.spec), 5),
                         "measured_ms": lat[pruned_key]["median"],
                         "seed_predicted_ms": round(table.predict(seed_model.spec), 5),
                         "seed_measured_ms": lat[seed_key]["median"], "measured_variants": [seed_key, pruned_key],
                         "predicted_ratio": round(table.predict(pruned.spec) / table.predict(seed_model.spec), 4)},
               "breakdown_seed_ms": dict(table.breakdown(seed_model.spec)),
               "breakdown_pruned_ms": dict(table.breakdown(pruned.spec))}
        if table.device is not None:
            lut["device_table"] = table.device.summary()
        ref_top1, p_top1 = ev_ref["accuracy"]["top1"], ev_pruned["accuracy"]["top1"]
        speedup = lat["fp32"]["median"] / lat["netadapt-fp32"]["median"]
        int8_summary = {}
        if "netadapt-int8" in lat:
            q_top1 = (quantized or {}).get("top1")
            int8_summary = {"int8_speedup": round(lat["int8"]["median"] / lat["netadapt-int8"]["median"], 4),
                            "int8_latency_ratio": round(lat["netadapt-int8"]["median"] / lat["int8"]["median"], 4),
                            "top1_pruned_int8": q_top1,
                            "top1_pruned_int8_drop_vs_float_pt": None if q_top1 is None or ref_top1 is None
                            else round(100 * (ref_top1 - q_top1), 3)}
        return {
            **run_header("prune", self.rec, seed_model.spec, self.weights, self.loaded.source, self.size,
                         self.source.identity),
            "outputs": {"pruned_onnx": "model_fp32.onnx", "reference_onnx": "reference_fp32.onnx",
                        "architecture": "arch.json", "checkpoint": "model.pt"},
            "deployment": {"threads": cfg.threads, "batch": cfg.batch, "target": self.timing.target,
                           "latency_precision": self.timing.precision, "timed_on": self.timed_on,
                           "runtime": Timing(self.timed_on).runtime_version()},
            "summary": {"speedup": round(speedup, 4), "latency_ratio": round(1 / speedup, 4),
                        "top1_reference": ref_top1, "top1_pruned": p_top1,
                        "top1_drop_pt": None if ref_top1 is None or p_top1 is None
                        else round(100 * (ref_top1 - p_top1), 3),
                        "params_reference": count_params(seed_model), "params_pruned": count_params(pruned),
                        "iterations": len(trajectory) - 1, "stop": search.stop, **int8_summary},
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
