"""mnv3-compress command line: each command parses its options, calls one library function, prints the result.

Errors are one line on stderr with a non-zero exit; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

# OpenMP threads that spin while they wait make torch's training 4-15x slower as soon as another process shares
# the cores (benchmarks/training_threads.py); sleeping waiters degrade in proportion to the CPU left.  Set before
# torch loads OpenMP; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from compress.errors import UserError

ARCH_CHOICES = ("mobilenet_v3_small", "mobilenet_v3_large")


class _Group(click.Group):
    """Turns every error into one line on stderr (exit 1; usage errors exit 2), Ctrl-C into exit 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                         **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.ClickException as e:
            msg = " ".join(e.format_message().split())
            hint = ""
            if isinstance(e, click.UsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            click.echo(f"Error: {msg}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(0)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as e:
            if debug:
                traceback.print_exc()
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: stopped cleanly (outputs are written atomically; nothing partial was left).",
                       err=True)
            sys.exit(130)
        except Exception as e:  # a bug: still one line, traceback on request
            if debug:
                traceback.print_exc()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise click.ClickException(f"internal error: {type(e).__name__}: {msg} (rerun with --debug for "
                                       f"the traceback)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors (for bug reports).")
@click.version_option(package_name="mnv3-compress")
def main(debug: bool) -> None:
    """Compress MobileNetV3 classifiers into deployable int8 ONNX models, with measured accuracy and latency.

    Commands that need weights and get none use the embedded default: a float MobileNetV3 trained on
    Fashion-MNIST and cached under $MNV3_COMPRESS_HOME (default ~/.cache/mnv3-compress).
    """


def _arch_options(f):
    f = click.option("--num-classes", type=click.IntRange(1), default=None,
                     help="Classifier outputs (default: read from --weights, else the dataset's).")(f)
    f = click.option("--minimalistic", is_flag=True, default=None,
                     help="Minimalistic variant: no SE, no h-swish, 3x3 kernels only (default: read from --weights).")(f)
    f = click.option("--width-mult", type=click.FloatRange(min=0.1), default=None,
                     help="Channel width multiplier, e.g. 0.75 (default: read from --weights, else 1.0).")(f)
    f = click.option("--arch", type=click.Choice(ARCH_CHOICES), default=None,
                     help="Architecture (default: read from --weights, else the embedded default's).")(f)
    return f


def _model_options(f):
    """Where a command's model comes from, and the options that must agree with it."""
    f = click.option("--train-default", is_flag=True,
                     help="No --weights and no embedded default for this architecture / data / size: train one here "
                          "(the error without it says how long that takes).")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Float checkpoint: torchvision or timm state_dict, or one of ours; the architecture is read "
                          "from it. Default: the embedded default model.")(f)
    return _arch_options(f)


def _workers_option(f):
    return click.option("--workers", type=click.IntRange(0), default=None,
                        help="DataLoader processes decoding and preprocessing images (default: one per core up to 8 "
                             "for imagefolder, 0 for in-memory datasets).")(f)


_DATASET_HELP = ("fashion-mnist, fashion-mnist:DIR, imagefolder:PATH (PATH/train + PATH/val, or one class folder), "
                 "synthetic (random images: latency only).")


# == train =========================================================================================
@main.command()
@_arch_options
@_workers_option
@click.option("--dataset", default="fashion-mnist", show_default=True, help=_DATASET_HELP)
@click.option("--input-size", type=click.IntRange(8), default=None, help="Square input side (default: 32 for Fashion-MNIST, 224 otherwise).")
@click.option("--epochs", type=click.IntRange(1), default=5, show_default=True, help="Total epochs (with --resume: the total to reach).")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per step and process (under torchrun the global batch is this x WORLD_SIZE).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True, help="Peak learning rate of AdamW.")
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True, help="Learning-rate schedule: one-cycle (warm-up, then decay) or cosine decay.")
@click.option("--pad-crop", type=click.IntRange(0), default=2, show_default=True, help="Random-crop padding in pixels at 32x32 (scaled with the input size); 0: no random crops.")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="Use only the first N training images.")
@click.option("--limit-test", type=click.IntRange(1), default=None, help="Evaluate on the first N test images only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when there is one (under torchrun: GPU LOCAL_RANK), else CPU.")
@click.option("--sync-bn", is_flag=True, help="Under torchrun: synchronise BatchNorm statistics across processes (CUDA only).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Start from these weights (fine-tune).")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a checkpoint written by train.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Checkpoint to write (atomically, after every epoch).")
def train(epochs, batch_size, lr, schedule, pad_crop, limit_train, limit_test, seed, sync_bn, **kw) -> None:
    """Train (or fine-tune) a MobileNetV3 with augmentation, label smoothing and a one-cycle/cosine schedule.

    Evaluates on the test split after every epoch and writes the checkpoint atomically each time, so Ctrl-C
    keeps the last complete epoch; --resume continues it (same or larger --epochs).  Launched by torchrun
    (torchrun --nproc_per_node=N -m cli train ...) it trains with DistributedDataParallel; rank 0 writes.
    """
    from compress.training.train import TrainConfig
    from compress.training.train import train as run_train

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, pad_crop=pad_crop,
                      limit_train=limit_train, limit_test=limit_test, seed=seed, sync_bn=sync_bn)
    result = run_train(config=cfg, **kw)
    if result["rank"] != 0:  # under torchrun: rank 0 reports for all
        return
    final = result["final"]
    click.echo(f"{result['output']}: {result['arch']} on {result['dataset']} @{result['input_size']}, "
               f"epoch {final.get('epoch')}, test top-1 {100 * final.get('test_top1', 0):.2f}%")


