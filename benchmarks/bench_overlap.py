"""When does each gradient bucket reach the communication thread, inside tf.function?

Usage: ``python -m benchmarks.bench_overlap [--np 2] [--threads 1] [--layers 4] [--width 1024]
[--batch 512] [--steps 3] [--bucket 5M]``

Run outside MPI it starts itself under ``mpiexec -n NP``. A chain of ``--layers`` dense
``tanh`` layers (``--width`` squared float32 weights each) is trained through
``ringtrain.DistributedGradientTape`` with ``--threads`` TF intra- and inter-op threads,
buckets of ``--bucket`` bytes (one layer each by default). For every step, rank 0 prints
the time after the step's start at which each bucket was handed to the communication
thread, and when the step ended. Overlap shows as hand-offs spread over backprop
instead of bunched at its end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.bench_allreduce import inside_mpi, relaunch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket", default="5M", help="RINGTRAIN_FUSION_THRESHOLD for the run")
    args = parser.parse_args(argv)
    if not inside_mpi():
        return relaunch("benchmarks.bench_overlap", sys.argv[1:] if argv is None else argv, args.np)
    os.environ["RINGTRAIN_FUSION_THRESHOLD"] = args.bucket
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)

    import ringtrain
    from ringtrain.collectives import _tf

    handed: list[tuple[str, float]] = []
    submit = _tf.submit_allreduce

    def recording(arrays, op, what, compression=None):  # type: ignore[no-untyped-def]
        handed.append((what, time.perf_counter()))
        return submit(arrays, op, what, compression)

    _tf.submit_allreduce = recording
    ws = [tf.Variable(np.full((args.width, args.width), 0.001, np.float32)) for _ in range(args.layers)]
    x = tf.constant(np.ones((args.batch, args.width), np.float32))

    @tf.function
    def step() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            h = x
            for w in ws:
                h = tf.tanh(h @ w)
            loss = tf.reduce_sum(h)
        return ringtrain.DistributedGradientTape(tape).gradient(loss, ws)

    step()  # trace and warm up
    for i in range(args.steps):
        handed.clear()
        start = time.perf_counter()
        grads = step()
        grads[0].numpy()
        end = time.perf_counter()
        if ringtrain.rank() == 0:
            marks = ", ".join(f"{what} at {(t - start) * 1e3:.1f} ms" for what, t in handed)
            print(f"step {i}: {marks}; step ended at {(end - start) * 1e3:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
