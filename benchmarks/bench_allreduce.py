"""Allreduce of a ResNet-50 gradient set (161 float32 tensors, 25.6M parameters) over MPI.

Usage: ``python -m benchmarks.bench_allreduce [--json out.json] [--np 2] [--steps 10]``

Run outside MPI it starts itself under ``mpiexec -n NP``. Rows, time per step
(median over steps; each step's time is the slowest rank's, steps start at a barrier):

* ``per_tensor``: ``ringtrain.allreduce`` once per tensor (signature check each time);
* ``per_tensor_raw``: mpi4py ``Allreduce`` once per tensor, no ringtrain;
* ``fused``: ``ringtrain.grouped_allreduce`` (pack, one Allreduce per bucket, unpack with 1/n);
* ``raw_single``: one mpi4py ``Allreduce`` (in place) of the same total bytes.

Bus bandwidth follows nccl-tests: busbw = algbw * 2(n-1)/n, algbw = bytes / time.
The ``fused_breakdown`` section times the fused path's parts one by one on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from benchmarks.shapes import resnet50_gradient_shapes

_INSIDE = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")


def _relaunch(argv: list[str], nproc: int) -> int:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    cmd = [mpiexec, "-n", str(nproc), sys.executable, "-m", "benchmarks.bench_allreduce", *argv]
    return subprocess.call(cmd)


def _timed(comm, fn: Callable[[], object], steps: int, warmup: int = 2) -> list[float]:
    from mpi4py import MPI

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(comm.allreduce(elapsed, op=MPI.MAX))
    return times


def _breakdown(comm, arrays: list[np.ndarray], steps: int) -> dict[str, float]:
    """Median seconds of each part of the fused path, timed separately (all ranks run them)."""
    from ringtrain import fusion
    from ringtrain.collectives import _engine
    from ringtrain.collectives._ops import Average
    from ringtrain.collectives._signature import Call, spec_of

    total = sum(a.size for a in arrays)
    buf = np.empty(total, np.float32)
    outs = [np.empty_like(a) for a in arrays]
    scale = 1.0 / comm.Get_size()

    def check() -> None:
        _engine.check(comm, Call("grouped_allreduce", Average.value, tuple(spec_of(a) for a in arrays)))

    parts = {
        "signature_check": check,
        "plan_buckets": lambda: fusion.plan_buckets([(a.dtype, a.nbytes) for a in arrays], 128 << 20),
        "pack_reused_buffer": lambda: fusion.pack(arrays, out=buf),
        "unpack_fresh_outputs": lambda: fusion.unpack(buf, arrays, scale=scale),
        "unpack_reused_outputs": lambda: fusion.unpack(buf, arrays, scale=scale, out=outs),
    }
    return {name: float(np.median(_timed(comm, fn, steps))) for name, fn in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file (rank 0)")
    parser.add_argument("--np", type=int, default=2, help="processes when launching under mpiexec")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if not any(v in os.environ for v in _INSIDE):
        return _relaunch(sys.argv[1:] if argv is None else argv, args.np)

    from mpi4py import MPI

    import ringtrain.collectives as rc
    from ringtrain import fusion
    from ringtrain.worker import tune_malloc

    # What a ringtrain worker does at start; RINGTRAIN_MALLOC_REUSE=0 measures without it.
    malloc_reuse = tune_malloc()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(rank)
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in resnet50_gradient_shapes()]
    nbytes = sum(a.nbytes for a in arrays)
    flat = np.concatenate([a.ravel() for a in arrays])

    def per_tensor() -> None:
        for a in arrays:
            rc.allreduce(a)

    def per_tensor_raw() -> None:
        for a in arrays:
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    cases = {
        "per_tensor": per_tensor,
        "per_tensor_raw": per_tensor_raw,
        "fused": lambda: rc.grouped_allreduce(arrays),
        "raw_single": lambda: comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM),
    }
    rows = {}
    for name, fn in cases.items():
        med = float(np.median(_timed(comm, fn, args.steps)))
        algbw = nbytes / med / 1e9
        rows[name] = {"ms": med * 1e3, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (size - 1) / size}
    # MPICH's shared-memory Allreduce slows sharply above ~16 MiB messages on small hosts:
    # show the fused path with 16 MiB buckets too (7 Allreduce calls instead of 1).
    os.environ[fusion.THRESHOLD_ENV] = "16M"
    for name, fn in (("fused_16MiB", cases["fused"]),):
        med = float(np.median(_timed(comm, fn, args.steps)))
        algbw = nbytes / med / 1e9
        rows[name] = {"ms": med * 1e3, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (size - 1) / size}
    del os.environ[fusion.THRESHOLD_ENV]
    breakdown = {k: v * 1e3 for k, v in _breakdown(comm, arrays, args.steps).items()}
    if rank != 0:
        return 0
    result = {
        "processes": size,
        "tensors": len(arrays),
        "bytes": nbytes,
        "fusion_threshold": fusion.fusion_threshold(),
        "malloc_reuse": malloc_reuse,
        "fusion_impl": fusion.IMPLEMENTATION,
        "mpi": MPI.Get_library_version().splitlines()[0],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "rows": rows,
        "fused_breakdown_ms": breakdown,
        "speedup_fused_vs_per_tensor": rows["per_tensor"]["ms"] / rows["fused"]["ms"],
        "fused_overhead_vs_raw_single": rows["fused"]["ms"] / rows["raw_single"]["ms"] - 1,
    }
    for name, row in rows.items():
        print(
            f"{name:18s} {row['ms']:9.2f} ms  algbw {row['algbw_GBps']:.2f} GB/s  "
            f"busbw {row['busbw_GBps']:.2f} GB/s"
        )
    for name, ms in breakdown.items():
        print(f"  {name:22s} {ms:8.3f} ms")
    print(
        f"fused vs per-tensor: {result['speedup_fused_vs_per_tensor']:.2f}x faster; "
        f"fused vs raw single Allreduce: {100 * result['fused_overhead_vs_raw_single']:+.1f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
