"""What NetAdapt's latency table times, and on what: a deploy target's runtime, in fp32 or in int8.

NetAdapt must see the latency of the model that ships (Yang et al., 2018, measured on the phone; MobileNetV3
§4.2).  A :class:`Timing` names a deploy target (:mod:`compress.targets`) and a precision:

* ``fp32``: the unit's float ONNX in the target's runtime (ORT as exported; OpenVINO with the f32 hint);
* ``int8``: the unit quantized by the int8 recipe and shaped by the target exactly as its whole-network artifact
  is (``ort-x86``: the reference graph, depthwise padded to 16 channels and the stem to 4; other targets:
  ``Target.build`` from the unit's scale table, e.g. OpenVINO's fusion placement), run in the target's runtime.
  Calibration uses random inputs: scales do not change how long a kernel takes.

Every unit is timed against a baseline on the same input: an Identity graph (fp32), or Quantize -> Dequantize of
the input (int8: what entering a unit costs on its own, and what the whole network pays once, at its input).

Channel steps (``channel_step``): a cut that stays inside one kernel block saves nothing, so the search cuts in
the target's multiple.  ``benchmarks/channel_step.py`` sweeps one block's expansion in 8s: on this AVX-512 CPU
ORT's fp32 kernels run 72 and 80 channels in the same time, 88 and 96, ... (NCHWc blocks of 16 floats), ORT's x86
int8 depthwise runs on the channel count padded to 16 (the int8 recipe pads it), and OpenVINO's times are
irregular between multiples of 16 and never better off them, and ExecuTorch's XNNPACK kernels work in 16-channel
tiles here (block 6 at 224: a cut onto a multiple of 16 saves 3.65 us in int8 and 8.35 us in fp32, a cut off one
0.55 us and nothing).  So targets timed on this CPU cut in 16s on AVX-512 CPUs (in 8s on AVX2 ones, whose blocks
are 8 floats), ORT x86 int8 in 16s everywhere, ``ort-arm64`` in the architecture's 8 (not measured here).

ExecuTorch's units are built as its whole network is (:mod:`compress.targets.executorch`: PT2E from the unit's
torch module with the unit's scale table, one XNNPACK delegate), about 4 s each, so the latency table builds them
in one worker process per core before timing them.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import UserError

__all__ = ["Timing", "PRECISIONS", "TABLE_TARGETS", "identity_onnx", "qdq_identity_onnx", "int8_onnx", "RandomReader",
           "export_unit", "network_artifact", "measure_artifacts"]

PRECISIONS = ("fp32", "int8")
# targets whose per-unit latency can be measured on this machine (others: a table measured on the device)
TABLE_TARGETS = ("ort-x86", "openvino", "executorch")
TORCH_TARGETS = ("executorch",)  # built from the torch module (PT2E), not from the ONNX graph
PROXY_TARGETS = ("ort-arm64",)  # its graph runs in onnxruntime here too: the host side of a device table


class RandomReader:
    """A calibration reader of ``batches`` random batches ``[batch, *chw]`` (scales only; values do not matter)."""

    def __init__(self, chw: Sequence[int], batch: int = 1, batches: int = 2, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = [rng.standard_normal((batch, *chw)).astype(np.float32) for _ in range(batches)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.items):
            return None
        self.i += 1
        return {"input": self.items[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.items)


def identity_onnx(batch: int, chw: Sequence[int]) -> bytes:
    """The baseline: a graph that only hands its input back (what every session.run costs)."""
    shape = [batch, *chw]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def qdq_identity_onnx(batch: int, chw: Sequence[int]) -> bytes:
    """input -> QuantizeLinear -> DequantizeLinear -> output: the int8 baseline of a unit with this input."""
    shape = [batch, *chw]
    inits = [numpy_helper.from_array(np.array(1 / 32, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["output"])]
    graph = helper.make_graph(nodes, "qdq_identity", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def int8_onnx(fp32: onnx.ModelProto, chw: Sequence[int], batch: int, target: str, recipe: Any = None,
              module: Any = None) -> bytes:
    """``fp32`` (a unit or a whole network, input ``[batch, *chw]``) as ``target``'s int8 artifact: the int8
    recipe's reference graph (``ort-x86``), or the target's own build from that graph's scale table (``module``:
    the torch module ``fp32`` was exported from, for targets built with PT2E)."""
    from compress.quant.core import calibrate, prepare_float, quantize_prepared, range_dict
    from compress.targets.base import BuildInputs
    from compress.targets.registry import TARGETS
    from compress.targets.table import ScaleTable
    from recipes.loader import load_recipe

    rec = recipe or load_recipe("int8")
    reader = RandomReader(chw, batch)
    with tempfile.TemporaryDirectory(prefix="unit-int8.") as tmp:
        wd = Path(tmp)
        prepared = prepare_float(fp32, rec.quantize, wd)
        ranges = calibrate(prepared, reader, rec.calibration, wd)
        graph = quantize_prepared(prepared, ranges, rec, wd)
        if target == "ort-x86":
            return graph.model.SerializeToString()
        table = ScaleTable.from_int8(graph.model, fp32, range_dict(ranges), graph.excluded, "calibration", 8,
                                     graph.reduce_range)
        inputs = BuildInputs(module, fp32, table, rec, tuple(chw[1:]), wd, [i for i in reader.items],
                             channels=int(chw[0]))
        return TARGETS[target].build(inputs)


@dataclass(frozen=True)
class Timing:
    """Where and in which precision a latency table times units (and NetAdapt measures whole networks)."""
    target: str = "ort-x86"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"latency precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        from compress.targets.registry import TARGETS

        if self.target not in TARGETS:
            raise UserError(f"unknown target {self.target!r}; choose from: {', '.join(TARGETS)}")

    @property
    def key(self) -> str:
        """``ort-x86-int8``: names the table file and is checked when a stored table is read."""
        return f"{self.target}-{self.precision}"

    @property
    def measurable_here(self) -> bool:
        return self.target in TABLE_TARGETS

    @property
    def channel_step(self) -> int:
        """Channels per NetAdapt cut on this target (see the module docstring)."""
        if self.target == "ort-x86" and self.precision == "int8":
            return 16
        if self.target in ("ort-x86", "openvino", "executorch"):
            from eval.model_info import machine_info

            return 16 if "avx512f" in (machine_info().get("isa") or []) else 8
        return 8

    def check(self, proxy: bool = False) -> None:
        """A one-line error when units cannot be timed here: the runtime is missing, or the target's CPU is
        another one (``proxy``: timed here anyway, to scale a device table's measurements)."""
        from compress.targets.registry import TARGETS

        if not self.measurable_here and not (proxy and self.target in PROXY_TARGETS):
            raise UserError(f"{self.target} latency cannot be measured on this machine: measure the table on the "
                            f"device (tools/device_latency.py) and pass it with --latency-table FILE")
        TARGETS[self.target].check_installed()

    def runtime_version(self) -> str:
        if self.target == "executorch":
            from importlib.metadata import version

            return f"executorch {version('executorch')}"
        if self.target == "openvino":
            import openvino

            return f"openvino {openvino.get_version()}"
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def artifact(self, fp32: onnx.ModelProto, chw: Sequence[int], batch: int, module: Any = None) -> bytes:
        """What this timing runs for the float graph ``fp32`` (input ``[batch, *chw]``; ``module``: the torch
        module it was exported from, which ExecuTorch's artifacts are built from)."""
        if self.target in TORCH_TARGETS:
            if module is None:
                raise ValueError(f"{self.target} builds from the torch module: pass module=")
            module, fp32 = _flat_1x1_output(module, fp32, chw, batch)
        if self.precision == "int8":
            return int8_onnx(fp32, chw, batch, self.target, module=module)
        if self.target == "executorch":
            from compress.targets.executorch import lower

            return lower(module.eval(), (1, *chw))
        from compress.onnx.graph import fix_batch

        return fix_batch(fp32, batch).SerializeToString() if self.target != "ort-x86" else fp32.SerializeToString()

    def baseline(self, chw: Sequence[int], batch: int) -> bytes:
        """What entering and leaving a unit costs alone.  ONNX runtimes: an Identity (fp32) or Quantize ->
        Dequantize of the input (int8).  ExecuTorch converts a unit's input to XNNPACK's layout (NHWC; int8: and
        quantizes it) and its output back, which a unit inside the network does not pay: its baseline is the
        cheapest real layer, a 1x1 depthwise conv (one weight per channel) built as units are.  (The same
        baseline for OpenVINO measured worse: its table under-predicted 12 networks by 17.4 % on average,
        against 10.7 % over with Q -> DQ.)"""
        if self.target == "executorch":
            import torch

            module = torch.nn.Conv2d(chw[0], chw[0], 1, groups=chw[0]).eval()
            return self.artifact(onnx.load_from_string(export_unit(module, chw, batch)), chw, batch, module)
        return qdq_identity_onnx(batch, chw) if self.precision == "int8" else identity_onnx(batch, chw)

    def call(self, artifact: bytes, chw: Sequence[int], batch: int, threads: int) -> Callable[[], Any]:
        """One forward pass of ``artifact`` on a fixed random input, in this target's runtime."""
        from compress.targets.registry import TARGETS

        run = TARGETS[self.target].runner(artifact, threads, "fp32" if self.precision == "fp32" else "int8")
        x = np.random.default_rng(0).standard_normal((batch, *chw)).astype(np.float32)
        return lambda: run(x)


def _flat_1x1_output(module, fp32: onnx.ModelProto, chw: Sequence[int], batch: int):
    """A unit whose output is ``[N, C, 1, 1]`` returns it flattened to ``[N, C]``: ExecuTorch cannot tell that
    shape's NHWC output from NCHW (it refuses to resize it), and the flatten of 1 x 1 maps is free."""
    import torch

    with torch.no_grad():
        out = module.eval()(torch.zeros(batch, *chw))
    if out.ndim != 4 or tuple(out.shape[2:]) != (1, 1):
        return module, fp32
    flat = torch.nn.Sequential(module, torch.nn.Flatten(1)).eval()
    return flat, onnx.load_from_string(export_unit(flat, chw, batch))


def export_unit(module, chw: Sequence[int], batch: int) -> bytes:
    """``module`` (eval mode) as an ONNX graph with the static input ``[batch, *chw]`` (BN folded, opset 17)."""
    import io
    import warnings

    import torch

    from compress.onnx.export import drop_identities

    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(batch, *chw),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    drop_identities(proto)  # as the network's export: every weight an initializer (the int8 passes need it)
    return proto.SerializeToString()


def network_artifact(model, size: tuple[int, int], timing: Timing, batch: int) -> bytes:
    """The whole network (a torch module) as ``timing`` runs it (fp32 ONNX, or the target's int8 artifact)."""
    from compress.onnx.export import to_onnx

    return timing.artifact(to_onnx(model, size), (3, *size), batch, module=model)


def measure_artifacts(artifacts: dict[str, bytes], timing: Timing, size: tuple[int, int], threads: int, batch: int,
                      rounds: int, round_time_s: float = 0.1) -> dict[str, dict[str, Any]]:
    """Whole networks timed interleaved in ``timing``'s runtime."""
    from eval.latency import interleave

    chw = (3, *size)
    calls = {k: timing.call(a, chw, batch, threads) for k, a in artifacts.items()}
    return interleave(calls, threads=threads, batch=batch, rounds=rounds, round_time_s=round_time_s)
