"""logging.peak_tflops when not set: the accelerator's dense bf16 peak from a table of known devices,
or on a CPU the fp32 matmul rate measured in this process (so MFU on a CPU means "share of what a
large matmul reaches here", not of a datasheet figure)."""

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


def measured_cpu_tflops(seconds: float = 0.3, n: int = 1024) -> float:
    """fp32 matmul rate of this process's torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up (thread pool, caches)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0) / 1e12


def resolve_peak_tflops(configured: float | None, rank: int = 0) -> float:
    """The peak per device MFU is measured against."""
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
        peak, source = measured_cpu_tflops(), "this CPU process's measured fp32 matmul rate"
    if rank == 0:
        log.info("MFU is relative to %.3g TFLOPS per device (%s; set logging.peak_tflops to change)", peak, source)
    return peak
