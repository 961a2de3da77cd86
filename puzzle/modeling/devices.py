"""The one place that turns a device or dtype setting (``auto``, ``cpu``, ``cuda:1``, ...) into torch's."""

from __future__ import annotations

import os

import torch

from puzzle.errors import PuzzleError


class DeviceError(PuzzleError, ValueError):
    """A device that was asked for is not available here; the message says what to use instead."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Under ``torchrun`` (``LOCAL_RANK`` set) a bare
    ``cuda`` means this process's GPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'"
            )
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (``bfloat16``) as torch's; ``auto``/None stays None (the caller's default)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise DeviceError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    chosen = parse_dtype(dtype)
    if chosen is not None:
        return chosen
    return torch.bfloat16 if device.type == "cuda" else torch.float32
