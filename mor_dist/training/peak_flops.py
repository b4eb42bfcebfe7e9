"""logging.peak_tflops when not set: the accelerator's dense bf16 peak from a table of known devices,
or on a CPU the matmul rate measured in this process in the run's dtype (so MFU on a CPU means "share
of what a large matmul reaches here", not of a datasheet figure; bf16 is measured in bf16, since a CPU
with bf16 instructions multiplies it about twice as fast as fp32)."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("mor.train")

# Dense bf16 TFLOPS (no sparsity) per device, from the vendors' datasheets. Checked in order: the
# first name contained in the device name wins (so "H100 PCIe" before "H100").
DENSE_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("MI300X", 1307.0),
    ("MI300A", 980.0),
)


def device_peak_tflops(name: str) -> float | None:
    for key, tflops in DENSE_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def measured_cpu_tflops(seconds: float = 0.3, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Matmul rate of this process's torch threads in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, caches)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0) / 1e12


def resolve_peak_tflops(configured: float | None, rank: int = 0, dtype: torch.dtype = torch.float32) -> float:
    """The peak per device MFU is measured against; dtype: the run's compute dtype (CPU only: a
    GPU's table holds its bf16 peak)."""
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = device_peak_tflops(name)
        if peak is None:
            from mor_dist.config import ConfigError

            raise ConfigError(f"logging.peak_tflops: the peak of {name!r} is not in the table; set "
                              "logging.peak_tflops to its dense bf16 TFLOPS")
        source = f"{name}'s dense bf16 peak"
    else:
        kind = "bf16" if dtype == torch.bfloat16 else "fp32"
        peak, source = measured_cpu_tflops(dtype=dtype), f"this CPU process's measured {kind} matmul rate"
    if rank == 0:
        log.info("MFU is relative to %.3g TFLOPS per device (%s; set logging.peak_tflops to change)", peak, source)
    return peak
