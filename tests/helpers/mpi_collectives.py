"""Run under ``mpiexec -n N``: every collective against numpy, for every dtype and both kinds.

Usage: ``mpi_collectives.py [shm|mpi|hier]`` (default shm):

* ``shm``: allreduce through shared memory (RINGTRAIN_FUSION_SHM=on, so it must be used);
* ``mpi``: MPI only (RINGTRAIN_FUSION_SHM=off; the test also runs it with the numpy twin);
* ``hier``: ranks pose as hosts of two ranks each (RINGTRAIN_SHM_HOST_KEY): shared memory
  inside each, MPI between them.

Each rank's input depends only on (rank, dtype, case), so every rank can compute the
expected result itself. Values are small multiples of 1/4, exact in every float type,
so results must match exactly. On random data the shared-memory path must give the same
bits as the MPI path (two ranks: every float sum has one order). Prints
"COLLECTIVES OK size=N" on rank 0; exits 1 on the first mismatch.
"""

import os
import sys
import tempfile

MODE = sys.argv[1] if len(sys.argv) > 1 else "shm"
os.environ["RINGTRAIN_FUSION_SHM"] = "off" if MODE == "mpi" else "on"
if MODE == "hier":  # before the first collective, which decides the layout
    os.environ["RINGTRAIN_SHM_HOST_KEY"] = f"fake-host-{int(os.environ['PMI_RANK']) // 2}"

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ringtrain  # noqa: E402
from ringtrain import collectives as rc  # noqa: E402
from ringtrain import fusion, progress  # noqa: E402
from ringtrain.collectives import _engine  # noqa: E402

rank, size = ringtrain.rank(), ringtrain.size()
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int32, np.int64]
failures = []


def data(r, dtype, shape=(5, 3), salt=0):
    rng = np.random.default_rng(1000 * r + 17 * salt + 1)
    values = rng.integers(-8, 9, size=shape)
    if np.dtype(dtype).kind == "f" or dtype is ml_dtypes.bfloat16:
        return (values / 4).astype(dtype)
    return (values * 1000 + r).astype(dtype)


def expect(name, got, want, kind):
    if kind == "tf":
        if not isinstance(got, tf.Tensor) or got.dtype.as_numpy_dtype != want.dtype:
            failures.append(f"{name}: expected a tf tensor of {want.dtype}, got {type(got).__name__}")
            return
        got = got.numpy()
    elif not isinstance(got, np.ndarray) or got.dtype != want.dtype:
        failures.append(f"{name}: expected numpy {want.dtype}, got {type(got).__name__} {got.dtype}")
        return
    if got.shape != want.shape or not np.array_equal(got, want):
        failures.append(f"{name}: rank {rank} got {got.ravel()[:6]} want {want.ravel()[:6]}")


def reference(op, dtype, salt=0, shape=(5, 3)):
    inputs = [data(r, dtype, shape, salt) for r in range(size)]
    dt = np.dtype(dtype)
    if op is rc.Min:
        return np.minimum.reduce(inputs)
    if op is rc.Max:
        return np.maximum.reduce(inputs)
    if dt.kind in "iu":
        total = np.sum(inputs, axis=0, dtype=dt)
        return total if op is rc.Sum else total // size  # integer Average: floor division
    total = np.sum([x.astype(np.float64) for x in inputs], axis=0).astype(np.float32)
    if op is rc.Average:
        total = total * np.float32(1.0 / size)
    if dt.itemsize == 2 or dt == np.float32:
        return total.astype(dtype)
    wide = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    return wide if op is rc.Sum else wide * (1.0 / size)


for dtype in DTYPES:
    name = np.dtype(dtype).name
    for kind in ("numpy", "tf"):
        wrap = (lambda a: tf.constant(a)) if kind == "tf" else (lambda a: a)
        for op in (rc.Average, rc.Sum, rc.Min, rc.Max):
            got = rc.allreduce(wrap(data(rank, dtype)), op=op)
            expect(f"allreduce {name} {kind} {op}", got, reference(op, dtype), kind)
        # allgather: first dimension differs per rank
        mine = data(rank, dtype, shape=(rank + 1, 2))
        want = np.concatenate([data(r, dtype, shape=(r + 1, 2)) for r in range(size)])
        expect(f"allgather {name} {kind}", rc.allgather(wrap(mine)), want, kind)
        root = size - 1
        expect(
            f"broadcast {name} {kind}", rc.broadcast(wrap(data(rank, dtype)), root), data(root, dtype), kind
        )

