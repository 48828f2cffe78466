"""Datasets, the preprocessing each one defines, and calibration readers."""
