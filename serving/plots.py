"""Figures in the paper's style (Figures 8 and 9): SLO attainment against per-GPU rate and
against SLO scale, one colour per system, the 90% target as a dashed line."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")   # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

TARGET_LINE = dict(color="gray", linestyle="--", linewidth=1)
# both SLOs solid, TTFT-only dashed, TPOT-only dotted, as the paper's legend reads.
KIND_STYLES = (("both", "-", "o", "Both"), ("ttft", "--", None, "TTFT"), ("tpot", ":", None, "TPOT"))
COLORS = {"distserve": "tab:green", "vllm": "tab:blue", "openai": "tab:blue", "colocated": "tab:blue"}


def _plot_curves(ax, xs_by_backend: dict[str, Sequence[float]],
                 curves_by_backend: dict[str, dict[str, Sequence[float]]], target: float,
                 kinds: Sequence[str] = ("both", "ttft", "tpot")) -> None:
    for i, (backend, xs) in enumerate(xs_by_backend.items()):
        color = COLORS.get(backend, f"C{i + 2}")
        for kind, style, marker, label in (k for k in KIND_STYLES if k[0] in kinds):
            ax.plot(xs, [100 * v for v in curves_by_backend[backend][kind]], linestyle=style,
                    marker=marker, markersize=4, color=color, label=f"{backend} ({label})")
    ax.axhline(100 * target, **TARGET_LINE)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("SLO attainment (%)")
    ax.grid(alpha=0.3)


def plot_attainment_vs_rate(ax, rates: dict[str, Sequence[float]],
                            curves: dict[str, dict[str, Sequence[float]]], target: float = 0.9,
                            kinds: Sequence[str] = ("both", "ttft", "tpot")) -> None:
    """rates: backend -> per-GPU rates; curves: backend -> {"both"|"ttft"|"tpot": attainments};
    kinds: which of the three curves to draw."""
    _plot_curves(ax, rates, curves, target, kinds)
    ax.set_xlabel("Per-GPU rate (req/s)")


def plot_attainment_vs_slo_scale(ax, scales: dict[str, Sequence[float]],
                                 curves: dict[str, dict[str, Sequence[float]]],
                                 target: float = 0.9, kinds: Sequence[str] = ("both", "ttft", "tpot")) -> None:
    _plot_curves(ax, scales, curves, target, kinds)
    ax.set_xlabel("SLO scale")
    ax.invert_xaxis()   # tighter SLOs to the right, as in the paper


def save_figure(fig, out_stem: str | Path) -> list[Path]:
    """Write <out_stem>.png and <out_stem>.pdf; return both paths."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(fig)
    return paths


def attainment_figure(title: str, rate_view: tuple[dict, dict], slo_view: tuple[dict, dict],
                      fixed_rates: dict[str, float], target: float = 0.9):
    """One row, two panels: attainment vs per-GPU rate (Fig. 8) and vs SLO scale (Fig. 9)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_attainment_vs_rate(left, *rate_view, target=target)
    plot_attainment_vs_slo_scale(right, *slo_view, target=target)
    left.set_title(title)
    right.set_title("at " + ", ".join(f"{b} {r:g} req/s/GPU" for b, r in fixed_rates.items()),
                    fontsize=9)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    return fig
