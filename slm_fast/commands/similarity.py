"""`slm-fast similarity ACTS.safetensors --kernel rbf --out sim.json [--plot heatmap.png]`: the L x L CKA
matrix of saved activations.

Activations file (safetensors), one of two layouts:
- `layers.0`, `layers.1`, ..., `layers.{L-1}`: one [n, d_i] tensor per layer (widths may differ; the
  indices must run from 0 without gaps), or
- `activations`: one [L, n, d] tensor.
Every layer holds the same n tokens in the same order; dtypes float32, bfloat16, float16 or float64. No
other tensors may be present (metadata is ignored).

Output JSON: {"source", "layout", "num_layers", "num_tokens", "widths", "kernel", "unbiased", "sigma"
(per-layer list for rbf, else null), "sigma_rule", "pairs" ("all" or {"band": W}), "cka"} where "cka" is
the L x L matrix as nested lists with null for entries that are NaN (pairs outside the band, or layers
with constant activations).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.similarity import cka_matrix, resolve_sigmas

STACKED_NAME = "activations"
LAYER_NAME = re.compile(r"^layers\.(0|[1-9][0-9]*)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "similarity",
        help="CKA matrix between the layers of saved activations",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("acts", type=Path, help="activations file (.safetensors), layout above")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--kernel", choices=("linear", "rbf"), default="linear")
    parser.add_argument("--unbiased", action="store_true", help="unbiased HSIC (Song et al.); needs n >= 4")
    parser.add_argument(
        "--sigma",
        default=None,
        help="rbf bandwidth: one float, or L comma-separated floats (default: median heuristic)",
    )
    parser.add_argument("--sigma-scale", type=float, default=1.0, help="multiplier of the median-heuristic sigma")
    parser.add_argument(
        "--median-diagonal", action="store_true", help="count the zero i == j pairs in the median (Kornblith)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the median heuristic's pair sample")
    parser.add_argument("--band", type=int, default=None, help="only pairs with |a - b| <= BAND (others null)")
    parser.add_argument("--backend", default="auto", help="auto, tiled, triton or cuda")
    parser.add_argument("--device", default="cpu", help="torch device to compute on (default cpu)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the matrix as a heat map (PNG)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    layers, layout = load_activations(args.acts)
    layers = [x.to(args.device) for x in layers]
    sigma = _parse_sigma(args.sigma) if args.kernel == "rbf" else None
    if args.kernel != "rbf" and (args.sigma is not None or args.sigma_scale != 1.0):
        raise InputError("--sigma and --sigma-scale apply to --kernel rbf only")
    sigmas = None
    if args.kernel == "rbf":
        sigmas = resolve_sigmas(
            layers,
            sigma,
            sigma_scale=args.sigma_scale,
            median_diagonal=args.median_diagonal,
            seed=args.seed,
        )
    pairs = None
    if args.band is not None:
        if args.band < 0:
            raise InputError(f"--band must be >= 0, got {args.band}")
        pairs = [(a, b) for a in range(len(layers)) for b in range(a, min(len(layers), a + args.band + 1))]
    cka = cka_matrix(
        layers, kernel=args.kernel, sigma=sigmas, unbiased=args.unbiased, backend=args.backend, pairs=pairs
    )
    report = {
        "source": str(args.acts),
        "layout": layout,
        "num_layers": len(layers),
        "num_tokens": layers[0].shape[0],
        "widths": [x.shape[1] for x in layers],
        "kernel": args.kernel,
        "unbiased": args.unbiased,
        "sigma": sigmas,
        "sigma_rule": _sigma_rule(args),
        "pairs": "all" if args.band is None else {"band": args.band},
        "cka": [[None if math.isnan(v) else v for v in row] for row in cka.tolist()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report) + "\n")
    if args.plot is not None:
        from slm_fast.plotting import plot_similarity_heatmap

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        title = f"{'unbiased ' if args.unbiased else ''}{args.kernel} CKA, {layers[0].shape[0]} tokens"
        lowest = min(0.0, float(cka.nan_to_num(nan=0.0).min()))  # unbiased CKA can be negative
        plot_similarity_heatmap(cka, args.plot, title=title, vmin=lowest)
    return 0


def load_activations(path: Path) -> tuple[list[Tensor], str]:
    """Layers of an activations file and the layout found ("layers.{i}" or "activations")."""
    if not path.is_file():
        raise InputError(f"{path}: no such activations file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if STACKED_NAME in names:
                if len(names) != 1:
                    others = ", ".join(sorted(n for n in names if n != STACKED_NAME))
                    raise InputError(f"{path}: holds '{STACKED_NAME}' and also {others}; use one layout only")
                stacked = handle.get_tensor(STACKED_NAME)
                if stacked.ndim != 3:
                    raise InputError(
                        f"{path}: tensor '{STACKED_NAME}' has shape {tuple(stacked.shape)}, expected [L, n, d]"
                    )
                return list(stacked.unbind(0)), STACKED_NAME
            return _numbered_layers(path, names, handle), "layers.{i}"
    except SafetensorError as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc


def _numbered_layers(path: Path, names: list[str], handle: Any) -> list[Tensor]:
    if not names:
        raise InputError(f"{path}: holds no tensors; expected 'layers.0', 'layers.1', ... or '{STACKED_NAME}'")
    unexpected = sorted(n for n in names if not LAYER_NAME.match(n))
    if unexpected:
        raise InputError(
            f"{path}: unexpected tensor names {unexpected[:5]}; expected 'layers.0', 'layers.1', ... or "
            f"'{STACKED_NAME}'"
        )
    indices = sorted(int(n.split(".")[1]) for n in names)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise InputError(f"{path}: layer tensors must be numbered 0..L-1 without gaps; missing layers.{missing[0]}")
    layers = []
    for index in indices:
        tensor = handle.get_tensor(f"layers.{index}")
        if tensor.ndim != 2:
            raise InputError(f"{path}: tensor 'layers.{index}' has shape {tuple(tensor.shape)}, expected [n, d]")
        layers.append(tensor)
    return layers


def _parse_sigma(text: str | None) -> float | list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise InputError(f"--sigma must be a float or comma-separated floats, got {text!r}") from exc
    return values[0] if len(values) == 1 else values


def _sigma_rule(args: argparse.Namespace) -> str | None:
    if args.kernel != "rbf":
        return None
    if args.sigma is not None:
        return "given"
    diagonal = "zero diagonal counted" if args.median_diagonal else "pairs i != j"
    return f"median heuristic x {args.sigma_scale} ({diagonal}, seed {args.seed})"
