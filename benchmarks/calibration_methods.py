"""Which activation calibration the int8 recipe uses, by measurement on the embedded default.

Each candidate ([calibration] method, percentile, size) calibrates the int8 recipe's graph; the int8 model is then
scored on a HOLDOUT of TRAIN images disjoint from every candidate's calibration images (what the choice is made
on: the share of images whose top-1 equals the float model's, and top-1) and on the test split (reported, never
used to choose).  ORT's own ``quantize_static`` (MinMax, the int8 recipe's first 512 calibration images) stands
beside it as the peer.  Accuracy only: every candidate runs the same graph, so latency does not change.

    python benchmarks/calibration_methods.py                     # ~1 min on 2 cores
    python benchmarks/calibration_methods.py --json runs/bench/calibration_methods.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = [{"method": "minmax", "size": 512}, {"method": "minmax", "size": 2048},
              {"method": "minmax", "size": 4096}, {"method": "percentile", "size": 512, "percentile": 99.999},
              {"method": "percentile", "size": 512, "percentile": 99.99}]
MAX_CALIBRATION = 4096  # the holdout starts after the largest calibration set of the shared permutation


def _predict(model: bytes, batches, threads: int) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x})[0].argmax(1) for x, _ in batches])


def _peer(fp32, source, workdir: Path) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from calibration.reader import TrainSplitReader

    reader = TrainSplitReader(source, 512, 1, 0)

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

    src, dst = workdir / "peer_fp32.onnx", workdir / "peer_int8.onnx"
    src.write_bytes(fp32.SerializeToString())
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst.read_bytes()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--holdout", type=int, default=10000, help="train images scored (disjoint from calibration)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    from calibration.reader import TrainSplitReader
    from calibration.subsets import Holdout, train_batches
    from compress.onnx.export import to_onnx
    from compress.quant.core import calibrate, prepare_float, quantize_prepared
    from compress.training.default_model import resolve_model
    from recipes.loader import load_recipe

    loaded, source = resolve_model(progress=False)
    fp32 = to_onnx(loaded.model.eval(), source.preprocess.input_size)
    sets = {"holdout": list(Holdout(source, MAX_CALIBRATION, args.holdout, 0).batches()),
            "test": list(train_batches(source, range(len(source.split("test"))), 500, split="test"))}
    labels = {k: np.concatenate([y for _, y in v]) for k, v in sets.items()}
    ref = {k: _predict(fp32.SerializeToString(), v, args.threads) for k, v in sets.items()}

    def score(model: bytes) -> dict[str, float]:
        out = {}
        for k, v in sets.items():
            pred = _predict(model, v, args.threads)
            out[f"{k}_top1"] = round(100 * float((pred == labels[k]).mean()), 2)
            out[f"{k}_same_top1_as_float"] = round(100 * float((pred == ref[k]).mean()), 2)
        return out

    rows: list[dict[str, Any]] = [{"variant": "fp32", **score(fp32.SerializeToString())}]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append({"variant": "peer: quantize_static (MinMax, 512)", **score(_peer(fp32, source, work))})
        for cand in CANDIDATES:
            rec = load_recipe("int8").with_overrides("calibration", **cand)
            prepared = prepare_float(fp32, rec.quantize, work)
            ranges = calibrate(prepared, TrainSplitReader(source, cand["size"], 32, 0), rec.calibration, work)
            model = quantize_prepared(prepared, ranges, rec, work).model.SerializeToString()
            rows.append({"variant": "int8 recipe, " + ", ".join(f"{k} {v}" for k, v in cand.items()), **score(model)})
            print(json.dumps(rows[-1]), flush=True)
    chosen = max(rows[2:], key=lambda r: (r["holdout_same_top1_as_float"], r["holdout_top1"]))
    print(f"{'variant':52s} holdout top-1 / same as float    test top-1 / same as float")
    for r in rows:
        print(f"{r['variant']:52s} {r['holdout_top1']:6.2f} % / {r['holdout_same_top1_as_float']:6.2f} %"
              f"         {r['test_top1']:6.2f} % / {r['test_same_top1_as_float']:6.2f} %")
    print(f"chosen on the holdout: {chosen['variant']}")
    result = {"holdout_images": args.holdout, "rows": rows, "chosen": chosen["variant"]}
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
