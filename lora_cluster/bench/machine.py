"""What ran a benchmark: CPU model and count, load average, GPU, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, GPU (when visible), memory and the versions that shape the numbers."""
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": mem_gb,
                            "python": platform.python_version(), "load_average": load_average()}
    for package in ("torch", "triton", "ray", "transformers", "peft"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    return info


def machine_name(info: dict[str, Any]) -> str:
    """One line naming the machine, e.g. 'NVIDIA H100 80GB HBM3' or '2 × Intel Xeon …'."""
    if info.get("gpu"):
        return f"{info['gpu']} (host: {info.get('cpu_count')} × {info.get('cpu')})"
    return f"{info.get('cpu_count')} × {info.get('cpu')}, {info.get('memory_gb')} GB RAM"
