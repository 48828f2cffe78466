#!/usr/bin/env bash
# The default test suite, in four pytest processes instead of one (extra arguments go to each).
#
# Why: in one process of the whole suite, the Python heap is corrupted by the time the torchrun tests of
# tests/compress/quant run (CPython's tuple free list: SIGSEGV with si_code SI_KERNEL in maybe_freelist_pop,
# found with gdb; each group alone passes, and so does any two of them that were tried). The corrupting
# extension call is not found yet. Separate processes keep one group's native state out of the others.
# The last group is "everything else", so a new test folder is never left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
groups=("tests/calibration tests/compress/models tests/compress/onnx tests/recipes"
        "tests/compress/prune tests/compress/quant"
        "tests/compress/targets tests/compress/training tests/compress/compare")
rest=()
for g in "${groups[@]}"; do
  # shellcheck disable=SC2086
  "$PY" -m pytest $g "$@"
  for d in $g; do rest+=("--ignore=$d"); done
done
"$PY" -m pytest tests "${rest[@]}" "$@"