host = _engine.host_group()
if MODE == "mpi" and host is not None:
    failures.append("RINGTRAIN_FUSION_SHM=off but the shared-memory path was used")
if MODE != "mpi" and (host is None or host.hierarchical != (MODE == "hier")):
    failures.append(f"mode {MODE}: wrong allreduce path {host and (host.hosts, host.hierarchical)}")

# Large tensors: several shared-memory steps, and the MPI path's direct (unpacked) reduction.
big = [data(rank, np.float32, shape=(3_000_001,), salt=5), data(rank, np.int64, shape=(700_001,), salt=6)]
for t, got in zip(big, rc.grouped_allreduce(big, op=rc.Average), strict=True):
    expect(
        f"large {t.dtype}",
        got,
        reference(rc.Average, t.dtype, salt=5 + (t.dtype == np.int64), shape=t.shape),
        "numpy",
    )

# grouped: mixed dtypes and shapes, fused == per-tensor, one call per bucket
shapes = [(3,), (4, 5), (), (0,), (7, 2), (6,)]
tensors = [data(rank, DTYPES[i % len(DTYPES)], s, salt=i) for i, s in enumerate(shapes * 2)]
os.environ[fusion.THRESHOLD_ENV] = "64"  # bytes: several buckets per dtype
before = rc.call_counts()
fused = rc.grouped_allreduce(tensors, op=rc.Sum)
after = rc.call_counts()
dtypes_with_data = {t.dtype for t in tensors if t.size}
if host is not None:
    # Shared memory ignores buckets: one reduction per dtype.
    calls, want_calls = after["shm"] - before["shm"], len(dtypes_with_data)
else:
    # Tensors over the threshold (that MPI can reduce as they are) go alone, unpacked;
    # the rest go in buckets of at most 64 bytes.
    alone = [t for t in tensors if t.size and t.nbytes > 64 and t.dtype.itemsize > 2]
    rest = [t for t in tensors if not any(t is a for a in alone)]
    buckets = fusion.plan_buckets([(t.dtype, t.nbytes) for t in rest], 64)
    want_calls = len(alone) + sum(1 for b in buckets if sum(rest[i].size for i in b))
    calls = after.get("Allreduce", 0) - before.get("Allreduce", 0)
checks = sum(after.get(k, 0) - before.get(k, 0) for k in ("Allgather", "shm_check"))
want_checks = 1  # one signature check per collective: a barrier in the segment, or an MPI Allgather
if calls != want_calls or checks != want_checks:
    failures.append(
        f"grouped_allreduce made {calls} reductions and {checks} checks, want {want_calls}, {want_checks}"
    )
del os.environ[fusion.THRESHOLD_ENV]
before = rc.call_counts()
big = rc.grouped_allreduce(tensors, op=rc.Sum)  # default threshold: one bucket per dtype
after = rc.call_counts()
counted = "shm" if host is not None else "Allreduce"
if after[counted] - before[counted] != len(dtypes_with_data):
    failures.append(
        f"default threshold: {after[counted] - before[counted]} reductions for {len(dtypes_with_data)} dtypes"
    )
for i, t in enumerate(tensors):
    single = rc.allreduce(t, op=rc.Sum)
    if not (np.array_equal(single, fused[i]) and np.array_equal(single, big[i])):
        failures.append(f"fused result {i} differs from the per-tensor one")

# The MPI path gives the same results with its calls on the communication thread
# (pipelined: the default where ranks have two or more CPUs each) and in the caller.
mixed = tensors + [data(rank, np.float32, shape=(300_000,), salt=9)]
saved_host, saved_pipeline = _engine._host, _engine.PIPELINE
_engine._host = None
try:
    for pipeline in (True, False):
        _engine.PIPELINE = pipeline
        os.environ[fusion.THRESHOLD_ENV] = "64"
        results = [r.copy() for r in rc.grouped_allreduce(mixed, op=rc.Average)]
        del os.environ[fusion.THRESHOLD_ENV]
        if pipeline:
            pipelined = results
        elif not all(np.array_equal(a, b) for a, b in zip(pipelined, results, strict=True)):
            failures.append("pipelined and serial MPI paths differ")
finally:
    _engine._host, _engine.PIPELINE = saved_host, saved_pipeline

