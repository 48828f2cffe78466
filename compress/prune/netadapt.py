"""NetAdapt (Yang et al., 2018) as used for MobileNetV3 (Howard et al., 2019, §4.2): ``mnv3-compress prune``.

Start from a trained network.  Each iteration makes one *proposal* per channel group
(:func:`compress.prune.channels.channel_groups`: one block's expansion, or the bottleneck of all blocks sharing a
residual stream, or the head): the smallest cut, in steps of the target's kernel multiple (``channel_step``: 8,
16 for ORT's x86 int8), whose latency - predicted by the measured per-layer table
(:mod:`compress.prune.latency_table`) on the deploy target, in the precision it ships (``latency_precision``;
:mod:`compress.prune.unit_timing`) - is at least ``delta = delta_ratio x L(seed)`` lower (once no group can save
delta, it halves, at most ``DELTA_HALVINGS`` times).  Each proposal keeps its most important channels
(``importance``), gets a short fine-tune on the train split, and is scored on a held-out subset of the TRAIN
split (never the test split).  The kept proposal maximises ``dAccuracy / |dLatency|`` (``selection = "ratio"``,
the MobileNetV3 rule) or the accuracy itself (``"min_drop"``, NetAdapt's original rule).  Its whole-network
latency is then measured (the target's runtime and precision, the deployment's threads and batch, interleaved
with the seed model); the
loop stops once that measurement and the table's prediction are both at most ``target_latency_ratio`` of the
seed's; once the prediction is there, a measurement ``CONFIRM_FACTOR`` times longer replaces the quick one, so a
few seconds of machine drift neither end the search early nor keep it cutting.  With a device table (a target
whose CPU is not this one) the prediction alone decides, and the measurement here is reported as a host proxy.
A longer fine-tune follows, and the result is measured on the full test split against the unpruned model,
latencies timed interleaved in one run.

Outputs (each written atomically): ``model_fp32.onnx`` (the pruned float network), ``reference_fp32.onnx``
(the unpruned one), ``arch.json`` (the pruned architecture as data), ``model.pt`` (checkpoint with the
architecture), ``recipe.toml``, ``report.json`` / ``report.md`` with every iteration in ``trajectory``.

Under torchrun every rank runs the same search in lockstep and the fine-tunes (short and final) are
DistributedDataParallel (``batch_size`` images per process, as ``train``'s ``--batch-size``; a short fine-tune
is ``finetune_steps`` steps of the global batch).  Every rank must hold each proposal to fine-tune it, so every
rank builds the same proposals; what would differ or must happen once is rank 0's and handed to the others
(:func:`compress.training.distributed.from_main`): the latency measurements (timing N copies at once on one
CPU would make each slower; the other ranks wait idle meanwhile) and the latency table's cache file, and the
kept proposal (rank 0's choice, so a tie broken differently can never split the ranks).  Holdout accuracy is
summed over ranks, so every rank sees the same scores.  After the final fine-tune the process group is left
and rank 0 alone writes, evaluates and measures the outputs; the other ranks return.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from calibration.datasets import DataSource
from calibration.subsets import partition
from compress.errors import UserError
from compress.io import ensure_dir
from compress.models.mobilenetv3 import ArchSpec, MobileNetV3, count_params
from compress.prune.channels import (
    DIVISOR,
    ChannelGroup,
    channel_groups,
    pruned_spec,
    shrink_group,
    structure_problems,
)
from compress.prune.latency_table import LatencyTable, SharedTable
from compress.prune.outputs import PruneRun
from compress.prune.unit_timing import Timing, measure_artifacts, network_artifact
from compress.training import distributed
from compress.training.default_model import resolve_model
from compress.training.distributed import DistContext, launch_rank, launched_by_torchrun
from compress.training.train import TrainConfig, evaluate, fit
from recipes.loader import Recipe, load_recipe

__all__ = ["prune", "holdout_split", "propose", "select", "DEFAULT_OUTPUT_DIR"]

DEFAULT_OUTPUT_DIR = "runs/prune-netadapt"
CANDIDATE_DEPTH = 6  # cuts per group whose units are timed up front in one batch
MEASURE_ROUNDS = 20  # interleaved rounds of ~0.1 s (seed vs current) after every iteration
CONFIRM_FACTOR = 3  # once the prediction reaches the target, a measurement this many times longer decides the stop
DELTA_HALVINGS = 3  # when no group can save delta any more, halve it (down to delta / 8) before giving up


# -- data: fine-tune pool and holdout, both from the TRAIN split --------------------------------------------

def holdout_split(n_train: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of the train split: its first ``holdout`` images score proposals, the rest
    fine-tune them (in permutation order: the fine-tunes walk through the pool)."""
    if holdout >= n_train:
        raise UserError(f"eval_images = {holdout} leaves no training images (the train split has {n_train})")
    held, pool = partition(n_train, [holdout, None], seed, sort=False)
    return held, pool


