"""FLOPs of an encoder's forward pass and the accelerator's peak, for utilisation figures.

The count comes from PyTorch's own operator-level counter
(:class:`torch.utils.flop_counter.FlopCounterMode`: matrix products and
convolutions, 2 FLOPs per multiply-add; elementwise work is not counted, as
in every model-FLOP-utilisation figure). The peak is both the vendor's dense
bf16 tensor-core figure and a bf16 matrix product measured on the device,
since the first is rarely reachable.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from virtualst.embed.encoders import Encoder

#: Vendor dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of ``torch.cuda.get_device_name``.
#: Order matters: the first match wins, so the more specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def vendor_bf16_peak_tflops(device_name: str) -> float | None:
    """The vendor's dense bf16 peak for a CUDA device name, or ``None`` when not in the table."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def flops_per_tile(encoder: Encoder, device: torch.device | str = "cpu") -> float:
    """FLOPs of one tile through ``encoder`` at its input size (batch of 2, halved: no batch-1 special cases)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = encoder.input_size
    x = torch.zeros(2, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(x)
    return counter.get_total_flops() / 2


def measured_matmul_tflops(device: torch.device | str, dtype: torch.dtype | None = None, n: int = 8192, repeats: int = 20) -> float:
    """Achieved TFLOP/s of an ``n`` x ``n`` matrix product on ``device`` (bf16 on CUDA, float32 on CPU by default)."""
    import torch

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, clocks
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
