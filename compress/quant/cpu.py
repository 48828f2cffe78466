"""Which int8 instructions a CPU has, and what that means for the weight grid (7 or 8 bits)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_int8_info", "resolve_reduce_range"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_info(cpuinfo: str | None = None, machine: str | None = None) -> dict[str, Any]:
    """Which int8 dot-product instructions a CPU has (x86: VNNI/AMX; Arm: sdot), from ``/proc/cpuinfo`` text.

    Without ``cpuinfo`` this machine's is read and ``machine`` defaults to ``platform.machine()``; with a given
    text the architecture is read from that text too (Arm kernels list ``Features`` and ``CPU architecture``,
    x86 kernels ``flags``), so a device's cpuinfo describes the device, not the host reading it.
    """
    if cpuinfo is None:
        machine = machine or platform.machine()
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    arm_text = False
    for line in cpuinfo.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
        arm_text = arm_text or key in ("features", "cpu architecture", "cpu implementer")
    if machine is None:
        machine = "aarch64" if arm_text else "x86_64" if flags & {"sse2", "avx2"} else platform.machine()
    machine = machine.lower()
    x86 = machine in ("x86_64", "amd64", "i686", "i386")
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