def _subsource(source: DataSource, train_idx: np.ndarray, holdout_idx: np.ndarray) -> DataSource:
    """``source`` whose "train" split is ``train_idx`` and whose "test" split is the holdout (both TRAIN)."""
    return source.resplit(train=train_idx, test=holdout_idx, of="train")


# what a fine-tune takes from the start model's own training recipe (a train checkpoint's "train_config")
FINETUNE_KEYS = ("pad_crop", "hflip", "label_smoothing", "weight_decay", "bn_momentum")


def finetune_settings(start_meta: dict[str, Any]) -> dict[str, Any]:
    """Augmentation, label smoothing, weight decay and BN momentum of the fine-tunes: the start model's own
    (a model trained without random crops is fine-tuned without them), else ``TrainConfig``'s defaults for
    checkpoints that record no training recipe (torchvision, timm).  BN momentum stays what the model was
    trained with: pruning changes what every later BatchNorm sees, and the short fine-tunes must re-estimate
    the running statistics (``TrainConfig``'s 0.1 moves them ~57 % of the way in 8 steps)."""
    recorded = start_meta.get("train_config") if isinstance(start_meta.get("train_config"), dict) else {}
    defaults = TrainConfig()
    values = {k: recorded.get(k, getattr(defaults, k)) for k in FINETUNE_KEYS}
    return {**values, "from": "the start model's training recipe" if recorded else "TrainConfig defaults"}


def _finetune(model: MobileNetV3, source: DataSource, pool: np.ndarray, holdout: np.ndarray, steps: int,
              batch_size: int, lr: float, offset: int, seed: int, ctx: DistContext,
              settings: dict[str, Any] | None = None) -> dict[str, float]:
    """``steps`` AdamW steps (cosine decay) of ``batch_size`` images per process on pool images from ``offset``
    on (DDP under torchrun); holdout top-1 and loss (summed over ranks: the same on every rank)."""
    if steps <= 0:
        home = next(model.parameters()).device
        r = evaluate(model.to(ctx.device), _subsource(source, pool[:1], holdout), dist=ctx)
        model.to(home)
        return {"top1": r["top1"], "loss": r["loss"]}
    take = np.take(pool, np.arange(offset, offset + steps * batch_size * ctx.world_size), mode="wrap")
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, schedule="cosine", seed=seed,
                      **{k: v for k, v in (settings or {}).items() if k in FINETUNE_KEYS})
    res = fit(model, _subsource(source, take, holdout), cfg, progress=False, dist=ctx)
    model.eval()
    return {"top1": res["final"]["test_top1"], "loss": res["final"]["test_loss"]}


# -- proposals and selection ------------------------------------------------------------------------------

