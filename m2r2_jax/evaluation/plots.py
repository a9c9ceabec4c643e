"""One PNG for a `run_spec_eval` result: (a) speed-up and tau per category (bars),
(b) acceptance rate by draft-tree depth (line). Matplotlib's Agg canvas, no pyplot state."""

from __future__ import annotations

import io
from pathlib import Path


def render_png(result: dict, title: str | None = None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cats = list(result.get("per_category", {}))
    pc = result.get("per_category", {})
    labels = cats + ["overall"]
    speed = [pc[c].get("speedup") or 0.0 for c in cats] + [result.get("overall_speedup") or 0.0]
    tau = [pc[c].get("tau") or 0.0 for c in cats] + [result.get("tau") or 0.0]

    fig = Figure(figsize=(max(8.0, 4.0 + 0.9 * len(labels)), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(2, len(labels)), 2]})

    x = list(range(len(labels)))
    w = 0.4
    b1 = ax1.bar([i - w / 2 for i in x], speed, w, label="speed-up vs AR", color="#3b75af")
    b2 = ax1.bar([i + w / 2 for i in x], tau, w, label="tau (tokens / step)", color="#ef8636")
    for bars in (b1, b2):
        for r in bars:
            ax1.annotate(
                f"{r.get_height():.2f}",
                (r.get_x() + r.get_width() / 2, r.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax1.set_title("(a) speed-up and tau per category", fontsize=10)
    ax1.legend(fontsize=8, loc="upper left")
    ax1.set_ylim(0, max(speed + tau + [1.0]) * 1.2)

    da = result.get("depth_acceptance", [])
    ds = [d["depth"] for d in da]
    rate = [d["rate"] if d["rate"] is not None else float("nan") for d in da]
    ax2.plot(ds, rate, marker="o", color="#519e3e")
    for d, r in zip(ds, rate):
        ax2.annotate(f"{r:.2f}", (d, r), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax2.set_xticks(ds)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("tree depth d")
    ax2.set_ylabel("P(accepted length >= d)")
    ax2.set_title("(b) acceptance by tree depth", fontsize=10)
    ax2.grid(alpha=0.3)

    c = result.get("config", {})
    fig.suptitle(
        title
        or f"M2R2 self-speculative decoding: tree {c.get('tree')}, T={c.get('temperature')}, B={c.get('batch_size')}",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_spec_eval(result: dict, path: str | Path, title: str | None = None) -> Path:
    p = Path(path)
    p.write_bytes(render_png(result, title))
    return p


def render_train_curves(rows: list[dict], title: str | None = None, smooth: int = 10) -> bytes:
    """Training metrics (train.train's metrics.jsonl rows): loss terms, agreement (final fast layer,
    full vocabulary) and per-layer agreement, each as a moving average over `smooth` steps."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in rows])

    def ma(key):
        v = np.array([float(r.get(key, np.nan)) for r in rows])
        k = max(1, min(smooth, len(v)))
        return np.convolve(v, np.ones(k) / k, mode="valid"), steps[k - 1 :]

    fig = Figure(figsize=(12, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    a1, a2, a3 = fig.subplots(1, 3)
    for key in ("loss", "kd", "align", "router_bce"):
        if key in rows[0]:
            y, x = ma(key)
            a1.plot(x, y, label=key)
    a1.set_yscale("log"), a1.set_xlabel("step"), a1.legend(fontsize=8), a1.set_title("losses")
    y, x = ma("agreement")
    a2.plot(x, y, color="#3b75af")
    a2.set_xlabel("step"), a2.set_ylim(0, 1), a2.set_title("final fast layer agreement (train batches)")
    layers = sorted(k for k in rows[0] if k.startswith("agreement_per_layer/"))
    for k in layers:
        y, x = ma(k)
        a3.plot(x, y, label=k.split("/")[-1])
    a3.set_xlabel("step"), a3.set_ylim(0, 1), a3.set_title("agreement per fast layer (draft vocab)")
    a3.legend(fontsize=6, ncol=2, title="layer (0-based)", title_fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_train_comparison(runs: dict[str, list[dict]], title: str | None = None, smooth: int = 10) -> bytes:
    """Several runs' training metrics on the same axes (label -> metrics.jsonl rows): the final fast
    layer's agreement and the KD loss against the step, each as a moving average over `smooth` steps."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    for label, rows in runs.items():
        steps = np.array([r["step"] for r in rows])
        for ax, key in ((a1, "agreement"), (a2, "kd")):
            v = np.array([float(r.get(key, np.nan)) for r in rows])
            k = max(1, min(smooth, len(v)))
            ax.plot(steps[k - 1 :], np.convolve(v, np.ones(k) / k, mode="valid"), label=label)
    a1.set_xlabel("step"), a1.set_ylim(0, 1), a1.set_title("final fast layer agreement (train batches)")
    a2.set_xlabel("step"), a2.set_yscale("log"), a2.set_title("KD loss")
    a1.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
