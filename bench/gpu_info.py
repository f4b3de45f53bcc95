"""What every GPU benchmark prints and stores first: which card, which software, which clocks.

Clocks are read with nvidia-smi (never set: a benchmark measures the card as it is found)."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def _smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def gpu_info() -> dict[str, Any]:
    """GPU name, torch / Triton / CUDA versions, current and maximum clocks."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["driver"] = _smi("driver_version")
        info["clocks_mhz"] = _smi("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem")
        info["power_w"] = _smi("power.draw,power.limit")
        info["temperature_c"] = _smi("temperature.gpu")
    return info


def header(info: dict[str, Any]) -> str:
    return (f"# {info.get('gpu') or 'no GPU'} | torch {info['torch']} | triton {info['triton']} | "
            f"CUDA {info['cuda']} | driver {info.get('driver')} | clocks sm,mem,max_sm,max_mem (MHz) "
            f"{info.get('clocks_mhz')} | {info['time']}")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")
