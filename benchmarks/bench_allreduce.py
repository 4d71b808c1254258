"""Allreduce of a ResNet-50 gradient set (161 float32 tensors, 25.6M parameters) over MPI.

Usage: ``python -m benchmarks.bench_allreduce [--np 2] [--steps 20] [--repeats 3] [--json out.json]``

Run outside MPI it starts itself under ``mpiexec -n NP``. Each row is timed for
``--steps`` steps (each step starts at a barrier and counts the slowest rank), and the
rows take turns, ``--repeats`` times over and in a new order each time, so load from
elsewhere hits them alike. A row's figure is the median of its repeats' medians; the
spread is the lowest and highest repeat median.

* ``raw_single``: one mpi4py ``Allreduce`` (in place, sum) of all the bytes at once;
* ``per_tensor_raw``: mpi4py ``Allreduce`` once per tensor (in place, sum);
* ``fused``: ``ringtrain.grouped_allreduce`` (Average), on its default path: shared
  memory when every rank is on one host, as here;
* ``fused_sum``: the same with ``op=Sum`` (what the raw rows compute);
* ``fused_one_shot`` / ``fused_two_step``: shared memory with one form forced: one
  barrier per step, each rank reducing whole steps straight into its outputs (the
  default with 2 ranks), or reduce-scatter/allgather, two barriers per step (the
  default with more ranks for steps over 64 KiB);
* ``fused_mpi`` / ``fused_mpi_sum``: the MPI path (shared memory off): large tensors
  straight from input to output, small ones in 16 MiB buckets, MPI on the
  communication thread one bucket ahead of packing and unpacking (pipelined);
* ``fused_mpi_serial``: the MPI path with every call in the caller (no pipelining,
  the default when a rank has fewer than two CPUs of its own);
* ``per_tensor``: ``ringtrain.allreduce`` once per tensor (a signature check each).

Bus bandwidth follows nccl-tests: busbw = algbw * 2(n-1)/n, algbw = bytes / time.
``breakdown`` splits the shared-memory path (from the native group's own clocks) and
the MPI path (its parts timed one by one).
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


def relaunch(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module argv`` under ``mpiexec -n nproc`` (the venv's mpiexec if there)."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    return subprocess.call([mpiexec, "-n", str(nproc), sys.executable, "-m", module, *argv])


def inside_mpi() -> bool:
    return any(v in os.environ for v in _INSIDE)


def timed(comm, fn: Callable[[], object], steps: int, warmup: int = 2) -> float:
    """Median seconds per call over ``steps`` calls, each the slowest rank's, after warm-up."""
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
    return float(np.median(times))


