"""Plot for ``pdx bench transport``: GB/s vs segment size, pdx solid, baselines dashed."""

from __future__ import annotations

from typing import Any


def plot_transport(points: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    kinds = list(dict.fromkeys(p["transport"] for p in points))
    for i, kind in enumerate(kinds):
        rows = sorted((p for p in points if p["transport"] == kind), key=lambda p: p["segment_bytes"])
        x = [p["segment_bytes"] for p in rows]
        color = f"C{i}"
        ax.plot(x, [p["gbps"] for p in rows], "o-", color=color, label=f"pdx {kind}")
        ax.plot(x, [p["baseline_gbps"] for p in rows], "s--", color=color, alpha=0.7,
                label=f"{rows[0]['baseline']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment size (bytes)")
    ax.set_ylabel("GB/s")
    ax.set_title("pdx transports vs raw baselines (same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
