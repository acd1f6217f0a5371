"""The loss curve of a healing run as a PNG (matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_loss_curve(losses: list[float], path: Path, *, title: str = "", window: int = 10) -> Path:
    """Per-step training loss and its running mean over `window` steps."""
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    running = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))
    ]
    axes.plot(steps, running, lw=1.8, label=f"mean of last {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    if title:
        axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
