"""Which int8 instructions a CPU has, and what that means for the weight grid (7 or 8 bits)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_int8_info", "resolve_reduce_range"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """Which int8 dot-product instructions this CPU has (x86: VNNI/AMX; Arm: sdot)."""
    machine = platform.machine().lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    x86 = machine in ("x86_64", "amd64", "i686", "i386") or "avx2" in flags or "sse2" in flags
    return {"machine": machine, "x86": x86, "vnni": sorted(f for f in _VNNI_FLAGS if f in flags),
            "avx2": "avx2" in flags, "avx512": "avx512f" in flags, "arm_dot": "asimddp" in flags}


def resolve_reduce_range(setting: str, info: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Decide 7-bit weights.  ORT's docs: U8S8 on x86 without VNNI can saturate (VPMADDUBSW adds two u8*s8
    products into int16), so quantize weights to 7 bits there; with VNNI (VPDPBUSD, int32 accumulation) or on
    Arm there is no such saturation and full 8 bits are used."""
    info = info or cpu_int8_info()
    if setting == "always":
        return True, "recipe: reduce_range = always"
    if setting == "never":
        return False, "recipe: reduce_range = never"
    if info["x86"] and not info["vnni"]:
        return True, "auto: x86 CPU without VNNI -> 7-bit weights against U8S8 saturation"
    if info["x86"]:
        return False, f"auto: CPU has {', '.join(info['vnni'])} -> full 8-bit weights"
    return False, f"auto: {info['machine']} CPU (no U8S8 saturation issue) -> full 8-bit weights"
