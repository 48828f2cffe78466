"""Run the CLI (under torchrun, or as one process) with probes on the QAT path (test helper).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/compress/quant/qat_ddp_worker.py DUMP_DIR quantize ...

The command is the CLI's, unchanged; the probes only record (and, when asked, interrupt).  Each rank writes into
DUMP_DIR (its own files: what the library writes is rank 0's alone):

* ``freeze{RANK}.pt``: at every freeze point, the QAT model's buffers just before the freeze step runs (each
  rank's own, before any synchronisation) and just after it: ``[(step, before, after), ...]``;
* ``final{RANK}.pt``: the state_dict of the frozen QAT model ``run_qat`` hands back;
* ``ranges{RANK}.pt``: the first all-reduces of observer ranges: ``[(local min, local max, min, max), ...]``.

Switches (environment):

* ``QAT_PROBE_STOP_AT_STEP=k``: every rank raises KeyboardInterrupt before training step k (an interruption);
* ``QAT_PROBE_FAIL=RANK:STEP``: that rank alone raises a UserError before that step;
* ``QAT_PROBE_GLOBAL_ORDER=1``: a single process reads the train split in the order a DistributedSampler gives
  the global batches (one replica), so it sees the same global batches as a torchrun run.

Not collected by pytest (no ``test_`` prefix).
"""
import os
import sys
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

import cli
import compress.quant.qat_train as qat_train
from compress.errors import UserError
from compress.training import distributed

DUMP = Path(sys.argv[1])
RANK = os.environ.get("RANK", "0")
_freeze_log, _ranges = [], []


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_call = qat_train.FreezeSchedule.__call__


def _probed_call(self, model, step, steps_per_epoch):
    stop = os.environ.get("QAT_PROBE_STOP_AT_STEP")
    if stop and step == int(stop):
        raise KeyboardInterrupt
    fail = os.environ.get("QAT_PROBE_FAIL")
    if fail and fail.split(":")[0] == RANK and step == int(fail.split(":")[1]):
        raise UserError(f"probe: rank {RANK} fails at step {step}")
    bn_step, obs_step = self.steps(steps_per_epoch)
    due = (not model.bn_frozen and step >= bn_step) or (not model.observers_frozen and step >= obs_step)
    before = _state(model) if due else None
    _call(self, model, step, steps_per_epoch)
    if due:
        _freeze_log.append((step, before, _state(model)))
        torch.save(_freeze_log, DUMP / f"freeze{RANK}.pt")


_reduce = qat_train._reduce_range


def _probed_reduce(observer):
    local = (observer.min_val.clone(), observer.max_val.clone())
    _reduce(observer)
    if len(_ranges) < 40:
        _ranges.append((*local, observer.min_val.clone(), observer.max_val.clone()))
        torch.save(_ranges, DUMP / f"ranges{RANK}.pt")


_run_qat = qat_train.run_qat


def _probed_run_qat(*args, **kwargs):
    result = _run_qat(*args, **kwargs)
    torch.save(_state(result.model), DUMP / f"final{RANK}.pt")
    return result


def _one_replica_sampler(dataset, ctx, seed):
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)


if __name__ == "__main__":
    qat_train.FreezeSchedule.__call__ = _probed_call
    qat_train._reduce_range = _probed_reduce
    qat_train.run_qat = _probed_run_qat
    if os.environ.get("QAT_PROBE_GLOBAL_ORDER") and not distributed.launched_by_torchrun():
        distributed.train_sampler = _one_replica_sampler
    cli.main(sys.argv[2:], prog_name="mnv3-compress")
