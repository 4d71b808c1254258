"""Scaling sweep: CNN throughput for N = 1..max on each backend, efficiency, bus bandwidth, plots.

Usage::

    python -m benchmarks.sweep --models inception1,vgg16 --backends tf,mpi --max-np 2 --threads 1 \\
        [--batch-size 16 | inception1:16,vgg16:4] [--image-size 112 | inception1:112,vgg16:64] \\
        [--steps 10] [--warmup 2] [--repeats 1] [--out DIR] [--no-busbw] [--plot-only] [--quick]

Every worker gets the same ``--threads`` TF threads, so N workers use N x threads cores.
E(N) = images/sec(N) / (N x images/sec(1)). With ``--repeats R`` every point is run R
times, the N = 1..max runs of one repeat back to back, so slow drifts in load hit them
alike; images/sec is the median over repeats, E(N) the median of the repeats' own
E(N) (repeat i of N against repeat i of 1), and ``efficiency_min``/``_max`` give the
spread. Outputs in ``--out``: ``cnn.jsonl`` (one
record per run, see benchmarks.cnn), ``busbw.json``, ``summary.json`` and the PNGs
``scaling_<model>.png`` and ``busbw.png``. The bus-bandwidth sweep times 2-worker
allreduces of one float32 buffer per size: ringtrain's fused ``grouped_allreduce`` and
raw mpi4py ``Allreduce`` under ``backend="mpi"``, and MultiWorkerMirroredStrategy's
collective all-reduce (RING over gRPC on CPU) under ``backend="tf"``.
``--quick`` is the CI smoke: tiny Inception runs on the mpi backend, small messages,
and checks that every output is well formed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

from benchmarks import cnn

__all__ = ["busbw_sweep", "efficiencies", "main"]

_DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_MB = 1 << 20


# ------------------------------------------------------------------ bus bandwidth (worker side)


def _busbw_row(impl: str, nbytes: int, seconds: float, size: int) -> dict[str, Any]:
    algbw = nbytes / seconds / 1e9
    return {
        "impl": impl,
        "bytes": nbytes,
        "np": size,
        "time_s": seconds,
        "algbw_GBps": algbw,
        "busbw_GBps": algbw * 2 * (size - 1) / size,
    }


def _mpi_busbw(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    import numpy as np

    import ringtrain
    from ringtrain.backends.mpi import mpi_module, world

    MPI = mpi_module()
    comm = world()
    size = comm.Get_size()

    def timed(fn: Any) -> float:
        fn()  # warm: buffers, MPI's shared-memory windows
        samples = []
        for _ in range(reps):
            comm.Barrier()
            start = time.perf_counter()
            fn()
            # A step lasts as long as its slowest rank.
            samples.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        return float(np.median(samples))

    rows = []
    for nbytes in sizes:
        data = np.ones(nbytes // 4, np.float32)
        fused = timed(lambda data=data: ringtrain.grouped_allreduce([data]))
        raw = timed(lambda data=data: comm.Allreduce(MPI.IN_PLACE, data, op=MPI.SUM))
        rows.append(_busbw_row("ringtrain mpi fused", nbytes, fused, size))
        rows.append(_busbw_row("mpi4py Allreduce", nbytes, raw, size))
    return rows


def _tf_busbw(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    import numpy as np
    import tensorflow as tf

    import ringtrain

    strategy = ringtrain.tf.strategy()
    size = strategy.num_replicas_in_sync
    rows = []
    for nbytes in sizes:
        data = tf.Variable(tf.ones([nbytes // 4]), trainable=False)  # a plain, unmirrored buffer

        def reduce(data: Any = data) -> Any:
            # identity: all_reduce wants a tensor (a variable has no "destinations" to reduce to).
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(data)
            )

        @tf.function
        def step() -> Any:
            return strategy.experimental_local_results(strategy.run(reduce))[0]

        step().numpy()  # trace and set up the collective
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            step().numpy()  # numpy() waits for the all-reduce to finish
            samples.append(time.perf_counter() - start)
        rows.append(_busbw_row("TF MWMS RING (gRPC)", nbytes, float(np.median(samples)), size))
    return rows


def busbw_sweep(sizes: list[int], reps: int, np_: int = 2) -> list[dict[str, Any]]:
    """Bus bandwidth rows for every size: two ringtrain jobs, one per backend."""
    import ringtrain

    rows = ringtrain.run(_mpi_busbw, sizes, reps, num_proc=np_, backend="mpi")
    rows += ringtrain.run(_tf_busbw, sizes, reps, num_proc=np_, backend="tf")
    return rows


# ------------------------------------------------------------------ scaling (driver side)


def efficiencies(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, backend, N) with ``efficiency`` = ips(N) / (N ips(1)).

    Per key, the records of its latest sweep count (all its repeats; a record without a
    ``sweep_id`` stands alone). ``images_per_sec`` and the shares become the medians over
    repeats; ``efficiency`` is the median of the repeats' own E(N), with min and max.
    """
    import numpy as np

    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["backend"], r["np"]), []).append(r)
    for key, rs in groups.items():
        last = rs[-1].get("sweep_id")
        groups[key] = [r for r in rs if last is not None and r.get("sweep_id") == last] or [rs[-1]]

    def median(rs: list[dict[str, Any]], field: str) -> float | None:
        values = [r[field] for r in rs if r.get(field) is not None]
        return float(np.median(values)) if values else None

    out = []
    for (model, backend, n), rs in groups.items():
        row = {**rs[-1], "repeats": len(rs), "images_per_sec_repeats": [r["images_per_sec"] for r in rs]}
        for field in ("images_per_sec", "step_time_mean_s", "allreduce_share", "allreduce_busy_share"):
            row[field] = median(rs, field)
        base = groups.get((model, backend, 1))
        if base:
            if len(base) == len(rs):
                effs = [
                    r["images_per_sec"] / (n * b["images_per_sec"]) for r, b in zip(rs, base, strict=True)
                ]
            else:
                effs = [r["images_per_sec"] / (n * median(base, "images_per_sec")) for r in rs]
            row.update(efficiency=float(np.median(effs)), efficiency_min=min(effs), efficiency_max=max(effs))
        else:
            row.update(efficiency=None, efficiency_min=None, efficiency_max=None)
        out.append(row)
    return sorted(out, key=lambda r: (r["model"], r["backend"], r["np"]))


