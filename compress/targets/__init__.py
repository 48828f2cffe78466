"""Deploy targets: one int8 quantization (:mod:`compress.targets.table`) written for each runtime a device runs.

``ort-x86`` (the reference graph), ``ort-arm64``, ``openvino``, ``executorch`` (XNNPACK), ``litert`` - one module
each, all answering :class:`compress.targets.base.Target`.  Optional runtimes are imported only when their
target is used; a missing one is a one-line error naming its pip extra.
"""
