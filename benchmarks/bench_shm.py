"""Variants of the shared-memory allreduce side by side, without MPI: form, step size, spin, stores.

Usage: ``python -m benchmarks.bench_shm [--np 2] [--variants one_shot,two_step] [--steps 1M,4M]
[--reps 12] [--json out.json]``

The ResNet-50 gradient set (161 float32 tensors, 102 MB) is averaged by NP processes on
this host through the native group (``ringtrain.fusion._native.ShmGroup``), each variant
once per round, rounds repeated ``--reps`` times, so load from elsewhere hits all alike.
A variant is ``FORM[@SPIN_US][:nostream]``: FORM is ``one_shot``, ``two_step`` or
``auto``; SPIN_US the microseconds a waiting rank spins before it sleeps (default: what
ringtrain picks here, 50 with two CPUs per rank to spare, else 5);
``:nostream`` turns the non-temporal stores off. Per variant and step size it prints the
median [min..max] over rounds of rank 0's wall time per call, its own work (pack +
reduce + copy-out, from the group's clocks) and its time waiting at barriers. Work is the
figure that transfers to a machine with idle cores; waits depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import sys
import time
from typing import Any

import numpy as np

from benchmarks.shapes import resnet50_gradient_shapes


def default_spin_us(size: int) -> int:
    """The spin ringtrain chooses for ``size`` ranks on this host (collectives._engine._setup)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 50 if cpus >= 2 * size else 5


def _variant(group: Any, text: str) -> None:
    form, _, stores = text.partition(":")
    form, _, spin = form.partition("@")
    group.algorithm = form
    group.spin_us = int(spin) if spin else default_spin_us(group.size)
    group.streaming = stores != "nostream"


def _run(group: Any, rank: int, size: int, variants: list[str], reps: int) -> dict[str, list[list[float]]]:
    rng = np.random.default_rng(rank)
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in resnet50_gradient_shapes()]
    outs = [np.empty_like(a) for a in arrays]
    scale = 1.0 / size
    group.allreduce(arrays, outs, "f4", "sum", "", scale, 1)  # warm-up: page in the outputs
    rows: dict[str, list[list[float]]] = {v: [] for v in variants}
    for _ in range(reps):
        for v in variants:
            _variant(group, v)
            group.reset_stats()
            start = time.perf_counter()
            group.allreduce(arrays, outs, "f4", "sum", "", scale, 1)
            wall = time.perf_counter() - start
            s = group.stats()
            rows[v].append([wall, s["pack_s"] + s["reduce_s"] + s["unpack_s"], s["wait_s"]])
    return rows


def _peer(name: str, rank: int, size: int, step: int, variants: list[str], reps: int, ready: Any) -> None:
    from ringtrain.fusion import _native

    group = _native.ShmGroup(name, False, rank, size, step)
    ready.put(rank)
    _run(group, rank, size, variants, reps)


def measure(size: int, step: int, variants: list[str], reps: int) -> dict[str, list[list[float]]]:
    """Rank 0 here, the others forked; returns rank 0's [wall, work, wait] seconds per round."""
    from ringtrain.fusion import _native

    name = f"/ringtrain-{os.getpid()}-{secrets.token_hex(6)}"
    group = _native.ShmGroup(name, True, 0, size, step)
    ctx = mp.get_context("fork")
    ready = ctx.Queue()
    peers = [
        ctx.Process(target=_peer, args=(name, r, size, step, variants, reps, ready)) for r in range(1, size)
    ]
    try:
        for p in peers:
            p.start()
        for _ in peers:
            ready.get(timeout=60)
    finally:
        group.unlink()
    try:
        return _run(group, 0, size, variants, reps)
    finally:
        for p in peers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        group.close()


def main(argv: list[str] | None = None) -> int:
    from ringtrain.env import byte_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--variants", default="one_shot,two_step")
    parser.add_argument("--steps", default="1M,4M", help="bytes per rank per step, comma-separated")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    report: dict[str, Any] = {"np": args.np, "reps": args.reps, "load_avg_start": os.getloadavg(), "rows": []}
    print(
        f"{args.np} processes, ResNet-50 set (102.2 MB), median [min..max] of {args.reps} rounds, rank 0, ms"
    )
    for step_text in args.steps.split(","):
        step = byte_size(step_text)
        rows = measure(args.np, step, variants, args.reps)
        for v, samples in rows.items():
            a = np.array(samples) * 1e3
            med = np.median(a, axis=0)
            report["rows"].append(
                {
                    "step": step_text,
                    "variant": v,
                    "wall_ms": med[0],
                    "work_ms": med[1],
                    "wait_ms": med[2],
                    "wall_range_ms": [a[:, 0].min(), a[:, 0].max()],
                    "work_range_ms": [a[:, 1].min(), a[:, 1].max()],
                }
            )
            lo, hi = a.min(axis=0), a.max(axis=0)
            print(
                f"step {step_text:>5s} {v:22s} wall {med[0]:6.1f} [{lo[0]:6.1f}..{hi[0]:6.1f}]  "
                f"work {med[1]:6.1f} [{lo[1]:5.1f}..{hi[1]:5.1f}]  wait {med[2]:6.1f}",
                flush=True,
            )
    report["load_avg_end"] = os.getloadavg()
    print(f"load average {report['load_avg_start'][0]:.2f} at start, {report['load_avg_end'][0]:.2f} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
