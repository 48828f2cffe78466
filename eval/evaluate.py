"""One call that measures an ONNX model the way every report states it (``mnv3-compress eval``)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from compress.errors import UserError
from compress.onnx.metadata import get_metadata
from eval.accuracy import agreement, check_input_fits, predict, topk_accuracy
from eval.latency import measure_latency
from eval.model_info import (
    ModelLike,
    count_macs,
    input_size,
    load_model,
    machine_info,
    metadata_preprocess,
    model_bytes,
    model_params,
    network_macs,
    size_bytes,
)

if TYPE_CHECKING:  # the datasets (torch) are imported only when data is read
    from calibration.datasets import DataSource

ACCURACY_BATCH = 256


def _model_outputs(proto) -> int | None:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    last = dims[-1] if dims else None
    return last.dim_value if last is not None and last.HasField("dim_value") else None


def dataset_for(model: ModelLike, dataset: str | DataSource | None = None, workers: int | None = None) -> DataSource:
    """The dataset at the model's input size, preprocessed as the model's metadata says.

    ``dataset=None``: the dataset the model's metadata names (``mnv3_compress.dataset``), else fashion-mnist.
    The metadata's preprocessing wins over the dataset's definition, except that grayscale images are still
    expanded to RGB when the dataset needs it (that is a property of the data, not of the model).
    """
    from calibration.datasets import DataSource, open_dataset

    proto = load_model(model)
    meta = metadata_preprocess(proto)
    hw = input_size(proto)
    if isinstance(dataset, DataSource):
        source = dataset
    else:
        side = None
        if hw is not None:
            if hw[0] != hw[1] and meta is None:
                raise UserError(f"model input {hw[0]}x{hw[1]} is not square and it has no preprocessing metadata")
            side = max(hw)
        named = get_metadata(proto).get("dataset")
        if dataset is None and named and named.split(":")[0] in ("fashion-mnist", "imagefolder", "synthetic"):
            dataset = named
        source = open_dataset(dataset or "fashion-mnist", side, workers)
    if meta is not None:
        pre = dataclasses.replace(meta, grayscale_to_rgb=meta.grayscale_to_rgb or source.preprocess.grayscale_to_rgb)
        source = dataclasses.replace(source, preprocess=pre)
    check_input_fits(proto, source)
    outputs = _model_outputs(proto)
    if source.num_classes is not None and outputs is not None and outputs != source.num_classes:
        raise UserError(f"model has {outputs} outputs but dataset {source.name} has {source.num_classes} classes")
    return source


def evaluate_onnx(model: ModelLike, dataset: str | DataSource | None = None, limit: int | None = None,
                  threads: int = 1, batch: int = 1, reference: ModelLike | None = None, latency: bool = True,
                  workers: int | None = None) -> dict[str, Any]:
    """Accuracy on the first ``limit`` test images, agreement with ``reference`` (share of equal top-1),
    latency at ``threads`` x ``batch``, size, params, MACs and the machine.

    Returns exactly ``{accuracy: {top1, top5}, agreement, latency_ms, size_bytes, params, macs, macs_executed,
    machine}``: ``macs`` the network's (:func:`eval.model_info.network_macs`), ``macs_executed`` what its graph
    runs (the same unless the graph was padded with zero channels for int8 kernels);
    accuracy values are None on unlabelled (synthetic) data, agreement None without a reference and
    latency_ms None when ``latency=False``.  Accuracy runs a large-batch session on every core; latency a
    fresh session with the requested settings.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    data = model_bytes(model)  # validates: missing / corrupt files raise UserError here
    proto = load_model(data)
    source = dataset_for(proto, dataset, workers)
    logits, labels = predict(data, source, limit=limit, batch_size=ACCURACY_BATCH)
    accuracy = topk_accuracy(logits, labels, ks=(1, 5))
    agree = None
    if reference is not None:
        ref_data = model_bytes(reference)
        ref_logits, _ = predict(ref_data, source, limit=limit, batch_size=ACCURACY_BATCH)
        if ref_logits.shape != logits.shape:
            raise UserError(f"reference model gives logits {ref_logits.shape[1:]} but the model gives "
                            f"{logits.shape[1:]}")
        agree = agreement(logits, ref_logits)
    lat = measure_latency(data, threads=threads, batch=batch) if latency else None
    return {
        "accuracy": accuracy,
        "agreement": agree,
        "latency_ms": lat,
        "size_bytes": size_bytes(model),
        "params": model_params(proto),
        "macs": network_macs(proto),
        "macs_executed": count_macs(proto),
        "machine": machine_info(),
    }