# == export ========================================================================================
@main.command()
@_model_options
@click.option("--dataset", default=None, help="Record this dataset's preprocessing (default: the checkpoint's, else ImageNet's for a 1000-class model). " + _DATASET_HELP)
@click.option("--input-size", type=click.IntRange(8), default=None, help="Square input side (default: the checkpoint's, else 224 for ImageNet models).")
@click.option("--random-init", is_flag=True, help="Export freshly initialised weights (latency work on any architecture).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
def export(**kw) -> None:
    """Export a float model to ONNX (opset 17), checked and validated against torch before it is kept.

    Needs only a model: the file records in its metadata how to feed it (input size, mean/std, resize) - the
    checkpoint's preprocessing (train checkpoints carry it), ImageNet's for 1000-class torchvision / timm
    checkpoints, or --dataset's - and the architecture.
    """
    from compress.onnx.export import export_model

    click.echo(str(export_model(**kw)))


# == eval ==========================================================================================
@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--dataset", default=None, help="Test split to evaluate on (default: the dataset the model's metadata names, else fashion-mnist). " + _DATASET_HELP)
@_workers_option
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate on the first N test images only.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Intra-op threads for the latency session.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Images per forward pass for latency.")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Float ONNX model: report the share of equal top-1 predictions.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the result to this JSON file (atomically).")
@click.option("--target", default="ort-x86", show_default=True, help="The runtime that runs MODEL: ort-x86 (ONNX Runtime here), ort-arm64, openvino, executorch (.pte), litert (.tflite).")
@click.option("--input-size", type=click.IntRange(8), default=None, help="Input side of a .pte / .tflite (ONNX models record theirs).")
def eval_cmd(model: str, dataset, limit, threads: int, batch: int, reference, json_path, workers, target,
             input_size) -> None:
    """Evaluate an ONNX model (fp32 or int8): accuracy, agreement, latency, size, params, MACs, machine."""
    from compress.io import write_json
    from compress.targets.evaluate import evaluate_artifact

    result = evaluate_artifact(model, target=target, dataset=dataset, limit=limit, threads=threads, batch=batch,
                               reference=reference, workers=workers, input_size=input_size)
    if json_path:
        write_json(json_path, result)
    click.echo(json.dumps(result, indent=2))


# == compare =======================================================================================
_RECIPES_ONLY = ("targets", "weights", "arch", "width_mult", "minimalistic", "num_classes", "train_default", "dataset",
                 "workers", "input_size", "limit_train", "limit_test", "threads", "device", "remeasure")


@main.command()
@click.argument("dirs", nargs=-1, type=click.Path(exists=True))
@click.option("--recipes", default=None, help="Comma-separated recipes (names or TOML paths): run each one that is not finished into OUT/runs/RECIPE/, then measure every variant together. Instead of DIRS.")
@click.option("--target", "targets", default=None, help="With --recipes: deploy targets, comma-separated (default: every target whose runtime is installed here).")
@_model_options
@click.option("--dataset", default=None, help="With --recipes: the data of every sub-run (default: the checkpoint's, else fashion-mnist). " + _DATASET_HELP)
@_workers_option
@click.option("--input-size", type=click.IntRange(8), default=None, help="With --recipes: square input side (default: the checkpoint's, else the dataset's).")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="With --recipes: recipes that train (QAT, NetAdapt) use the first N train images only (smoke runs).")
@click.option("--limit-test", type=click.IntRange(1), default=None, help="With --recipes: every variant is evaluated on the first N test images (default: the whole test split).")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="With --recipes: intra-op threads of the latency measurements.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="With --recipes: where QAT and NetAdapt's fine-tunes train.")
@click.option("--remeasure", is_flag=True, help="With --recipes: time every runtime again even when its artifacts were measured by an earlier compare in OUT.")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), required=True, help="Where report.json, report.md, report.html (with --recipes) and pareto.png go; with --recipes also the sub-runs (OUT/runs/).")
def compare(dirs, recipes, output_dir: str, **kw) -> None:
    """Every variant in one table and one trade-off picture: accuracy vs measured latency per runtime, vs size.

    compare --recipes int8,int8-qat,netadapt,netadapt-int8 -o OUT runs what is missing (finished sub-runs in OUT
    are reused; an interrupted one resumes), times every variant of a runtime in one interleaved run and
    evaluates all on the same test images.  compare DIR... -o OUT gathers runs made earlier, and says when their
    latencies come from separate runs or machines instead of drawing one front across them.
    """
    from pathlib import Path

    from click.core import ParameterSource

    ctx = click.get_current_context()
    if bool(recipes) == bool(dirs):
        raise click.UsageError("give either run directories (compare DIR... -o OUT) or --recipes (compare --recipes "
                               "int8,int8-qat,... -o OUT)")
    if not recipes:
        given = [k for k in _RECIPES_ONLY if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} applies with --recipes only")
        from eval.report import REPORT_MD, compare_runs

        report = compare_runs(list(dirs), output_dir)
        for w in report["warnings"]:
            click.echo(f"Warning: {w}", err=True)
        click.echo(str(Path(output_dir) / REPORT_MD))
        return
    from compress.compare.pipeline import compare_recipes
    from eval.comparison import markdown_table

    report = compare_recipes(recipes, output_dir, log=click.echo, **kw)
    ran = [r["recipe"] for r in report["runs"] if r["status"] == "ran"]
    click.echo(f"\ncompare: {len(report['variants'])} variants, wall time {report['wall_s']:.1f} s (ran: "
               f"{', '.join(ran) or 'nothing'}; reused: {len(report['runs']) - len(ran)} sub-run(s)); "
               f"report: {Path(output_dir) / 'report.md'}\n\n{markdown_table(report)}")