def summarize(samples: list[float], nbytes: int, size: int) -> dict[str, float]:
    med = float(np.median(samples))
    algbw = nbytes / med / 1e9
    return {
        "ms": med * 1e3,
        "min_ms": min(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
        "repeats_ms": [s * 1e3 for s in samples],
        "algbw_GBps": algbw,
        "busbw_GBps": algbw * 2 * (size - 1) / size,
    }


def _mpi_breakdown(comm, arrays: list[np.ndarray], steps: int) -> dict[str, float]:
    """Median ms of each part of the MPI path, timed one by one (no pipelining)."""
    from mpi4py import MPI

    from ringtrain import fusion
    from ringtrain.collectives import _engine
    from ringtrain.collectives._ops import Average
    from ringtrain.collectives._signature import Call, spec_of

    threshold = fusion.fusion_threshold()
    is_small = [a.nbytes < _engine.DIRECT_BYTES and a.nbytes <= threshold for a in arrays]
    small = [a for a, s in zip(arrays, is_small, strict=True) if s]
    large = [a for a, s in zip(arrays, is_small, strict=True) if not s]
    planned = fusion.plan_buckets([(a.dtype, a.nbytes) for a in small], threshold)
    buckets = [[small[i] for i in b] for b in planned]
    bufs = [np.empty(sum(a.size for a in b), np.float32) for b in buckets]
    outs = [np.empty_like(a) for a in large]
    out_small = [[np.empty_like(a) for a in b] for b in buckets]
    scale = 1.0 / comm.Get_size()

    def check() -> None:
        _engine.check(comm, Call("grouped_allreduce", Average.value, tuple(spec_of(a) for a in arrays)))

    def pack() -> None:
        for b, buf in zip(buckets, bufs, strict=True):
            fusion.pack(b, out=buf)

    def mpi_buckets() -> None:
        for buf in bufs:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def mpi_direct() -> None:
        for a, o in zip(large, outs, strict=True):
            comm.Allreduce(a, o, op=MPI.SUM)

    def scale_direct() -> None:
        for o in outs:
            fusion.scale_in_place(o, scale)

    def unpack() -> None:
        for b, buf, o in zip(buckets, bufs, out_small, strict=True):
            fusion.unpack(buf, b, scale=scale, out=o)

    parts = {
        "signature_check": check,
        "pack_small": pack,
        "mpi_small_buckets": mpi_buckets,
        "mpi_large_direct": mpi_direct,
        "scale_large_in_place": scale_direct,
        "unpack_small": unpack,
    }
    result = {name: timed(comm, fn, steps) * 1e3 for name, fn in parts.items()}
    result["tensors_direct"] = len(large)
    result["tensors_bucketed"] = len(small)
    result["buckets"] = len(buckets)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file (rank 0)")
    parser.add_argument("--np", type=int, default=2, help="processes when launching under mpiexec")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row and repeat (20)")
    parser.add_argument("--repeats", type=int, default=3, help="times every row is measured (3)")
    parser.add_argument("--rows", help="comma-separated subset of rows to run")
    parser.add_argument(
        "--thresholds",
        help="also time the MPI path with these bucket sizes, e.g. 1M,4M,16M,64M,128M "
        "(rows fused_mpi@SIZE; how RINGTRAIN_FUSION_THRESHOLD's default was chosen)",
    )
    args = parser.parse_args(argv)
    if not inside_mpi():
        return relaunch("benchmarks.bench_allreduce", sys.argv[1:] if argv is None else argv, args.np)

    from mpi4py import MPI

    import ringtrain.collectives as rc
    from ringtrain import fusion
    from ringtrain.collectives import _engine
    from ringtrain.worker import tune_malloc

    # What a ringtrain worker does at start; RINGTRAIN_MALLOC_REUSE=0 measures without it.
    malloc_reuse = tune_malloc()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(rank)
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in resnet50_gradient_shapes()]
    nbytes = sum(a.nbytes for a in arrays)
    flat = np.concatenate([a.ravel() for a in arrays])
    rc.grouped_allreduce(arrays)  # decides the path (shared memory or MPI) once, collectively
    host = _engine.host_group()

    def on_path(shm: bool, pipeline: bool, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            _engine._host, _engine.PIPELINE = (host if shm else None), pipeline
            try:
                return fn()
            finally:
                _engine._host, _engine.PIPELINE = host, None

        return run

    def per_tensor() -> None:
        for a in arrays:
            rc.allreduce(a)

    def per_tensor_raw() -> None:
        for a in arrays:
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    def fused(op=rc.Average) -> Callable[[], object]:
        return lambda: rc.grouped_allreduce(arrays, op=op)

    cases: dict[str, Callable[[], object]] = {
        "raw_single": lambda: comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM),
        "per_tensor_raw": per_tensor_raw,
        "fused": on_path(True, True, fused()),
        "fused_sum": on_path(True, True, fused(rc.Sum)),
        "fused_mpi": on_path(False, True, fused()),
        "fused_mpi_sum": on_path(False, True, fused(rc.Sum)),
        "fused_mpi_serial": on_path(False, False, fused()),
        "per_tensor": on_path(True, True, per_tensor),
    }
    if host is None:  # no shared memory here: the default path is MPI
        for name in ("fused", "fused_sum"):
            cases.pop(name)
    else:

        def forced(form: str) -> Callable[[], object]:
            def run() -> object:
                host.group.algorithm = form
                try:
                    return on_path(True, True, fused())()
                finally:
                    host.group.algorithm = "auto"

            return run

        cases["fused_one_shot"] = forced("one_shot")
        cases["fused_two_step"] = forced("two_step")
    if args.rows:
        wanted = args.rows.split(",")
        cases = {k: v for k, v in cases.items() if k in wanted}
    for size_text in args.thresholds.split(",") if args.thresholds else []:

        def with_threshold(text: str = size_text) -> object:
            saved = os.environ.get(fusion.THRESHOLD_ENV)
            os.environ[fusion.THRESHOLD_ENV] = text
            try:
                return on_path(False, True, fused())()
            finally:
                if saved is None:
                    del os.environ[fusion.THRESHOLD_ENV]
                else:
                    os.environ[fusion.THRESHOLD_ENV] = saved

        cases[f"fused_mpi@{size_text}"] = with_threshold
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        # A fresh order each repeat (the same on every rank): a row that always followed the
        # same other row measured up to 30 ms slower here, whatever it ran.
        order = list(cases)
        if repeat:
            np.random.default_rng(repeat).shuffle(order)
        for name in order:
            samples[name].append(timed(comm, cases[name], args.steps))
    rows = {name: summarize(s, nbytes, size) for name, s in samples.items()}

    breakdown: dict[str, dict[str, float]] = {}
    if host is not None:
        host.group.reset_stats()
        timed(comm, fused(), args.steps, warmup=0)
        stats = host.group.stats()
        calls = max(1, stats["calls"])
        breakdown["shm_per_call_ms"] = {
            k[:-2]: stats[k] / calls * 1e3 for k in ("pack_s", "wait_s", "reduce_s", "cross_s", "unpack_s")
        }
        breakdown["shm_per_call_ms"]["steps_per_call"] = stats["chunks"] / calls
    breakdown["mpi_path_ms"] = _mpi_breakdown(comm, arrays, args.steps)
    if rank != 0:
        return 0

    def ratio(a: str, b: str) -> float | None:
        return rows[a]["ms"] / rows[b]["ms"] if a in rows and b in rows else None

    result = {
        "processes": size,
        "tensors": len(arrays),
        "bytes": nbytes,
        "steps": args.steps,
        "repeats": args.repeats,
        "path": "shared memory" if host is not None else "MPI",
        "fusion_threshold": fusion.fusion_threshold(),
        "direct_bytes": _engine.DIRECT_BYTES,
        "shm_chunk": host.group.slot_bytes if host is not None else None,
        "fusion_impl": fusion.IMPLEMENTATION,
        "simd": fusion._native.simd_path() if fusion._native is not None else None,
        "malloc_reuse": malloc_reuse,
        "mpi": MPI.Get_library_version().splitlines()[0],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "rows": rows,
        "breakdown": breakdown,
        "ratios": {
            "fused / raw_single": ratio("fused", "raw_single"),
            "fused / per_tensor_raw": ratio("fused", "per_tensor_raw"),
            "fused_one_shot / fused_two_step": ratio("fused_one_shot", "fused_two_step"),
            "fused_sum / raw_single": ratio("fused_sum", "raw_single"),
            "fused_mpi / raw_single": ratio("fused_mpi", "raw_single"),
            "fused_mpi_sum / per_tensor_raw": ratio("fused_mpi_sum", "per_tensor_raw"),
            "fused_mpi / fused_mpi_serial": ratio("fused_mpi", "fused_mpi_serial"),
        },
    }
    print(
        f"{len(arrays)} tensors, {nbytes / 1e6:.1f} MB, {size} ranks, path: {result['path']}, "
        f"median of {args.repeats} x median of {args.steps} steps (spread: min..max of repeats); "
        f"load average {result['load_avg'][0]:.2f}"
    )
    for name, row in rows.items():
        print(
            f"{name:18s} {row['ms']:9.2f} ms  [{row['min_ms']:7.2f} .. {row['max_ms']:7.2f}]  "
            f"busbw {row['busbw_GBps']:5.2f} GB/s"
        )
    for section, parts in breakdown.items():
        print(f"  {section}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    for name, value in result["ratios"].items():
        if value is not None:
            print(f"  {name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
