"""What this machine's CPU multiplies natively, from /proc/cpuinfo: serving (bot.generation) and
training (training.train) both choose their precision by it. Kept apart from both so that
serving reads it without loading the trainer."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> str:
    """/proc/cpuinfo ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_amx() -> bool:
    """AMX: bf16 matmuls faster than fp32, even on one row. AVX-512 BF16 alone varies (half the
    fp32 rate on one Xeon, 2.4-3.7x on an AMD EPYC), so training times a matmul instead."""
    return "amx_bf16" in cpu_flags()


def cpu_multiplies_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (many rows faster than fp32)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags
