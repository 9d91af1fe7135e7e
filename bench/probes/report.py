"""What the process-level probes (first_job.py, worker_start.py) share: the GPU's name and the
JSON report written to ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def gpu_name() -> Optional[str]:
    """The CUDA device's name, or None without one (or without torch)."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a report field, not a requirement
        return None


def write(result: dict[str, Any], out: Optional[str]) -> str:
    """``result`` with its ``gpu`` as indented JSON, written to ``out`` when given; returns the text."""
    result["gpu"] = gpu_name()
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text)
    return text
