"""Run ``mnv3-compress prune`` (under torchrun) with a quick latency budget and probes (test helper).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/compress/prune/netadapt_ddp_worker.py DUMP_DIR prune ...

The budget is the one tests/compress/prune/test_netadapt.py uses (2 cuts per group timed up front, 1-round
table entries, 2-round whole-network measurements).  Each rank writes ``DUMP_DIR/rank{RANK}.pt`` when its search
and final fine-tune are done: how many latency measurements it ran, the trajectory it walked (the kept
proposal of every iteration and its channels) and the weights of the pruned network it holds.

Not collected by pytest (no ``test_`` prefix).
"""
import os
import sys
from pathlib import Path

import torch

import cli
import compress.prune.netadapt as na
import eval.latency
from compress.prune.latency_table import LatencyTable

DUMP = Path(sys.argv[1])
_timings = {"count": 0}
_measure = eval.latency.interleave


def _counted(*args, **kwargs):
    _timings["count"] += 1
    return _measure(*args, **kwargs)


class _QuickTable(LatencyTable):
    def __init__(self, *a, **k):
        super().__init__(*a, **{**k, "rounds": 1, "round_time_s": 0.002})


_final = na._Search.final_finetune


def _probed_final(self):
    history = _final(self)
    torch.save({"timings": _timings["count"], "history": history,
                "trajectory": [(p["proposal"], p.get("channels"), p["top1"]) for p in self.trajectory],
                "state_dict": {k: v.clone() for k, v in self.current.state_dict().items()}},
               DUMP / f"rank{os.environ.get('RANK', '0')}.pt")
    return history


if __name__ == "__main__":
    import compress.prune.outputs as outputs

    na.CANDIDATE_DEPTH, na.MEASURE_ROUNDS, outputs.FINAL_ROUNDS = 2, 2, 2
    na.LatencyTable = _QuickTable
    # every latency measurement of prune (the table's units, the search's networks, the final one) goes through
    # eval.latency.interleave, imported where it measures
    eval.latency.interleave = _counted
    na._Search.final_finetune = _probed_final
    cli.main(sys.argv[2:], prog_name="mnv3-compress")
