"""Where the server computes: the ``device`` setting, resolved once when the engine starts.

Training, forgets and scans run on the resolved device; the served snapshots (Predict)
and everything stored stay on the CPU, so stored bytes never depend on the device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from expunge.server.settings import DEVICE_SETTINGS


class DeviceUnavailable(RuntimeError):
    """The configured device is not present on this machine (``device = "cuda"`` without CUDA)."""


def resolve_device(setting: str) -> torch.device:
    """``"auto"``: CUDA when torch finds it, else the CPU; ``"cpu"``; ``"cuda"`` or refused.

    Raises ``ValueError`` for any other value and ``DeviceUnavailable`` for ``"cuda"`` on
    a machine without CUDA, so a misconfigured server fails at start, not at its first job.
    """
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"device must be one of {DEVICE_SETTINGS}, not {setting!r}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none"
        raise DeviceUnavailable(
            f"device = 'cuda', but torch {torch.__version__} (built with CUDA {built}) finds "
            "no usable CUDA device; install a CUDA build of torch and check the driver, or "
            "set device to 'auto' or 'cpu' (EXPUNGE_DEVICE, or --device)"
        )
    return torch.device("cuda")


def describe_device(device: torch.device) -> str:
    """What a receipt records: ``cpu``, or ``cuda`` with the card's name."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def module_on(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` itself when its parameters are on ``device``, else a copy moved there:
    the served snapshot stays on the CPU for Predict and is never moved in place."""
    first = next(module.parameters(), None)
    if first is None or first.device.type == device.type:
        return module
    return copy.deepcopy(module).to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
