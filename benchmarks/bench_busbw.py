"""Allreduce bus bandwidth against message size: ringtrain against mpi4py, as a plot.

Usage: ``python -m benchmarks.bench_busbw [--np 2] [--sizes 256K..256M] [--steps 20]
[--repeats 3] [--out benchmarks/figures]``

Run outside MPI it starts itself under ``mpiexec -n NP``. For each size (powers of 2
from LO to HI) three rows, taking turns so load from elsewhere hits them alike:

* ``mpi4py Allreduce``: one in-place ``Allreduce`` (sum) of a float32 buffer;
* ``ringtrain``: ``ringtrain.allreduce`` (Average) of one float32 tensor, on its default
  path (shared memory when every rank is on one host);
* ``ringtrain, MPI path``: the same with shared memory off.

Each figure is the median of ``--repeats`` medians of ``--steps`` steps (a step starts
at a barrier and counts the slowest rank); ``min``/``max`` are the extreme repeat
medians, drawn as error bars. Writes ``allreduce_busbw.json`` and ``allreduce_busbw.png``
to ``--out``. busbw = algbw * 2(n-1)/n (nccl-tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from benchmarks.bench_allreduce import inside_mpi, relaunch, timed

ROWS = ("mpi4py Allreduce", "ringtrain", "ringtrain, MPI path")


def parse_sizes(text: str) -> list[int]:
    """``"256K..256M"`` (powers of 2) or a comma list of byte counts with K/M/G suffixes."""
    from ringtrain.env import byte_size

    if ".." in text:
        lo, hi = (byte_size(t) for t in text.split(".."))
        sizes = []
        size = lo
        while size <= hi:
            sizes.append(size)
            size *= 2
        return sizes
    return [byte_size(t) for t in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--sizes", default="256K..256M")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    args = parser.parse_args(argv)
    if not inside_mpi():
        return relaunch("benchmarks.bench_busbw", sys.argv[1:] if argv is None else argv, args.np)

    from mpi4py import MPI

    import ringtrain.collectives as rc
    from ringtrain.collectives import _engine
    from ringtrain.worker import tune_malloc

    tune_malloc()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rc.allreduce(np.ones(1, np.float32))  # decides the path, collectively
    host = _engine.host_group()
    rows = []
    for nbytes in parse_sizes(args.sizes):
        x = np.random.default_rng(rank).standard_normal(nbytes // 4, dtype=np.float32)
        raw = x.copy()

        def ringtrain_on(shm: bool, x: np.ndarray = x) -> object:
            _engine._host = host if shm else None
            try:
                return rc.allreduce(x)
            finally:
                _engine._host = host

        cases = {
            ROWS[0]: lambda raw=raw: comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM),
            ROWS[1]: lambda: ringtrain_on(True),
            ROWS[2]: lambda: ringtrain_on(False),
        }
        samples: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                samples[name].append(timed(comm, fn, args.steps))
        for name, s in samples.items():
            med = float(np.median(s))
            bus = 2 * (size - 1) / size / 1e9
            rows.append(
                {
                    "impl": name,
                    "bytes": nbytes,
                    "np": size,
                    "time_s": med,
                    "busbw_GBps": nbytes / med * bus,
                    "busbw_min_GBps": nbytes / max(s) * bus,
                    "busbw_max_GBps": nbytes / min(s) * bus,
                }
            )
        if rank == 0:
            line = "  ".join(
                f"{r['impl']} {r['busbw_GBps']:.2f} [{r['busbw_min_GBps']:.2f}..{r['busbw_max_GBps']:.2f}]"
                for r in rows[-3:]
            )
            print(f"{nbytes >> 10:8d} KiB  {line}  GB/s", flush=True)
    if rank != 0:
        return 0
    from benchmarks.plots import plot_busbw

    os.makedirs(args.out, exist_ok=True)
    meta = {
        "np": size,
        "steps": args.steps,
        "repeats": args.repeats,
        "default_path": "shared memory" if host is not None else "MPI",
        "mpi": MPI.Get_library_version().splitlines()[0],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    with open(os.path.join(args.out, "allreduce_busbw.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    png = os.path.join(args.out, "allreduce_busbw.png")
    plot_busbw(rows, png, title=f"allreduce of one float32 tensor, {size} ranks, one host")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