# == quantize ======================================================================================
@main.command()
@click.option("--recipe", "-r", default="int8", show_default=True, help="Recipe name (see 'mnv3-compress recipes') or path to a recipe TOML file.")
@_model_options
@click.option("--random-init", is_flag=True, help="Freshly initialised weights (latency work on any architecture; data: synthetic unless --dataset).")
@click.option("--dataset", default=None, help="Calibration (train split) and evaluation (test split) data (default: the checkpoint's, else fashion-mnist). " + _DATASET_HELP)
@_workers_option
@click.option("--input-size", type=click.IntRange(8), default=None, help="Square input side (default: the checkpoint's, else the dataset's).")
@click.option("--target", "targets", default="ort-x86", show_default=True, help="Where the int8 model deploys, comma-separated: ort-x86, ort-arm64, openvino, executorch, litert (litert-int8-io: with int8 input and output). Every target's artifact carries the same scales (scales.json) and is measured in its own runtime.")
@click.option("--calibration-size", type=click.IntRange(1), default=None, help="Train images used for calibration (default: the recipe's).")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="QAT recipes: train on the first N train images only (smoke runs).")
@click.option("--limit-test", type=click.IntRange(1), default=None, help="Evaluate on the first N test images only (default: the whole test split).")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Intra-op threads for the latency measurement.")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=None, help="Where the models and reports go (default: runs/quantize-RECIPE).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where QAT recipes train (auto: CUDA when there is one; under torchrun: GPU LOCAL_RANK). Export and evaluation run on the CPU.")
def quantize(recipe: str, weights, arch, dataset, input_size, targets, calibration_size, limit_train, limit_test,
             threads: int, output_dir, device: str, **model_options) -> None:
    """Quantize a float model to int8 (QDQ ONNX) with a recipe, and measure both: accuracy, agreement, latency.

    Writes model_fp32.onnx, model_int8.onnx, recipe.toml (the resolved recipe), report.json and report.md.
    Recipes: int8 (calibrated PTQ), int8-tuned (neural-compressor's accuracy-driven tuning; also writes
    recipe_tuned.toml), int8-mixed (latency-aware per-layer int8 / fp32; also writes mixed_precision.md), and the
    QAT recipes int8-qat, int8-qat-imagenet, w4a8-qat and w4a8-per-tensor-qat, which first fine-tune with fake
    quantization (progress bar, test top-1 per epoch), checkpointing every epoch to OUTPUT_DIR/qat_checkpoint.pt:
    run the same command again to resume an interrupted run (or to re-export a finished one without training).
    They also write model_int8_ptq.onnx, the calibrated baseline with the same settings.  Launched by torchrun,
    QAT trains with DistributedDataParallel ([qat] batch_size images per process); rank 0 alone exports,
    evaluates, writes and prints.
    """
    from pathlib import Path

    from compress.quant.pipeline import quantize as run_quantize

    out = output_dir or f"runs/quantize-{Path(recipe).stem}"
    r = run_quantize(recipe, weights=weights, arch=arch, dataset=dataset, input_size=input_size,
                     calibration_size=calibration_size, output_dir=out, eval_limit=limit_test, threads=threads,
                     device=device, limit_train=limit_train, targets=targets, **model_options)
    if r.get("rank", 0) != 0:  # under torchrun: rank 0 reports for all
        return
    for v in r["variants"]:
        top1 = v["accuracy"]["top1"]
        lat = (v.get("latency_ms") or {}).get("median")
        agree = v.get("agreement")
        click.echo(f"{v['name']:>8}: top-1 {'n/a' if top1 is None else f'{100 * top1:.2f}%'}"
                   f"{'' if agree is None else f', agreement {100 * agree:.2f}%'}"
                   f"{'' if lat is None else f', latency {lat:.3f} ms'}, {v['size_bytes'] / 2**20:.2f} MiB")
    for t in (r.get("targets") or {}).get("results", [])[1:]:
        speed = t.get("speedup_vs_runtime_fp32")
        top1 = t["accuracy"]["top1"]
        click.echo(f"  target {t['target']}: top-1 {'n/a' if top1 is None else f'{100 * top1:.2f}%'}, same top-1 as ort-x86 int8 "
                   f"{100 * t['agreement_with_ort_x86_int8']:.2f}%, "
                   + (f"{speed:.2f}x its runtime's fp32" if speed else t.get("latency_note", "")) + f" ({t['file']})")
    if r.get("qat"):
        q = r["qat"]
        click.echo(f"     QAT: fake-quant torch model top-1 {100 * q['fake_quant_top1']:.2f}%, the int8 ONNX "
                   f"predicts the same class on {100 * q['onnx_vs_fake_quant_agreement']:.2f}% of test images")
    fallback = r["quantization"]["nodes_excluded"]
    click.echo(f"int8 convs {r['checks']['int8_convs']}/{r['checks']['convs']}, fp32 nodes: {len(fallback)}; "
               f"report: {Path(r['output_dir']) / 'report.md'}")


