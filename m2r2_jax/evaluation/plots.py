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
            ax1.annotate(f"{r.get_height():.2f}", (r.get_x() + r.get_width() / 2, r.get_height()),
                         ha="center", va="bottom", fontsize=7)
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
    fig.suptitle(title or f"M2R2 self-speculative decoding: tree {c.get('tree')}, T={c.get('temperature')}, "
                 f"B={c.get('batch_size')}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_spec_eval(result: dict, path: str | Path, title: str | None = None) -> Path:
    p = Path(path)
    p.write_bytes(render_png(result, title))
    return p