def _candidates(spec: ArchSpec, group: ChannelGroup, step: int = DIVISOR):
    """(channels, spec) for every cut of ``group`` to a multiple of ``step`` that keeps the block structure."""
    for k in range((group.channels - 1) // step * step, DIVISOR - 1, -step):
        new = pruned_spec(spec, {group.name: k})
        if not structure_problems(spec, new):
            yield k, new


def candidate_specs(spec: ArchSpec, step: int = DIVISOR, depth: int = CANDIDATE_DEPTH) -> list[ArchSpec]:
    """The first ``depth`` cuts of every group: what the first iteration predicts (and a device table holds)."""
    return [s for g in channel_groups(spec) for _, s in list(_candidates(spec, g, step))[:depth]]


def propose(spec: ArchSpec, table: LatencyTable, delta_ms: float, step: int = DIVISOR) -> list[dict[str, Any]]:
    """One proposal per group: the smallest cut whose predicted latency is at least ``delta_ms`` lower.  Groups
    go deeper together: each round times every unresolved group's next cut in one batch (a target whose units
    take seconds to build builds them side by side)."""
    groups = channel_groups(spec)
    table.measure(table.missing(candidate_specs(spec, step)))  # time the likely units in one batch
    base = table.predict(spec)
    pending = {g.name: (g, _candidates(spec, g, step)) for g in groups}
    found: dict[str, dict[str, Any]] = {}
    while pending:
        level = {}
        for name, (g, cuts) in list(pending.items()):
            cut = next(cuts, None)
            if cut is None:
                del pending[name]
            else:
                level[name] = (g, *cut)
        table.measure(table.missing([new for _, _, new in level.values()]))
        for name, (g, k, new) in level.items():
            pred = table.predict(new)
            if base - pred >= delta_ms:
                found[name] = {"group": g.name, "kind": g.kind, "channels": [g.channels, k], "spec": new,
                               "predicted_ms": pred, "saved_ms": base - pred}
                del pending[name]
    return [found[g.name] for g in groups if g.name in found]


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

def _measure_pair(seed_bytes: bytes, cur_bytes: bytes, threads: int, batch: int, ctx: DistContext,
                  timing: Timing, size: tuple[int, int], rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seed and current network timed interleaved, on rank 0 alone; every rank gets the result."""
    def on_main() -> tuple[dict[str, Any], dict[str, Any]]:
        r = measure_artifacts({"seed": seed_bytes, "current": cur_bytes}, timing, size, threads, batch, rounds)
        return r["seed"], r["current"]

    return distributed.from_main(ctx, on_main)


def _summary(g: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in g.items() if k not in ("spec", "model")}


def prune(recipe: Any = "netadapt", weights: str | os.PathLike | None = None, arch: str | None = None,
          dataset: str | None = None, input_size: int | None = None,
          output_dir: str | os.PathLike | None = None, eval_limit: int | None = None,
          progress: bool = True, device: str = "auto", model_options: dict[str, Any] | None = None,
          target: str | None = None, latency_table: str | os.PathLike | None = None,
          **overrides: Any) -> dict[str, Any]:
    """Run NetAdapt with ``recipe``'s ``[prune]`` section on a trained float model and write the outputs.

    ``weights=None`` uses the embedded default.  ``overrides`` replace ``[prune]`` keys (e.g.
    ``target_latency_ratio=0.8``, ``limit_train=N``); ``model_options`` (``width_mult``, ``minimalistic``,
    ``num_classes``, ``workers``, ``train_default``) go to :func:`compress.training.default_model.resolve_model`.
    ``eval_limit`` caps the final test-split evaluation (all when None).  ``device`` (auto / cpu / cuda; under
    torchrun GPU ``LOCAL_RANK``) is where the fine-tunes run; latency is measured on the CPU, in ``target``'s
    runtime (default ``ort-x86``) and the recipe's ``latency_precision``; ``latency_table``: a table measured on
    the device (:class:`compress.prune.latency_table.DeviceTable`) for a target whose CPU is not this one.  Returns
    the report (``report.json``'s content) plus ``output_dir``; under torchrun, ranks other than 0 return
    ``{"rank", "world_size", "output_dir"}`` after the final fine-tune, having written nothing.
    """
    t_start = time.time()
    rec = (recipe if isinstance(recipe, Recipe) else load_recipe(recipe)).require_command("prune")
    if overrides:
        rec = rec.with_overrides("prune", **overrides)
    cfg = rec.prune
    timing = Timing(target or "ort-x86", cfg.latency_precision)
    if latency_table is None:
        timing.check()  # a missing runtime or a device-only target: one line, before any work
    elif not Path(latency_table).is_file():
        raise UserError(f"latency table not found: {latency_table}")
    if launched_by_torchrun() and cfg.quantize_after and rec.strategy == "qat":
        raise UserError("under torchrun, prune cannot run a QAT recipe after pruning (rank 0 would train alone): "
                        "prune first, then run 'quantize' under torchrun with --weights OUTPUT_DIR/model.pt")
    main = launch_rank()[0] == 0
    out = ensure_dir(output_dir or DEFAULT_OUTPUT_DIR) if main else Path(output_dir or DEFAULT_OUTPUT_DIR)
    old_threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        if launched_by_torchrun() and (model_options or {}).get("train_default"):
            raise UserError("--train-default does not run under torchrun (every process would train it): train "
                            "the default once without torchrun, then launch with --weights")
        loaded, source = resolve_model(weights, arch, dataset=dataset, input_size=input_size,
                                       progress=progress and main, **(model_options or {}))
        if not source.has_labels:
            raise UserError("pruning needs labelled data for its fine-tunes: use fashion-mnist or imagefolder:PATH")
        with distributed.session(device) as ctx:
            search = _Search(rec, loaded.model.eval(), source, progress and ctx.is_main, ctx,
                             finetune_settings(loaded.meta), timing, latency_table)
            search.run()
            final_history = search.final_finetune()
        if not ctx.is_main:  # the search is done: rank 0 writes, evaluates and measures
            return {"rank": ctx.rank, "world_size": ctx.world_size, "output_dir": str(out)}
        run = PruneRun(rec, loaded, source, out, eval_limit, weights, progress, t_start, timing)
        return run.finish(search, final_history)
    finally:
        torch.set_num_threads(old_threads)


class _Search:
    """NetAdapt's loop on one seed model: proposals, short fine-tunes, selection, measured latency."""

    def __init__(self, rec: Recipe, seed_model: MobileNetV3, source: DataSource, progress: bool,
                 ctx: DistContext, settings: dict[str, Any], timing: Timing, device_table=None) -> None:
        self.rec, self.cfg, self.seed_model, self.source, self.progress = rec, rec.prune, seed_model, source, progress
        self.ctx, self.settings, self.timing = ctx, settings, timing
        self.step = rec.prune.channel_step or timing.channel_step
        self.size = source.preprocess.input_size
        n_train = len(source.split("train", self.cfg.limit_train or None))
        self.holdout, self.pool = holdout_split(n_train, self.cfg.eval_images, self.cfg.seed)
        self.timings: dict[str, float] = {}
        self.stop = "max_iterations"
        t = time.time()
        cfg = self.cfg
        self.table = LatencyTable(self.size[0], cfg.threads, cfg.batch, progress=progress, timing=timing,
                                  device_table=device_table)
        self.measured_stop = self.table.device is None  # a device table: its prediction decides
        self.shared = SharedTable(self.table, ctx)  # what the search reads: rank 0's measurements
        self.seed_bytes = self.artifact(seed_model)
        self.shared.calibrate(seed_model.spec, self.seed_bytes)  # the weights' cost, fitted on the seed network
        seed_lat, _ = self.measure_pair(self.seed_bytes)
        self.seed_pred = self.shared.predict(seed_model.spec)
        self.delta_ms = cfg.delta_ratio * self.seed_pred
        self.halvings = 0
        seed_acc = _finetune(seed_model, source, self.pool, self.holdout, 0, cfg.batch_size, cfg.lr, 0, cfg.seed,
                             ctx, settings)
        self.timings["setup_s"] = time.time() - t
        self.current, self.cur_acc = seed_model, seed_acc
        self.trajectory = [{"iteration": 0, "proposal": None, "spec": seed_model.spec.to_dict(),
                            "latency_ms": seed_lat, "latency_ratio": 1.0, "predicted_ms": round(self.seed_pred, 5),
                            "top1": seed_acc["top1"], "holdout_loss": seed_acc["loss"],
                            "params": count_params(seed_model), "seconds": round(self.timings["setup_s"], 1)}]
        if progress:
            where = "measured" if self.measured_stop else "measured here (host proxy)"
            tqdm.write(f"seed ({timing.key}, cuts of {self.step} channels): {seed_lat['median']:.4f} ms {where}, "
                       f"{self.seed_pred:.4f} ms predicted (delta {1000 * self.delta_ms:.2f} us), holdout top-1 "
                       f"{100 * seed_acc['top1']:.2f}%")

    def artifact(self, model: MobileNetV3) -> bytes:
        return network_artifact(model, self.size, self.timing, self.cfg.batch)

    def measure_pair(self, current: bytes, rounds: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return _measure_pair(self.seed_bytes, current, self.cfg.threads, self.cfg.batch, self.ctx, self.timing,
                             self.size, rounds or MEASURE_ROUNDS)

    def measure_current(self, cur_bytes: bytes, pred_ratio: float
                        ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """Seed and current latency after an iteration, and the confirmation (None when none was needed).

        Once the prediction reaches the target the stop hangs on this measurement, so a measurement
        ``CONFIRM_FACTOR`` times longer replaces the quick one: a few seconds of machine drift then neither end
        the search early nor keep it cutting.  The quick ratio stays in the report."""
        seed_lat, cur_lat = self.measure_pair(cur_bytes)
        if not (self.measured_stop and pred_ratio <= self.cfg.target_latency_ratio):
            return seed_lat, cur_lat, None
        rounds = CONFIRM_FACTOR * MEASURE_ROUNDS
        seed_c, cur_c = self.measure_pair(cur_bytes, rounds)
        return seed_c, cur_c, {"rounds": rounds, "quick_ratio": round(cur_lat["median"] / seed_lat["median"], 4)}

    def reached(self, ratio: float, pred_ratio: float) -> bool:
        return (max(ratio, pred_ratio) if self.measured_stop else pred_ratio) <= self.cfg.target_latency_ratio

    def run(self) -> None:
        """Iterate until the measured AND predicted latency reach the target (or nothing can be cut)."""
        cfg = self.cfg
        t_search = time.time()
        ratio = pred_ratio = 1.0
        bar = tqdm(total=cfg.max_iterations, desc="netadapt", disable=not self.progress)
        for it in range(1, cfg.max_iterations + 1):
            if self.reached(ratio, pred_ratio):
                self.stop = "target met"
                break
            step = self.iteration(it)
            while step is None and self.halvings < DELTA_HALVINGS:  # late in a search: smaller steps
                self.delta_ms, self.halvings = self.delta_ms / 2, self.halvings + 1
                if self.progress:
                    tqdm.write(f"no group can save {2000 * self.delta_ms:.2f} us any more: delta halved to "
                               f"{1000 * self.delta_ms:.2f} us")
                step = self.iteration(it)
            if step is None:
                self.stop = "no proposal can cut delta further"
                break
            ratio, pred_ratio = step["latency_ratio"], step["predicted_ratio"]
            bar.update(1)
            bar.set_postfix(ratio=f"{ratio:.3f}", top1=f"{100 * self.cur_acc['top1']:.2f}", group=step["proposal"])
        else:
            if self.reached(ratio, pred_ratio):
                self.stop = "target met"
        bar.close()
        self.table.close()  # the build workers idle through the final fine-tune otherwise
        self.timings["search_s"] = time.time() - t_search

    def iteration(self, it: int) -> dict[str, Any] | None:
        """One NetAdapt iteration: propose, fine-tune each proposal, keep one, measure it (None: no proposal)."""
        cfg, t_it = self.cfg, time.time()
        proposals = propose(self.current.spec, self.shared, self.delta_ms, self.step)
        if not proposals:
            return None
        offset = (it - 1) * cfg.finetune_steps * cfg.batch_size * self.ctx.world_size
        for p in tqdm(proposals, desc=f"iteration {it} proposals", leave=False, disable=not self.progress):
            group = next(g for g in channel_groups(self.current.spec) if g.name == p["group"])
            p["model"] = shrink_group(self.current, group, p["channels"][1], cfg.importance)
            p.update(_finetune(p["model"], self.source, self.pool, self.holdout, cfg.finetune_steps, cfg.batch_size,
                               cfg.lr, offset, cfg.seed + it, self.ctx, self.settings))
        chosen = proposals[distributed.from_main(self.ctx, select, proposals, cfg.selection, self.cur_acc["top1"])]
        self.current, self.cur_acc = chosen["model"], {"top1": chosen["top1"], "loss": chosen["loss"]}
        pred_ratio = chosen["predicted_ms"] / self.seed_pred
        seed_lat_it, cur_lat, confirmation = self.measure_current(self.artifact(self.current), pred_ratio)
        ratio = cur_lat["median"] / seed_lat_it["median"]
        step = {
            "iteration": it, "proposal": chosen["group"], "channels": chosen["channels"],
            "delta_ms": round(self.delta_ms, 5),
            "spec": self.current.spec.to_dict(), "latency_ms": cur_lat, "seed_latency_ms": seed_lat_it["median"],
            "latency_ratio": round(ratio, 4), "predicted_ratio": round(pred_ratio, 4),
            "predicted_ms": round(chosen["predicted_ms"], 5), "top1": chosen["top1"], "holdout_loss": chosen["loss"],
            "params": count_params(self.current), "proposals": [_summary(p) for p in proposals],
            "seconds": round(time.time() - t_it, 1)}
        if confirmation:
            step["confirmation"] = confirmation
        self.trajectory.append(step)
        if self.progress:
            how = f"measured over {confirmation['rounds']} rounds" if confirmation else "measured"
            tqdm.write(f"iteration {it}: {chosen['group']} {chosen['channels'][0]}->{chosen['channels'][1]}, "
                       f"latency {cur_lat['median']:.4f} ms ({ratio:.3f}x seed {how}, {pred_ratio:.3f}x "
                       f"predicted), holdout top-1 {100 * chosen['top1']:.2f}% ({len(proposals)} proposals, "
                       f"{time.time() - t_it:.0f}s)")
        # the loop's stop test uses the unrounded ratios
        return {**step, "latency_ratio": ratio, "predicted_ratio": pred_ratio}

    def final_finetune(self) -> list[dict[str, Any]]:
        """The long fine-tune: all non-holdout train images, holdout accuracy per epoch."""
        cfg, t = self.cfg, time.time()
        history: list[dict[str, Any]] = []
        if cfg.final_finetune_epochs > 0 and self.current is not self.seed_model:
            tc = TrainConfig(epochs=cfg.final_finetune_epochs, batch_size=cfg.batch_size, lr=cfg.final_lr,
                             schedule="onecycle", seed=cfg.seed,
                             **{k: v for k, v in self.settings.items() if k in FINETUNE_KEYS})
            if self.progress:
                tqdm.write(f"final fine-tune: {cfg.final_finetune_epochs} epoch(s) on {len(self.pool)} train images "
                           f"('test top-1' below is the {len(self.holdout)}-image TRAIN holdout)")
            res = fit(self.current, _subsource(self.source, self.pool, self.holdout), tc, progress=self.progress,
                      eval_name="holdout", dist=self.ctx)
            history = res["history"]
        self.current.eval()
        self.timings["final_finetune_s"] = time.time() - t
        return history
