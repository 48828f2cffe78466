"""Quantization: the PTQ core (calibrate, quantize, check) and the strategies built on it (QAT, tuning, mixed
precision); :mod:`compress.quant.pipeline` picks the strategy a recipe asks for."""
