"""A peer process for tests of the native shared-memory group (no MPI involved).

Usage: ``shm_peer.py NAME RANK SIZE SLOT_BYTES ACTION [ALGORITHM]``. The peer attaches to
segment NAME as local rank RANK (using ALGORITHM: auto, one_shot or two_step), prints
``READY``, then:

* ``cases``: runs :data:`CASES` like the test process does, checks its own results
  against :func:`expected`, prints ``CASES OK`` or the failures, exits 0 or 1;
* ``die``: exits at once (status 3) without taking part in any allreduce;
* ``hang``: sleeps until killed;
* ``abandon``: waits for a line on stdin, then gives up on the group;
* ``exchange``: ``exchange(1 + RANK, 10 + RANK)``, a summing allreduce of 100,000 float32
  values equal to RANK + 1 (several steps), then ``exchange(5, 20 + RANK)``; prints the
  tables and the distinct values of the sum.

The test process (rank 0) creates the segment and runs the same cases, so every rank
reduces the same sequence. Inputs depend only on (rank, case), so every rank computes
the expected results itself, with numpy, in the order the group promises: sums in rank
order, the average's scale applied once to the float32 (float64) sum, integers
floor-divided, 16-bit floats summed in float32 and rounded once, compressed buckets
summed in their 16-bit type (rounded after each add) and widened before scaling.
"""

from __future__ import annotations

import sys
import time

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(), (0,), (7,), (33, 65), (40_001,), (5,)]

# (dtype, op, compress, average)
CASES = [
    (np.dtype(np.float32), "sum", "", True),
    (np.dtype(np.float32), "sum", "", False),
    (np.dtype(np.float32), "min", "", False),
    (np.dtype(np.float32), "max", "", False),
    (np.dtype(np.float64), "sum", "", True),
    (np.dtype(np.float64), "max", "", False),
    (np.dtype(np.float16), "sum", "", True),
    (np.dtype(np.float16), "min", "", False),
    (BF16, "sum", "", True),
    (np.dtype(np.int32), "sum", "", True),
    (np.dtype(np.int32), "max", "", False),
    (np.dtype(np.int64), "sum", "", False),
    (np.dtype(np.int64), "min", "", False),
    (np.dtype(np.float32), "sum", "fp16", True),
    (np.dtype(np.float32), "sum", "bf16", False),
]
KINDS = {"float32": "f4", "float64": "f8", "float16": "f2", "bfloat16": "bf16", "int32": "i4", "int64": "i8"}


def inputs(rank: int, case: int) -> list[np.ndarray]:
    dtype = CASES[case][0]
    rng = np.random.default_rng(7919 * rank + case)
    out = []
    for shape in SHAPES:
        if dtype.kind == "i":
            info = np.iinfo(dtype)  # the whole range: sums wrap around as MPI's do
            out.append(np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)))
        else:
            scale = 100 if dtype.itemsize >= 4 else 10
            out.append(np.asarray(rng.standard_normal(shape) * scale).astype(dtype))
    return out


def expected(size: int, case: int) -> list[np.ndarray]:
    dtype, op, compress, average = CASES[case]
    per_rank = [inputs(r, case) for r in range(size)]
    results = []
    for t in range(len(SHAPES)):
        xs = [per_rank[r][t] for r in range(size)]
        if compress:
            wire = np.float16 if compress == "fp16" else BF16
            acc = xs[0].astype(wire)
            for x in xs[1:]:
                acc = (acc + x.astype(wire)).astype(wire)
            out = acc.astype(np.float32)
            if average:
                out = out * np.float32(1 / size)
        elif dtype.itemsize == 2:  # float16 / bfloat16: in float32, rounded once
            wide = [x.astype(np.float32) for x in xs]
            out = _fold(op, wide)
            if average:
                out = out * np.float32(1 / size)
            out = out.astype(dtype)
        else:
            with np.errstate(over="ignore"):
                out = _fold(op, xs)
            if average:
                out = out // dtype.type(size) if dtype.kind == "i" else out * dtype.type(1 / size)
        results.append(np.asarray(out, dtype=np.float32 if compress else dtype))
    return results


def _fold(op: str, xs: list[np.ndarray]) -> np.ndarray:
    acc = xs[0].copy()
    for x in xs[1:]:
        acc = {"sum": np.add, "min": np.minimum, "max": np.maximum}[op](acc, x)
    return acc


def run_case(group, size: int, case: int) -> list[np.ndarray]:
    """One allreduce of case ``case`` through ``group`` (rank from the group)."""
    dtype, op, compress, average = CASES[case]
    srcs = inputs(group.rank, case)
    out_dtype = np.float32 if compress else dtype
    dsts = [np.full(s.shape, 99, out_dtype) for s in srcs]
    integer = dtype.kind == "i"
    scale = 1 / size if average and not integer else 1.0
    divisor = size if average and integer else 1
    group.allreduce(srcs, dsts, KINDS[dtype.name], op, compress, scale, divisor)
    return dsts


def check_all(group, size: int) -> list[str]:
    failures = []
    for case in range(len(CASES)):
        got = run_case(group, size, case)
        for t, (g, w) in enumerate(zip(got, expected(size, case), strict=True)):
            if g.dtype != w.dtype or g.shape != w.shape:
                failures.append(f"case {case} tensor {t}: {g.dtype} {g.shape} != {w.dtype} {w.shape}")
            elif not np.array_equal(g.view(f"u{g.itemsize}"), w.view(f"u{w.itemsize}")):
                bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1))[:3]
                failures.append(f"case {case} {CASES[case]} tensor {t}: differs at {bad.tolist()}")
    return failures


def exchange_and_reduce(group, rank: int) -> str:
    """The ``exchange`` action's steps on local rank ``rank``; what it saw, as one line."""
    first = group.exchange(1 + rank, 10 + rank)
    x = np.full(100_000, rank + 1, np.float32)
    out = np.empty_like(x)
    group.allreduce([x], [out], "f4", "sum")
    second = group.exchange(5, 20 + rank)
    return f"FIRST {first.tolist()} SUM {np.unique(out).tolist()} SECOND {second.tolist()}"


def main(argv: list[str]) -> int:
    from ringtrain.fusion import _native

    name, rank, size, slot, action = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    group = _native.ShmGroup(name, False, rank, size, slot)
    group.algorithm = argv[5] if len(argv) > 5 else "auto"
    print("READY", flush=True)
    if action == "die":
        return 3
    if action == "hang":
        time.sleep(600)
        return 0
    if action == "abandon":
        sys.stdin.readline()
        group.abandon()
        return 0
    if action == "exchange":
        print(exchange_and_reduce(group, rank), flush=True)
        return 0
    failures = check_all(group, size)
    print("CASES OK" if not failures else "\n".join(failures), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
