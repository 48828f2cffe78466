"""Model zoo and transformations of mnv3-compress, one subpackage per stage: models -> training -> onnx ->
quant / prune (each importing only the stages before it)."""
