"""Heat maps of L x L layer-similarity matrices (CKA, cosine), drawn with matplotlib's Agg canvas
directly: no pyplot, no global backend switch, no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from torch import Tensor

from slm_fast.errors import InputError

MAX_LABELLED_TICKS = 40  # beyond this many blocks, label every k-th block only


def plot_similarity_heatmap(
    matrix: Tensor | np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    colorbar_label: str = "CKA",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> Path:
    """Write an L x L heat map with a colour bar and block indices on both axes to `path` (PNG, or any
    format matplotlib infers from the suffix). NaN entries (pairs not computed) are drawn grey. vmin or
    vmax None takes the data's range. Returns the path written."""
    values = matrix.detach().double().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, float)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] == 0:
        raise InputError(f"a heat map needs a non-empty square matrix, got shape {values.shape}")
    size = values.shape[0]
    inches = min(14.0, 3.0 + 0.25 * size)
    figure = Figure(figsize=(inches + 1.2, inches))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colormap = _colormap()
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    step = 1 if size <= MAX_LABELLED_TICKS else int(np.ceil(size / MAX_LABELLED_TICKS))
    ticks = np.arange(0, size, step)
    axes.set_xticks(ticks, [str(t) for t in ticks], rotation=90 if size > 20 else 0)
    axes.set_yticks(ticks, [str(t) for t in ticks])
    axes.set_xlabel("block")
    axes.set_ylabel("block")
    if title:
        axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar_label, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def _colormap() -> Colormap:
    """viridis, with NaN (pairs not computed) in grey."""
    return colormaps["viridis"].with_extremes(bad="#bbbbbb")
