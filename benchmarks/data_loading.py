"""Decode + preprocess throughput of an image folder at 224: images/s in this process vs in DataLoader workers.

Writes ``--images`` ImageNet-like JPEGs (500x375, quality 90, ``--classes`` class folders) to a temporary folder,
then reads the train split through ``imagefolder:PATH`` (Pillow decode, RGB, resize 256, center crop 224,
normalization) with 0 workers and with each ``--workers`` count, every setting timed over the same images after
one warm-up pass, in alternating rounds.

    python benchmarks/data_loading.py                       # 600 images, workers 0 vs 2 (this machine's cores)
    python benchmarks/data_loading.py --images 2000 --workers 2,4,8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_jpegs(root: Path, n: int, classes: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for i in range(n):
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.roll(base, shift=int(rng.integers(0, 500)), axis=1)  # photo-sized, not all alike
        Image.fromarray(img).save(d / f"{i:05d}.JPEG", quality=90)
    for c in range(classes):  # a val split, so the folder has ImageNet's layout
        d = root / "val" / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).save(d / "v.JPEG", quality=90)


def throughput(source, batch: int) -> float:
    t = time.perf_counter()
    n = sum(len(y) for _, y in source.loader("train", batch_size=batch))
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--workers", default=None, help="comma list of worker counts (default: this machine's cores)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    import torch

    from calibration.datasets import open_dataset
    from calibration.imagefolder import default_workers
    from eval.model_info import machine_info

    torch.set_num_threads(1)
    counts = [0] + [int(w) for w in (args.workers.split(",") if args.workers else [default_workers()])]
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images, args.classes)
        base = open_dataset(f"imagefolder:{tmp}", 224)
        sources = {w: base.with_workers(w) for w in counts}
        for w in counts:  # warm-up: the page cache holds the files for every setting alike
            throughput(sources[w], args.batch)
        rates: dict[int, list[float]] = {w: [] for w in counts}
        for r in range(args.rounds):
            for w in counts[r % len(counts):] + counts[:r % len(counts)]:
                rates[w].append(throughput(sources[w], args.batch))
    result = {"images": args.images, "input_size": 224, "batch": args.batch, "cores": os.cpu_count(),
              "images_per_s": {str(w): round(sorted(v)[len(v) // 2], 1) for w, v in rates.items()},
              "machine": machine_info()}
    ref = result["images_per_s"]["0"]
    for w, v in result["images_per_s"].items():
        print(f"workers {w}: {v:7.1f} images/s ({v / ref:.2f}x of 0 workers)")
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
