"""The hidden state at every block boundary for the calibration tokens, placed by a memory budget.

Boundary i is the input of block i (boundary 0 is the embedding output, boundary L the last block's
output, before the final norm). Each boundary goes to the first tier with room: the compute device
(when it is a GPU), host memory, then a temporary folder on disk (read back memory-mapped). For a
70B model with SLM's 10 x 128 calibration tokens, all 81 boundaries are ~1.7 GB in bf16.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


class HiddenStateCache:
    def __init__(
        self,
        device: torch.device | str = "cpu",
        device_budget_bytes: int = 0,
        host_budget_bytes: int = 2**62,
        spill_dir: str | Path | None = None,
    ):
        self.device = torch.device(device)
        self.budgets = {"device": device_budget_bytes if self.device.type != "cpu" else 0, "host": host_budget_bytes}
        self.used = {"device": 0, "host": 0, "disk": 0}
        self._spill_root = spill_dir
        self._spill: Path | None = None
        self._memory: dict[int, Tensor] = {}
        self._tier: dict[int, str] = {}

    def put(self, boundary: int, hidden: Tensor) -> None:
        if boundary in self._tier:
            raise KeyError(f"boundary {boundary} is cached already")
        size = hidden.numel() * hidden.element_size()
        for tier, target in (("device", self.device), ("host", torch.device("cpu"))):
            if self.used[tier] + size <= self.budgets[tier]:
                self._memory[boundary] = hidden.detach().to(target, copy=hidden.device == target)
                break
        else:
            tier = "disk"
            save_file({"hidden": hidden.detach().cpu().contiguous()}, self._spill_path(boundary))
        self._tier[boundary] = tier
        self.used[tier] += size

    def get(self, boundary: int) -> Tensor:
        tier = self._tier.get(boundary)
        if tier is None:
            raise KeyError(f"boundary {boundary} is not cached")
        if tier == "disk":
            return load_file(self._spill_path(boundary))["hidden"]
        return self._memory[boundary]

    def __contains__(self, boundary: int) -> bool:
        return boundary in self._tier

    def placement(self) -> dict[str, int]:
        """Bytes held in each tier."""
        return dict(self.used)

    def close(self) -> None:
        self._memory.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def _spill_path(self, boundary: int) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="slm_fast-hidden-", dir=self._spill_root))
        return self._spill / f"boundary-{boundary:04d}.safetensors"

    def __del__(self) -> None:
        self.close()