# Shared memory and MPI give the same bits on random data (two ranks: one order per sum).
if host is not None and size == 2:
    rng = np.random.default_rng(rank)
    noisy = [(rng.standard_normal(n) * 100).astype(d) for n, d in ((70_001, np.float32), (513, np.float64))]
    noisy += [(rng.standard_normal(300) * 10).astype(d) for d in (np.float16, ml_dtypes.bfloat16)]
    cases = [(op, None) for op in (rc.Average, rc.Sum, rc.Min, rc.Max)] + [
        (rc.Average, "fp16"),
        (rc.Sum, "bf16"),
    ]
    for op, compression in cases:
        via_shm = [r.copy() for r in _engine.fused_allreduce(noisy, op, "bits", compression)]
        _engine._host = None  # the MPI path, for comparison
        try:
            via_mpi = _engine.fused_allreduce(noisy, op, "bits", compression)
        finally:
            _engine._host = host
        for a, b in zip(via_shm, via_mpi, strict=True):
            if not np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")):
                failures.append(f"{op} {compression} {a.dtype}: shared memory and MPI differ in bits")

# broadcast_variables: tf.Variable and numpy arrays assigned in place, fused
variables = [tf.Variable(data(rank, np.float32, salt=1)), tf.Variable(data(rank, np.int64, salt=2))]
arr = data(rank, np.float64, salt=3)
rc.broadcast_variables(variables + [arr], root_rank=0)
wants = [data(0, np.float32, salt=1), data(0, np.int64, salt=2), data(0, np.float64, salt=3)]
for v, want in zip(variables + [arr], wants, strict=True):
    if not np.array_equal(np.asarray(v), want):
        failures.append("broadcast_variables did not assign rank 0's value")

# DistributedGradientTape: eager and tf.function, None and IndexedSlices gradients
emb = tf.Variable(np.ones((4, 2), np.float32))
w = tf.Variable(np.full((2,), float(rank + 1), np.float32))
unused = tf.Variable(1.0)


def grads(compression=None):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(emb, [1, 3])) * float(rank + 1) + tf.reduce_sum(w * w)
    tape = ringtrain.collectives.DistributedGradientTape(tape, compression=compression)
    return tape.gradient(loss, [emb, w, unused])


mean_r1 = np.mean([r + 1 for r in range(size)], dtype=np.float32)
want_emb = np.zeros((4, 2), np.float32)
want_emb[[1, 3]] = mean_r1
graph = tf.function(grads)
for mode, fn in (("eager", grads), ("tf.function", graph), ("tf.function again", graph)):
    g_emb, g_w, g_unused = fn()
    ok = g_unused is None and np.allclose(g_emb.numpy(), want_emb) and np.allclose(g_w.numpy(), 2 * mean_r1)
    if not ok:
        failures.append(f"DistributedGradientTape {mode} gave {g_emb}, {g_w}, {g_unused}")

# compression: float32 sent as fp16 (eagerly and in a graph)
x = tf.constant(data(rank, np.float32))


def compressed_grad():
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(x * x)
    return ringtrain.collectives.DistributedGradientTape(tape, compression="fp16").gradient(y, x)


for mode, fn in (("eager", compressed_grad), ("tf.function", tf.function(compressed_grad))):
    if not np.array_equal(fn().numpy(), reference(rc.Average, np.float32) * 2):
        failures.append(f"fp16-compressed gradients differ ({mode})")

# join with uneven steps: a rank out of data serves the others' allreduces, and each served
# allreduce counts as one collective in its progress record, as it does on the running ranks
# (the stall inspector compares these counts to tell who waits for whom).
with tempfile.TemporaryDirectory() as tmp:
    recorder = progress.FileRecorder(os.path.join(tmp, "progress"))
    progress.install(recorder)
    try:
        for i in range(1 + rank):  # rank r runs 1 + r steps; the last rank runs longest
            running = [r for r in range(size) if r >= i]
            want = np.array([len(running), sum(running)], np.float32)
            expect(
                f"join step {i}", rc.allreduce(np.array([1.0, rank], np.float32), op=rc.Sum), want, "numpy"
            )
        last = rc.join()
        counted = recorder.seq
    finally:
        progress.install(None)
if last != size - 1:
    failures.append(f"join returned {last}, want the last rank {size - 1}")
# every rank: `size` allreduces (run or served) and the join that every rank finally agreed on
counts = rc.allgather(np.array([counted], np.int64)).tolist()
if counts != [size + 1] * size:
    failures.append(f"join: the ranks counted {counts} collectives, want {size + 1} each")

if failures:
    print(f"rank {rank}: {len(failures)} failure(s):\n  " + "\n  ".join(failures), flush=True)
    sys.exit(1)
if rank == 0:
    print(f"COLLECTIVES OK size={size} mode={MODE} calls={rc.call_counts()}", flush=True)
