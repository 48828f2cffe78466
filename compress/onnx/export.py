"""fp32 ONNX export with the metadata a deployed model needs (:mod:`compress.onnx.metadata`), validated against
torch before it is kept."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from calibration.preprocess import Preprocess
from compress.errors import UserError
from compress.io import write_bytes
from compress.models.mobilenetv3 import MobileNetV3, count_params
from compress.onnx.metadata import INPUT_NAME, OUTPUT_NAME, set_metadata

OPSET = 17


def drop_identities(model: onnx.ModelProto) -> None:
    """The TorchScript exporter leaves Identity nodes over shared initializers; rewire and drop them."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    alias = {}
    keep = []
    for n in graph.node:
        if n.op_type == "Identity" and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def to_onnx(model: torch.nn.Module, input_size: tuple[int, int], opset: int = OPSET) -> onnx.ModelProto:
    """Trace ``model`` (eval mode, batch dimension dynamic) into an ONNX ModelProto."""
    model = model.eval()
    x = torch.zeros(1, 3, *input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    drop_identities(proto)
    return proto


def validate(proto: onnx.ModelProto, model: torch.nn.Module, input_size: tuple[int, int], atol: float = 1e-4,
             seed: int = 0) -> float:
    """onnx.checker + ORT vs torch on a sample batch; returns the max abs difference, raises if above ``atol``."""
    import onnxruntime as ort

    onnx.checker.check_model(proto)
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    if not diff <= atol * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"exported ONNX disagrees with torch: max abs diff {diff:.3g} > {atol}")
    return diff


def export_onnx(model: MobileNetV3, output: str | os.PathLike, preprocess: Preprocess, recipe: str = "fp32",
                extra_meta: Mapping[str, Any] | None = None, opset: int = OPSET) -> Path:
    """Export ``model`` to ``output`` (atomically), with metadata; validated against torch first."""
    if opset < 17:
        raise UserError(f"opset must be >= 17, got {opset}")
    proto = to_onnx(model, preprocess.input_size, opset)
    validate(proto, model, preprocess.input_size)
    spec = model.spec
    set_metadata(proto, {
        "preprocess": preprocess.to_json(), "recipe": recipe, "arch": spec.arch,
        "width_mult": spec.width_mult, "minimalistic": spec.minimalistic, "num_classes": spec.num_classes,
        "params": count_params(model), "spec": spec.to_dict(), **(extra_meta or {}),
    })
    proto.producer_name = "mnv3-compress"
    return write_bytes(output, proto.SerializeToString())


def export_model(output: str | os.PathLike, weights: str | None = None, arch: str | None = None,
                 width_mult: float | None = None, minimalistic: bool | None = None, num_classes: int | None = None,
                 dataset: str | None = None, input_size: int | None = None, random_init: bool = False,
                 train_default: bool = False) -> Path:
    """The ``export`` command: the model (``weights``, the embedded default, or ``random_init`` for latency work
    on any architecture) as fp32 ONNX.  It needs no data: the metadata's preprocessing is ``dataset``'s when
    given, else the one the checkpoint records, else ImageNet's for a 1000-class model (torchvision / timm)."""
    from compress.models.checkpoint import load_model
    from compress.training.default_model import resolve_model

    if random_init:
        if weights is not None:
            raise UserError("use either --weights or --random-init, not both")
        loaded = load_model(None, arch, width_mult, minimalistic, num_classes or _classes(dataset) or 1000)
    elif weights is None:
        loaded, _ = resolve_model(None, arch, width_mult, minimalistic, num_classes, dataset, input_size,
                                  train_default=train_default)
    else:
        loaded = load_model(weights, arch, width_mult, minimalistic, num_classes)
    pre, data = _export_preprocess(loaded, dataset, input_size, weights)
    return export_onnx(loaded.model, output, pre, extra_meta={"source": loaded.source, "dataset": data})


def _classes(dataset: str | None) -> int | None:
    from calibration.datasets import open_dataset

    return open_dataset(dataset).num_classes if dataset else None


def _export_preprocess(loaded, dataset: str | None, input_size: int | None, weights) -> tuple[Preprocess, str]:
    """(preprocessing, data name) the exported model records: see :func:`export_model`."""
    from calibration.datasets import open_dataset
    from calibration.preprocess import at_input_size, imagenet_preprocess

    size = input_size or loaded.meta.get("input_size")
    if dataset is not None:
        source = open_dataset(dataset, int(size) if size else None)
        return source.preprocess, source.name
    recorded = loaded.meta.get("preprocess")
    if isinstance(recorded, str):
        try:
            pre = Preprocess.from_json(recorded)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{weights}: invalid recorded preprocessing ({e}); pass --dataset") from None
        return (at_input_size(pre, int(input_size)) if input_size else pre), str(loaded.meta.get("dataset", "?"))
    named = loaded.meta.get("dataset")
    if isinstance(named, str):  # a checkpoint that names its data but not its preprocessing: that data's
        source = open_dataset(named, int(size) if size else None)
        return source.preprocess, source.name
    if loaded.spec.num_classes == 1000:
        return imagenet_preprocess(int(size or 224)), "imagenet"
    what = "the model" if weights is None else f"{weights}"
    raise UserError(f"{what} records no preprocessing and has {loaded.spec.num_classes} classes, not ImageNet's 1000: "
                    f"pass --dataset D (the data it was trained on: fashion-mnist, imagefolder:PATH) to record D's")
