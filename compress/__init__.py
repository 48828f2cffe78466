"""Model zoo and transformations of mnv3-compress, one subpackage per stage: models -> training -> onnx ->
quant / prune (each importing only the stages before it)."""

import os as _os

# see cli.py: sleeping OpenMP waiters keep training fast on shared cores (set before torch loads OpenMP)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
