"""Checking a `--device` choice before any work, so a typo or a missing GPU is an InputError rather
than a traceback from deep inside torch."""

from __future__ import annotations

import torch

from slm_fast.errors import InputError


def check_device(device: str) -> torch.device:
    """The torch device for `device` (cpu, cuda, cuda:N); InputError when it is malformed or absent."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from exc
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise InputError(f"--device {device!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise InputError(
            f"--device {device!r}: this torch ({torch.__version__}) sees no CUDA device; "
            "install a CUDA build of torch on a machine with a GPU, or use --device cpu"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return parsed
