"""Small figures and tables for the notebooks.

Every plotting function builds its figure with ``pyplot`` (so Jupyter's inline backend shows
it once at the end of the cell; assign the result, ``fig = plots.f(...)``, to avoid a second
copy) and returns it. Figures are small (``figsize`` at most (7, 4), 80 dpi) so executed
notebooks stay small on disk and in diffs.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

DPI = 80


def _fig(figsize=(6.0, 3.5), ncols: int = 1):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=figsize, dpi=DPI, layout="constrained")
    return fig, ax


# ------------------------------------------------------------------------------ tables

def _num(v: float) -> str:
    """3 significant digits, but never an exponent for numbers a reader reads as counts."""
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence], fmt: str | None = None) -> str:
    """A Markdown table; floats go through ``fmt`` (default: 3 significant digits, no
    exponent below a million), None shows as a dash.

    Notebooks wrap it in ``IPython.display.Markdown`` so that every number a reader sees
    in a table was computed in the notebook, not typed.
    """
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, (float, np.floating)):
            return fmt.format(float(v)) if fmt else _num(float(v))
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------- notebook 00 / 01

def seed_scaling(rows):
    """The seed's decode speed against GPU count: one panel per model, colour = GPU,
    solid = 4-bit, dashed = fp16."""
    fig, axes = _fig((7.0, 3.2), ncols=2)
    models = sorted({r.model for r in rows}, reverse=True)
    gpu_color = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(r.gpu for r in rows))}
    for ax, model in zip(axes, models):
        series: dict[tuple, list] = {}
        for r in rows:
            if r.model == model:
                series.setdefault((r.precision, r.gpu), []).append((r.num_gpus, r.tok_per_s))
        for (prec, gpu), pts in series.items():
            pts.sort()
            q4 = prec.startswith("q4")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if q4 else "--s", ms=4,
                    color=gpu_color[gpu], label=f"{gpu} {'4-bit' if q4 else 'fp16'}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 4, 8], ["2", "4", "8"])
        ax.set_xlim(1.7, 9.5)
        ax.set_ylim(0, None)
        ax.set_xlabel("GPUs (tensor parallel)")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode tok/s (batch 1)")
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = sorted(handles, key=lambda lab: (lab.endswith("fp16"), lab))
    fig.legend([handles[lab] for lab in labels], labels, fontsize=7, loc="outside right upper")
    return fig


def roofline(machines: dict[str, tuple[float, float]], kernels: dict[str, float]):
    """Attainable FLOP/s against arithmetic intensity (FLOPs per byte), log-log.

    ``machines``: name -> (peak GFLOP/s, bandwidth GB/s); ``kernels``: name -> FLOPs/byte,
    drawn as vertical lines. A kernel left of a machine's ridge point (peak / bandwidth)
    runs at bandwidth x intensity, whatever the peak.
    """
    fig, ax = _fig((6.5, 3.6))
    x = np.logspace(-1, 3.5, 200)
    for name, (peak, bw) in machines.items():
        line, = ax.plot(x, np.minimum(peak, bw * x), label=f"{name} (ridge {peak / bw:.0f})")
        ax.plot([peak / bw], [peak], "o", color=line.get_color(), ms=4)
    for name, ai in kernels.items():
        ax.axvline(ai, color="gray", ls=":", lw=1)
        ax.text(ai * 1.1, 0.97, name, rotation=90, fontsize=7, va="top",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / byte)")
    ax.set_ylabel("attainable GFLOP/s")
    ax.set_title("Roofline: below the ridge, bandwidth decides")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def bandwidth_fit(nbytes: Sequence[float], seconds: Sequence[float], fit,
                  copy_GBps: float | None = None):
    """Measured kernel times against bytes moved, the fitted line, and the copy bandwidth."""
    fig, ax = _fig((6.0, 3.5))
    mb = np.asarray(nbytes) / 1e6
    ms = np.asarray(seconds) * 1e3
    ax.plot(mb, ms, "o", label="NumPy GEMV (median)")
    xs = np.linspace(0, mb.max() * 1.05, 50)
    ax.plot(xs, fit.predict(xs * 1e6) * 1e3, "-",
            label=f"fit: {fit.bandwidth_GBps:.1f} GB/s, R²={fit.r2:.4f}")
    if copy_GBps:
        ax.plot(xs, xs * 1e6 / (copy_GBps * 1e9) * 1e3, "--",
                label=f"bytes / copy bandwidth ({copy_GBps:.1f} GB/s)")
    ax.set_xlabel("bytes read (MB)")
    ax.set_ylabel("time (ms)")
    ax.set_title("GEMV time grows with bytes, not with FLOPs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def fraction_of_ceiling(rows: Sequence[dict]):
    """Grouped bars: each seed result as a fraction of its bandwidth ceiling (rows from
    ``hardware.seed_vs_ceiling``); one group per setup, one bar per GPU count."""
    fig, ax = _fig((7.0, 3.4))
    setups = list(dict.fromkeys((r["model"], r["precision"], r["gpu"]) for r in rows))
    counts = sorted({r["num_gpus"] for r in rows})
    width = 0.8 / len(counts)
    for j, n in enumerate(counts):
        xs, ys = [], []
        for i, s in enumerate(setups):
            for r in rows:
                if (r["model"], r["precision"], r["gpu"]) == s and r["num_gpus"] == n:
                    xs.append(i + (j - (len(counts) - 1) / 2) * width)
                    ys.append(r["fraction"])
        ax.bar(xs, ys, width, color=f"C{j}", label=f"{n} GPU{'s' if n > 1 else ''}")
    labels = [f"{m.split('-')[-1]} {p}\n{g}" for m, p, g in setups]
    ax.set_xticks(range(len(setups)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("measured / ceiling")
    ax.set_ylim(0, 1)
    ax.set_title("Seed results as a fraction of the bandwidth ceiling", fontsize=10)
    ax.legend(fontsize=7, ncol=len(counts))
    ax.grid(alpha=0.3, axis="y")
    return fig


# ----------------------------------------------------------------------- notebook 02

def quantization_grid(w: np.ndarray, scale: float, zero: int = 7):
    """One group of weights (dots), the 4-bit grid ``(q - zero) * scale`` (lines) and each
    weight's rounded value (crosses): rounding moves a weight at most half a step."""
    fig, ax = _fig((6.5, 3.2))
    w = np.asarray(w, dtype=np.float32)
    levels = (np.arange(15) - zero) * scale
    for v in levels:
        ax.axhline(v, color="0.85", lw=0.8, zorder=0)
    q = np.clip(np.round(w / scale) + zero, 0, 14)
    w_hat = (q - zero) * scale
    idx = np.arange(len(w))
    ax.vlines(idx, w, w_hat, color="C3", lw=1)
    ax.plot(idx, w, "o", ms=4, label="w (float32)")
    ax.plot(idx, w_hat, "x", ms=5, color="C3", label="ŵ = (q − 7) · scale")
    ax.set_xlabel("position in the group")
    ax.set_ylabel("value")
    ax.set_title(f"One group of {len(w)}: 15 levels, step = scale = {scale:.4g}")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def nibble_packing(q: Sequence[int], word: int):
    """Eight 4-bit values (top, memory order) and the uint32 they pack into (bottom, bit
    31 on the left): element j lands in bits 4j..4j+3, so element 0 is the lowest nibble."""
    from matplotlib.patches import Rectangle

    fig, ax = _fig((7.0, 3.0))
    for j, v in enumerate(q):
        ax.add_patch(Rectangle((j, 2), 0.9, 0.8, fc="#cfe3f5", ec="k"))
        ax.text(j + 0.45, 2.4, f"q[{j}]={v}", ha="center", va="center", fontsize=8)
        nib = 7 - j  # drawing position of nibble j, bit 31 on the left
        ax.add_patch(Rectangle((nib, 0), 0.9, 0.8, fc="#f5dfcf", ec="k"))
        ax.text(nib + 0.45, 0.5, f"{(word >> (4 * j)) & 0xF:X}", ha="center", va="center",
                fontsize=11, family="monospace")
        ax.text(nib + 0.45, 0.15, f"bits {4 * j + 3}..{4 * j}", ha="center", va="center",
                fontsize=6)
        ax.annotate("", xy=(nib + 0.45, 0.82), xytext=(j + 0.45, 1.98),
                    arrowprops=dict(arrowstyle="->", color="0.4", lw=0.8))
    ax.text(-0.1, 2.4, "values", ha="right", va="center", fontsize=8)
    ax.text(-0.1, 0.4, "uint32", ha="right", va="center", fontsize=8)
    ax.set_xlim(-1.2, 8)
    ax.set_ylim(-0.1, 3.1)
    ax.axis("off")
    ax.set_title(f"pack_nibbles: 8 values -> one word 0x{word:08X}", fontsize=10)
    return fig


def error_histogram(errors: dict[str, np.ndarray], bins: int = 60, xlabel: str = "error"):
    """Overlaid histograms (density) of quantization errors, one per label."""
    fig, ax = _fig((6.0, 3.2))
    lo = min(float(np.min(e)) for e in errors.values())
    hi = max(float(np.max(e)) for e in errors.values())
    edges = np.linspace(lo, hi, bins + 1)
    for name, e in errors.items():
        ax.hist(np.ravel(e), bins=edges, density=True, histtype="step", lw=1.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