def _per_model(text: str, models: list[str], name: str) -> dict[str, int]:
    """'16' gives every model 16; 'inception1:16,vgg16:4' gives each its own."""
    if ":" not in text:
        return dict.fromkeys(models, int(text))
    values = {k.strip(): int(v) for k, v in (item.split(":", 1) for item in text.split(","))}
    missing = [m for m in models if m not in values]
    if missing:
        raise SystemExit(f"--{name} {text!r} gives no value for {', '.join(missing)}")
    return values


def _sizes(text: str) -> list[int]:
    """'64K..64M' -> powers of 4 from 64 KiB to 64 MiB; or an explicit comma list like '64K,1M'."""
    units = {"K": 1 << 10, "M": _MB, "G": 1 << 30}

    def one(s: str) -> int:
        s = s.strip().upper()
        return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)

    if ".." in text:
        lo, hi = (one(s) for s in text.split(".."))
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 4
        return sizes
    return [one(s) for s in text.split(",")]


def _check_outputs(
    out: str, records: list[dict[str, Any]], pngs: list[str], busbw: list[dict[str, Any]]
) -> None:
    """Quick mode: fail loudly unless every record and plot is well formed."""
    for r in records:
        cnn.check_record(r)
        if r["efficiency"] is None or not r["efficiency"] > 0:
            raise ValueError(f"bad efficiency in {r['model']}/{r['backend']}/N={r['np']}: {r['efficiency']}")
    for row in busbw:
        if not (row["busbw_GBps"] > 0 and row["time_s"] > 0):
            raise ValueError(f"bad bus-bandwidth row {row}")
    for png in pngs:
        if not os.path.isfile(png) or os.path.getsize(png) == 0:
            raise ValueError(f"plot {png} is missing or empty")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="inception1,vgg16")
    p.add_argument("--backends", default="tf,mpi")
    p.add_argument("--max-np", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="TF threads per worker, the same for every N")
    p.add_argument(
        "--batch-size", default="inception1:16,vgg16:4,vgg19:4", help="per worker; int or model:int,..."
    )
    p.add_argument("--image-size", default="inception1:112,vgg16:64,vgg19:64", help="int or model:int,...")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs per point; medians and spread reported")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--out", default=_DEFAULT_OUT, help="folder for cnn.jsonl, busbw.json, summary.json, PNGs")
    p.add_argument("--busbw-sizes", default="64K..64M", help="'LO..HI' (powers of 4) or a comma list")
    p.add_argument("--busbw-reps", type=int, default=5)
    p.add_argument("--no-busbw", action="store_true", help="skip the bus-bandwidth sweep")
    p.add_argument("--no-cnn", action="store_true", help="skip the CNN runs (e.g. bus bandwidth only)")
    p.add_argument("--plot-only", action="store_true", help="re-plot from the files already in --out")
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny runs, then check every output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.models, args.backends, args.max_np, args.threads = "inception1", "mpi", 2, 1
        args.batch_size, args.image_size, args.steps, args.warmup, args.classes = "4", "32", 3, 1, 10
        args.busbw_sizes, args.busbw_reps = "64K,1M", 3
    models = [m for m in args.models.split(",") if m]
    backends = [b for b in args.backends.split(",") if b]
    batches = _per_model(args.batch_size, models, "batch-size")
    images = _per_model(args.image_size, models, "image-size")
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "cnn.jsonl")
    busbw_path = os.path.join(args.out, "busbw.json")

    records: list[dict[str, Any]] = []
    if args.plot_only or args.no_cnn:
        if os.path.exists(jsonl):
            with open(jsonl) as f:
                records = [json.loads(line) for line in f if line.strip()]
    else:
        base = cnn.BenchConfig(
            threads=args.threads, steps=args.steps, warmup=args.warmup, classes=args.classes
        )
        sweep_id = time.strftime("%Y%m%dT%H%M%S")
        for model in models:
            for backend in backends:
                for repeat in range(args.repeats):
                    for n in range(1, args.max_np + 1):
                        cfg = replace(
                            base,
                            model=model,
                            backend=backend,
                            np=n,
                            batch_size=batches[model],
                            image_size=images[model],
                        )
                        print(f"== {model} {backend} N={n} repeat {repeat + 1}/{args.repeats}", flush=True)
                        record = cnn.run_benchmark(cfg)
                        record["command"] = "python -m benchmarks.sweep " + " ".join(
                            sys.argv[1:] if argv is None else argv
                        )
                        record.update(sweep_id=sweep_id, repeat=repeat)
                        cnn.append_record(jsonl, record)
                        records.append(record)
                        print(cnn.format_record(record), flush=True)
    records = [r for r in efficiencies(records) if r["model"] in models and r["backend"] in backends]

    busbw: list[dict[str, Any]] = []
    if args.plot_only:
        if os.path.exists(busbw_path):
            with open(busbw_path) as f:
                busbw = json.load(f)["rows"]
    elif not args.no_busbw:
        print("== allreduce bus bandwidth, 2 workers", flush=True)
        busbw = busbw_sweep(_sizes(args.busbw_sizes), args.busbw_reps)
        with open(busbw_path, "w") as f:
            json.dump(
                {"cpu_count": os.cpu_count(), "threads_per_worker": args.threads, "rows": busbw}, f, indent=1
            )
        for row in busbw:
            print(
                f"{row['impl']:24s} {row['bytes'] / _MB:9.3f} MiB {row['time_s'] * 1e3:9.2f} ms "
                f"busbw {row['busbw_GBps']:.3f} GB/s",
                flush=True,
            )

    from benchmarks import plots

    pngs = []
    for model in sorted({r["model"] for r in records}):
        path = os.path.join(args.out, f"scaling_{model}.png")
        plots.plot_scaling(records, model, path)
        pngs.append(path)
    if busbw:
        path = os.path.join(args.out, "busbw.png")
        plots.plot_busbw(
            busbw, path, title=f"allreduce bus bandwidth, {busbw[0]['np']} workers, {os.cpu_count()} cores"
        )
        pngs.append(path)
    summary = [
        {
            k: r.get(k)
            for k in ("model", "backend", "np", "image_size", "batch_per_worker", "threads_per_worker")
        }
        | {
            k: r.get(k)
            for k in (
                "repeats",
                "images_per_sec",
                "images_per_sec_repeats",
                "efficiency",
                "efficiency_min",
                "efficiency_max",
                "step_time_mean_s",
                "allreduce_share",
                "allreduce_busy_share",
            )
        }
        for r in records
    ]
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for row in summary:
        eff = "-" if row["efficiency"] is None else f"{row['efficiency']:.3f}"
        if row["efficiency"] is not None and row["repeats"] and row["repeats"] > 1:
            eff += f" [{row['efficiency_min']:.3f}..{row['efficiency_max']:.3f}]"
        share = "" if row["allreduce_share"] is None else f"  waits {100 * row['allreduce_share']:.1f}%"
        if row.get("allreduce_busy_share") is not None:
            share += f", reduces {100 * row['allreduce_busy_share']:.1f}% of the step"
        print(
            f"{row['model']:10s} {row['backend']:3s} N={row['np']} "
            f"{row['images_per_sec']:8.2f} images/sec  E={eff}{share}"
        )
    if args.quick:
        _check_outputs(args.out, records, pngs, busbw)
        print(f"quick sweep OK: {len(records)} records, {len(busbw)} bus-bandwidth rows, {len(pngs)} plots")
    return 0


if __name__ == "__main__":
    # Run the copy imported as benchmarks.sweep, so workers unpickle functions by module name.
    from benchmarks import sweep

    sys.exit(sweep.main())
