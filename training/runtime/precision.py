"""The precision a training step runs in (`train.precision`): bf16 autocast or fp32.

`auto` is bf16 autocast where the device multiplies bf16 in hardware, else fp32. Under bf16
autocast the weights, the optimizer state and the loss stay fp32: no loss scaling is needed.
"""

from __future__ import annotations

import torch

# train.precision: auto is bf16 autocast where the device computes it natively, else fp32.
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: CUDA GPUs from Ampere on, and CPUs with AMX or
    AVX512-BF16 (oneDNN's bf16 matmul is ~6x fp32 on AMX; elsewhere bf16 is emulated, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: may go away
    return device.type == "cpu" and any(getattr(cpu, name, lambda: False)() for name in checks)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether training steps on `device` run under bf16 autocast for `train.precision`."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def autocast(device: torch.device, precision: str = "fp32") -> torch.autocast:
    """The autocast context a training step runs in: bf16 where `uses_bf16` (weights,
    optimizer state and the loss stay fp32; no loss scaling needed), else disabled (fp32)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=uses_bf16(device, precision))
