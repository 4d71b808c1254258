"""Run under ``mpiexec -n N``: every collective against numpy, for every dtype and both kinds.

Each rank's input depends only on (rank, dtype, case), so every rank can compute the
expected result itself. Values are small multiples of 1/4, exact in every float type,
so results must match exactly. Prints "COLLECTIVES OK size=N" on rank 0; exits 1 on
the first mismatch.
"""

import os
import sys

import ml_dtypes
import numpy as np
import tensorflow as tf

import ringtrain
from ringtrain import collectives as rc
from ringtrain import fusion

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

# grouped: mixed dtypes and shapes, fused == per-tensor, one Allreduce per bucket
shapes = [(3,), (4, 5), (), (0,), (7, 2), (6,)]
tensors = [data(rank, DTYPES[i % len(DTYPES)], s, salt=i) for i, s in enumerate(shapes * 2)]
os.environ[fusion.THRESHOLD_ENV] = "64"  # bytes: several buckets per dtype
buckets = fusion.plan_buckets([(t.dtype, t.nbytes) for t in tensors], 64)
before = rc.call_counts()
fused = rc.grouped_allreduce(tensors, op=rc.Sum)
after = rc.call_counts()
calls = after.get("Allreduce", 0) - before.get("Allreduce", 0)
nonempty = sum(1 for b in buckets if sum(tensors[i].size for i in b))
if calls != nonempty or after["Allgather"] - before.get("Allgather", 0) != 1:
    failures.append(f"grouped_allreduce made {calls} Allreduce calls for {nonempty} non-empty buckets")
del os.environ[fusion.THRESHOLD_ENV]
before = rc.call_counts()
big = rc.grouped_allreduce(tensors, op=rc.Sum)  # default 128 MiB: one bucket per dtype
after = rc.call_counts()
dtypes_with_data = {t.dtype for t in tensors if t.size}
if after["Allreduce"] - before["Allreduce"] != len(dtypes_with_data):
    failures.append(
        f"default threshold: {after['Allreduce'] - before['Allreduce']} Allreduce calls "
        f"for {len(dtypes_with_data)} dtypes"
    )
for i, t in enumerate(tensors):
    single = rc.allreduce(t, op=rc.Sum)
    if not (np.array_equal(single, fused[i]) and np.array_equal(single, big[i])):
        failures.append(f"fused result {i} differs from the per-tensor one")

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


def grads():
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(emb, [1, 3])) * float(rank + 1) + tf.reduce_sum(w * w)
    return ringtrain.collectives.DistributedGradientTape(tape).gradient(loss, [emb, w, unused])


mean_r1 = np.mean([r + 1 for r in range(size)], dtype=np.float32)
want_emb = np.zeros((4, 2), np.float32)
want_emb[[1, 3]] = mean_r1
for mode, fn in (("eager", grads), ("tf.function", tf.function(grads))):
    g_emb, g_w, g_unused = fn()
    ok = g_unused is None and np.allclose(g_emb.numpy(), want_emb) and np.allclose(g_w.numpy(), 2 * mean_r1)
    if not ok:
        failures.append(f"DistributedGradientTape {mode} gave {g_emb}, {g_w}, {g_unused}")

# compression: float32 sent as fp16 through a user-defined MPI op
x = tf.constant(data(rank, np.float32))
with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.reduce_sum(x * x)
g = ringtrain.collectives.DistributedGradientTape(tape, compression="fp16").gradient(y, x)
if not np.array_equal(g.numpy(), reference(rc.Average, np.float32) * 2):
    failures.append("fp16-compressed gradients differ")

if failures:
    print(f"rank {rank}: {len(failures)} failure(s):\n  " + "\n  ".join(failures), flush=True)
    sys.exit(1)
if rank == 0:
    print(f"COLLECTIVES OK size={size} calls={rc.call_counts()}", flush=True)
