"""PNG plots of an `UpdateReport` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fastopd._io import save_figure_atomic

__all__ = ["PLOT_FILES", "make_plots"]

PLOT_FILES = ("sparsity_by_layer.png", "density_by_kind.png", "singular_energy.png", "enrichment_by_magnitude.png")


def make_plots(report, out_dir: str | Path) -> list[Path]:
    """Write sparsity_by_layer.png, density_by_kind.png, singular_energy.png and enrichment_by_magnitude.png.

    Returns the files written; without matplotlib, warns and writes nothing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written (pip install matplotlib)", stacklevel=2)
        return []
    out = Path(out_dir)
    written = []
    kinds = sorted({t["module_kind"] for t in report.tensors.values()})
    colors = {k: plt.get_cmap("tab20")(i % 20) for i, k in enumerate(kinds)}

    # 1. density by layer, one line per module kind
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in kinds:
        pts = sorted((t["layer"], t["density_exact"]) for t in report.tensors.values()
                     if t["module_kind"] == k and t["layer"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], "o-", ms=3, label=k, color=colors[k])
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of coordinates changed (bitwise)")
    ax.set_title("Update density by layer and module kind")
    _legend_or_note(ax, "no tensor with a layer index")
    written.append(_save(fig, out / "sparsity_by_layer.png"))

    # 2. by module kind: density, and shares of parameters / updated coordinates / energy
    bk = report.by_kind
    names = sorted(bk)
    x = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a1.bar(x, [bk[n]["density_exact"] or 0 for n in names], color=[colors.get(n, "gray") for n in names])
    a1.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    a1.set_ylabel("fraction changed")
    a1.set_title("Density by module kind")
    w = 0.27
    for i, (key, lab) in enumerate([("share_params", "parameters"), ("share_updated", "changed coords"),
                                    ("share_energy", "update energy")]):
        a2.bar(x + (i - 1) * w, [bk[n][key] or 0 for n in names], w, label=lab)
    a2.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    a2.set_ylabel("share of total")
    a2.set_title("Shares by module kind")
    a2.legend(fontsize=8)
    written.append(_save(fig, out / "density_by_kind.png"))

    # 3. cumulative singular energy of Delta vs the fraction of singular directions
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for name, spec in report.spectra.items():
        s = spec.get("delta")
        if s is None or not np.any(s):
            continue
        k = report.tensors[name]["module_kind"]
        cum = np.cumsum(s ** 2) / np.sum(s ** 2)
        frac = np.arange(1, len(s) + 1) / len(s)
        ax.plot(frac, cum, color=colors[k], lw=0.8, alpha=0.6, label=None if k in seen else k)
        seen.add(k)
        if "null_shuffled" in spec and np.any(spec["null_shuffled"]):
            sn = spec["null_shuffled"]
            ax.plot(frac, np.cumsum(sn ** 2) / np.sum(sn ** 2), color="black", lw=0.6, ls="--", alpha=0.5,
                    label=None if "shuffled" in seen else "shuffled null")
            seen.add("shuffled")
    ax.set_xscale("log")
    ax.set_xlabel("top-k singular directions / min(m, n)")
    ax.set_ylabel("fraction of ||Delta||_F^2")
    ax.set_title("Singular energy of the update")
    _legend_or_note(ax, "no 2-D tensor changed: no spectrum to show")
    written.append(_save(fig, out / "singular_energy.png"))

    # 4. enrichment by magnitude decile of |base| (median over tensors), observed and null models
    fig, ax = plt.subplots(figsize=(8, 4.5))
    deciles = np.arange(1, 11)

    def med(rows):
        """Per decile, the median over the tensors that define it; NaN (a gap in the line) where none does: a
        constant base (norms at 1.0, zero biases) puts every coordinate in one decile, and np.nanmedian would warn
        about an all-NaN column."""
        if not rows:
            return None
        cols = [[v for v in col if v is not None] for col in zip(*rows)]
        return np.array([np.median(c) if c else np.nan for c in cols], dtype=float)

    for k in kinds:
        rows = [t["enrichment_by_decile"] for t in report.tensors.values()
                if t["module_kind"] == k and any(v is not None for v in t["enrichment_by_decile"])]
        m = med(rows)
        if m is not None:
            ax.plot(deciles, m, "o-", ms=3, color=colors[k], label=k)
    for which, style in (("rounding", ":"), ("shuffled", "--")):
        rows = [t["null"][which]["enrichment_by_decile"] for t in report.tensors.values()
                if t.get("null") and any(v is not None for v in t["null"][which]["enrichment_by_decile"])]
        m = med(rows)
        if m is not None:
            ax.plot(deciles, m, style, color="black", label=f"{which} null")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xlabel("decile of |base| (1 = smallest)")
    ax.set_ylabel("P(changed | decile) / P(changed)")
    ax.set_title("Where the update falls, by base-weight magnitude")
    _legend_or_note(ax, "no coordinate changed")
    written.append(_save(fig, out / "enrichment_by_magnitude.png"))
    return written


def _legend_or_note(ax, note: str) -> None:
    """The legend of the lines drawn, or, when none was (an unchanged checkpoint pair, no layered tensor), `note` in
    the middle of the empty axes (a legend of nothing would warn and an empty frame would say nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    save_figure_atomic(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
