"""PNG plots for the CNN scaling sweep and the allreduce bus-bandwidth sweep (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless CI and workers: never ask for a display

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_busbw", "plot_scaling"]


def plot_scaling(records: Sequence[dict[str, Any]], model: str, path: str) -> None:
    """Images/sec and scaling efficiency against N for ``model``, one line per backend.

    ``records`` are sweep rows with keys backend, np, images_per_sec, efficiency.
    """
    rows = [r for r in records if r["model"] == model]
    fig, (ax_ips, ax_eff) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in sorted({r["backend"] for r in rows}):
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["np"])
        ns = [r["np"] for r in mine]
        ax_ips.plot(ns, [r["images_per_sec"] for r in mine], marker="o", label=backend)
        ax_eff.plot(ns, [r["efficiency"] for r in mine], marker="o", label=backend)
    if rows:
        top = max(r["np"] for r in rows)
        ax_eff.plot([1, top], [1, 1], color="grey", linestyle=":", label="linear")
        ticks = list(range(1, top + 1))
        ax_ips.set_xticks(ticks)
        ax_eff.set_xticks(ticks)
        first = rows[0]
        fig.suptitle(
            f"{model}: {first['image_size']} px, batch {first['batch_per_worker']}/worker, "
            f"{first['threads_per_worker']} TF thread(s)/worker"
        )
    ax_ips.set(xlabel="workers N", ylabel="images/sec (global)", title="throughput")
    ax_eff.set(xlabel="workers N", ylabel="E(N) = ips(N) / (N ips(1))", title="scaling efficiency")
    ax_eff.set_ylim(0, 1.1)
    for ax in (ax_ips, ax_eff):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_busbw(rows: Sequence[dict[str, Any]], path: str, title: str = "allreduce bus bandwidth") -> None:
    """Bus bandwidth (nccl-tests: algbw x 2(n-1)/n) against message size, one line per implementation.

    Rows with ``busbw_min_GBps``/``busbw_max_GBps`` get error bars spanning them.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in sorted({r["impl"] for r in rows}):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["bytes"])
        xs, ys = [r["bytes"] for r in mine], [r["busbw_GBps"] for r in mine]
        if all("busbw_min_GBps" in r for r in mine):
            err = [
                [y - r["busbw_min_GBps"] for y, r in zip(ys, mine, strict=True)],
                [r["busbw_max_GBps"] - y for y, r in zip(ys, mine, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=impl)
        else:
            ax.plot(xs, ys, marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="message size (bytes, float32)", ylabel="bus bandwidth (GB/s)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
