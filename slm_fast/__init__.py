"""slm_fast: depth pruning of large language models by sliding layer merging, out of core.

The similarity engine is the public library surface (lazily imported so that `import slm_fast` stays
cheap): `cka_matrix`, `StreamingCKA`, `hsic`, `cosine`, `angular_distance`, `block_influence`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "cka_matrix": "slm_fast.similarity",
    "StreamingCKA": "slm_fast.similarity",
    "hsic": "slm_fast.similarity",
    "cosine": "slm_fast.similarity",
    "angular_distance": "slm_fast.similarity",
    "block_influence": "slm_fast.similarity",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slm_fast' has no attribute {name!r}")
