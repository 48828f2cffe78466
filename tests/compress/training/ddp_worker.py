"""Run the CLI under torchrun and dump, per rank, the weights that rank holds after training (test helper).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/compress/training/ddp_worker.py DUMP_DIR train ...

Each rank writes ``DUMP_DIR/rank{RANK}.pt`` (its model's state_dict when ``fit`` returns); the command is
the CLI's, unchanged.  Not collected by pytest (no ``test_`` prefix).
"""
import os
import sys
from pathlib import Path

import torch

import cli
import compress.training.train

_fit = compress.training.train.fit


def _fit_and_dump(model, *args, **kwargs):
    result = _fit(model, *args, **kwargs)
    torch.save(model.state_dict(), Path(sys.argv[1]) / f"rank{os.environ['RANK']}.pt")
    return result


if __name__ == "__main__":
    compress.training.train.fit = _fit_and_dump
    cli.main(sys.argv[2:], prog_name="mnv3-compress")