# == recipes =======================================================================================
@main.command()
def recipes() -> None:
    """List the built-in recipes and the command that applies each (pass one by name, or a path to your own
    TOML file, to that command's --recipe)."""
    from recipes.loader import list_recipes

    found = list_recipes()
    width = max((len(r.name) for r in found), default=0)
    for r in found:
        click.echo(f"{r.name:<{width}}  {r.command:<8}  {r.description}")


# == prune =========================================================================================
@main.command()
@click.option("--recipe", "-r", default="netadapt", show_default=True, help="Recipe with a [prune] section (netadapt, netadapt-int8) or path to a recipe TOML file.")
@_model_options
@click.option("--dataset", default=None, help="Fine-tuning and holdout (train split), final evaluation (test split) (default: the checkpoint's, else fashion-mnist). " + _DATASET_HELP)
@_workers_option
@click.option("--input-size", type=click.IntRange(8), default=None, help="Square input side (default: the checkpoint's, else the dataset's).")
@click.option("--target-latency-ratio", type=click.FloatRange(0, 1, min_open=True), default=None, help="Stop at this fraction of the unpruned latency (default: the recipe's).")
@click.option("--target", default="ort-x86", show_default=True, help="Where the pruned model deploys: the latency table and every measurement are timed in its runtime, in the recipe's precision (netadapt-int8: int8), and netadapt-int8 ends with its int8 artifact. ort-x86, openvino and executorch are measured here; ort-arm64 needs --latency-table.")
@click.option("--latency-table", type=click.Path(dir_okay=False), default=None, help="A latency table measured on the device (tools/device_latency.py): the search follows its times.")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="Use only the first N train images (holdout and fine-tunes; smoke runs).")
@click.option("--limit-test", type=click.IntRange(1), default=None, help="Evaluate the result on the first N test images only (default: the whole test split).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where the fine-tunes run (auto: CUDA when there is one; under torchrun: GPU LOCAL_RANK). Latency is always measured on the CPU.")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=None, help="Where the models and reports go (default: runs/prune-RECIPE).")
def prune(recipe: str, weights, arch, dataset, input_size, target_latency_ratio, target, latency_table, limit_train,
          limit_test, device: str, output_dir, **model_options) -> None:
    """NetAdapt channel pruning to a latency target measured on the deploy target, then a longer fine-tune.

    Writes model_fp32.onnx (pruned), reference_fp32.onnx, arch.json, model.pt, recipe.toml, report.json (every
    iteration in 'trajectory', drawn by 'compare') and report.md; netadapt-int8 searches on the target's int8
    latency and adds int8/ (the pruned network through the int8 recipe, with the target's artifact) and
    int8-reference/ (the unpruned one, the speedup's baseline).
    Launched by torchrun, the fine-tunes run with DistributedDataParallel; rank 0 alone measures latency,
    writes and prints.
    """
    from pathlib import Path

    from compress.prune.netadapt import prune as run_prune

    out = output_dir or f"runs/prune-{Path(recipe).stem}"
    overrides = {} if target_latency_ratio is None else {"target_latency_ratio": target_latency_ratio}
    if limit_train is not None:
        overrides["limit_train"] = limit_train
    r = run_prune(recipe, weights=weights, arch=arch, dataset=dataset, input_size=input_size, output_dir=out,
                  eval_limit=limit_test, device=device, model_options=model_options, target=target,
                  latency_table=latency_table, **overrides)
    if r.get("rank", 0) != 0:  # under torchrun: rank 0 reports for all
        return
    for v in r["variants"]:
        top1 = v["accuracy"]["top1"]
        lat = (v.get("latency_ms") or {}).get("median")
        click.echo(f"{v['name']:>14}: top-1 {'n/a' if top1 is None else f'{100 * top1:.2f}%'}"
                   f"{'' if lat is None else f', latency {lat:.4f} ms'}, {v.get('params', '–')} params")
    s = r["summary"]
    click.echo(f"speedup {s['speedup']:.2f}x, top-1 drop {s['top1_drop_pt']} pt after {s['iterations']} iterations "
               f"({s['stop']}); report: {Path(r['output_dir']) / 'report.md'}")
    if "int8_speedup" in s:
        d = r["deployment"]
        click.echo(f"int8 on {d['target']} (timed on {d['timed_on']}): pruned {s['int8_speedup']:.2f}x faster than "
                   f"the unpruned int8, top-1 {100 * s['top1_pruned_int8']:.2f}% "
                   f"({s['top1_pruned_int8_drop_vs_float_pt']:+.2f} pt below the unpruned float)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Another variant of the same network (e.g. the fp32 model): compare per op type and per layer.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Intra-op threads.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Images per run.")
@click.option("--runs", type=click.IntRange(1), default=50, show_default=True, help="Profiled runs (after 10 warm-up runs); kernel times are medians over them.")
@click.option("--top", type=click.IntRange(1), default=15, show_default=True, help="Longest nodes to list.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the full profile(s) to this JSON file (atomically).")
def profile(model: str, reference, threads: int, batch: int, runs: int, top: int, json_path) -> None:
    """Where MODEL spends its time: onnxruntime's profiler per op type, per node and per layer (markdown)."""
    from compress.io import write_json
    from eval.profile import compare_profiles, profile_onnx, render_comparison, render_profile

    prof = profile_onnx(model, threads=threads, batch=batch, runs=runs)
    out = {"model": prof}
    click.echo(f"## {model}\n\n{render_profile(prof, top=top)}")
    if reference:
        out["reference"] = profile_onnx(reference, threads=threads, batch=batch, runs=runs)
        out["comparison"] = compare_profiles({"reference": out["reference"], "model": prof})
        click.echo(f"## {reference} (reference) vs {model} (model)\n\n{render_comparison(out['comparison'])}")
    if json_path:
        write_json(json_path, out)


if __name__ == "__main__":
    main()
