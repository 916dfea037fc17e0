"""Where each side's model runs: the ``server-device`` and ``client-device`` keys.

A value is ``auto`` (CUDA if torch sees a GPU, else Apple's MPS, else the CPU), ``cpu``, ``cuda``,
``cuda:<index>`` or ``mps``. Only the weights, their optimiser and the forwards live there: every
frame is encoded from CPU tensors and decoded into CPU tensors, so activations move on and off the
device at the stream boundary.
"""

from __future__ import annotations

import torch

from fl_app.config import check_device_name


def resolve_device(key: str, value: str) -> torch.device:
    """The torch device ``value`` names on this machine; raises naming ``key`` if it is not present."""
    check_device_name(key, value)
    if value == "auto":
        return next(iter(accelerators()), torch.device("cpu"))
    device = torch.device(value)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(
                f"config key '{key}' = {value!r}, but torch sees {count} CUDA device(s) on this machine "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"config key '{key}' = {value!r}, but torch sees no MPS device on this machine")
    return device


def accelerators() -> list[torch.device]:
    """The non-CPU devices torch sees here, CUDA first (what ``auto`` takes; tests run on the first)."""
    found = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return found + ([torch.device("mps")] if torch.backends.mps.is_available() else [])
