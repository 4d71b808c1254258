"""Run under ``mpiexec -n 2``: every ringtrain.horovod.tensorflow name against plain mpi4py.

Each check computes its expected value with mpi4py calls on the same inputs (no
ringtrain involved) and compares, eagerly and inside ``tf.function``. Prints
"HVD OK size=N" on rank 0; exits 1 listing the failures otherwise.
"""

import os
import sys
import tempfile

import numpy as np
import tensorflow as tf
from mpi4py import MPI

import ringtrain
import ringtrain.horovod.tensorflow as hvd
from ringtrain.collectives import call_counts

tf.get_logger().setLevel("ERROR")  # the loops below trace many small functions on purpose
comm = MPI.COMM_WORLD
me, n = comm.Get_rank(), comm.Get_size()
failures = []


def same(name, got, want, exact=True):
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    want = np.asarray(want)
    ok = got.shape == want.shape and got.dtype == want.dtype
    ok = ok and (np.array_equal(got, want) if exact else np.allclose(got, want, rtol=1e-6, atol=1e-6))
    if not ok:
        failures.append(
            f"{name}: rank {me} got {got.dtype}{got.shape} {got.ravel()[:6]}, want {want.ravel()[:6]}"
        )


def raises(name, fn, error, *fragments):
    try:
        fn()
    except error as err:
        missing = [f for f in fragments if f not in str(err)]
        if missing:
            failures.append(f"{name}: message lacks {missing}: {err}")
    else:
        failures.append(f"{name}: did not raise {error.__name__}")


def data(rank, dtype=np.float32, shape=(4, 3), salt=0):
    rng = np.random.default_rng(100 * rank + salt)
    return (rng.integers(-8, 9, size=shape) / 4).astype(dtype)


MPI_OPS = {hvd.Sum: MPI.SUM, hvd.Min: MPI.MIN, hvd.Max: MPI.MAX, hvd.Average: MPI.SUM}


def mpi_allreduce(x, op):
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out, op=MPI_OPS[op])
    return out / x.dtype.type(n) if op is hvd.Average else out


# ------------------------------------------------------------------ before init
raises("size before init", hvd.size, ringtrain.ConfigError, "hvd.init()")
hvd.init()
assert hvd.is_initialized()

# ------------------------------------------------------------------ placement
local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=me)
cross = comm.Split(color=local.Get_rank(), key=me)
same("rank", hvd.rank(), comm.Get_rank())
same("size", hvd.size(), comm.Get_size())
same("local_rank", hvd.local_rank(), local.Get_rank())
same("local_size", hvd.local_size(), local.Get_size())
same("cross_rank", hvd.cross_rank(), cross.Get_rank())
same("cross_size", hvd.cross_size(), cross.Get_size())

# ------------------------------------------------------------------ allreduce: ops, dtypes, eager and graph
for dtype in (np.float32, np.float64, np.int32, np.int64):
    x = data(me, dtype) if dtype in (np.float32, np.float64) else (data(me) * 4).astype(dtype)
    for op in (hvd.Sum, hvd.Min, hvd.Max) + ((hvd.Average,) if dtype in (np.float32, np.float64) else ()):
        want = mpi_allreduce(x, op)
        same(f"allreduce {op} {np.dtype(dtype).name} eager", hvd.allreduce(tf.constant(x), op=op), want)
        graph = tf.function(lambda t, op=op: hvd.allreduce(t, op=op))
        same(f"allreduce {op} {np.dtype(dtype).name} tf.function", graph(tf.constant(x)), want)

x = data(me)
want = mpi_allreduce(x * np.float32(0.5), hvd.Sum) * np.float32(3.0) / np.float32(n)
same(
    "allreduce pre/postscale", hvd.allreduce(tf.constant(x), prescale_factor=0.5, postscale_factor=3.0), want
)
same("allreduce average=False", hvd.allreduce(tf.constant(x), average=False), mpi_allreduce(x, hvd.Sum))
same("allreduce tf.Variable", hvd.allreduce(tf.Variable(x)), mpi_allreduce(x, hvd.Average))

# fp16 compression: float32 values that float16 cannot hold exactly
x = (np.random.default_rng(7 + me).standard_normal((64,)) * 3).astype(np.float32)
halves = np.empty((n, 64), np.float16)
comm.Allgather(x.astype(np.float16), halves)
total = halves[0]
for row in halves[1:]:
    total = (total + row).astype(np.float16)  # one rounding per addition, as the wire's MPI op does
want = total.astype(np.float32) * np.float32(1.0 / n)
got = hvd.allreduce(tf.constant(x), compression=hvd.Compression.fp16)
same("allreduce fp16", got, want)
if np.array_equal(got.numpy(), mpi_allreduce(x, hvd.Average)):
    failures.append("allreduce fp16: result equals the uncompressed one, so nothing was compressed")
graph_fp16 = tf.function(lambda t: hvd.allreduce(t, compression=hvd.Compression.fp16))
same("allreduce fp16 tf.function", graph_fp16(tf.constant(x)), want)

# grouped, mixed dtypes
group = [
    data(me, np.float32, (3,), 1),
    (data(me, np.float32, (2, 2), 2) * 4).astype(np.int64),
    data(me, np.float64),
]
reduced = hvd.grouped_allreduce([tf.constant(t) for t in group], op=hvd.Sum)
for i, (got, t) in enumerate(zip(reduced, group, strict=True)):
    same(f"grouped_allreduce {i}", got, mpi_allreduce(t, hvd.Sum))

# IndexedSlices: allgathered values and indices; the dense value is the sum / average
values, indices = data(me, np.float32, (2, 3), 3), np.array([me, 2], np.int64)
slices = tf.IndexedSlices(
    tf.constant(values), tf.constant(indices), dense_shape=tf.constant([4, 3], tf.int64)
)
sparse = hvd.allreduce(slices, op=hvd.Average)
dense = np.zeros((4, 3), np.float32)
np.add.at(dense, indices, values)
if not isinstance(sparse, tf.IndexedSlices):
    failures.append(f"allreduce of IndexedSlices returned {type(sparse).__name__}")
same("allreduce IndexedSlices", tf.convert_to_tensor(sparse), mpi_allreduce(dense, hvd.Average), exact=False)

# ------------------------------------------------------------------ allgather, broadcast, alltoall
mine = data(me, np.float32, (me + 1, 2), 4)
want = np.concatenate(comm.allgather(mine))
same("allgather eager", hvd.allgather(tf.constant(mine)), want)
same("allgather tf.function", tf.function(hvd.allgather)(tf.constant(mine)), want)
same("allgather int64", hvd.allgather(tf.constant(mine.astype(np.int64))), want.astype(np.int64))

root = n - 1
x = data(me, np.float32, (5,), 5)
same("broadcast eager", hvd.broadcast(tf.constant(x), root_rank=root), comm.bcast(x, root=root))
same(
    "broadcast tf.function",
    tf.function(lambda t: hvd.broadcast(t, root))(tf.constant(x)),
    comm.bcast(x, root=root),
)

rows = np.arange(6 * n, dtype=np.float32).reshape(3 * n, 2) + 100 * me
splits = [1 + (me + j) % 2 for j in range(n)]
pieces = np.split(rows[: sum(splits)], np.cumsum(splits)[:-1])
received = comm.alltoall(pieces)
want = np.concatenate(received)
out, counts = hvd.alltoall(tf.constant(rows), splits=splits)
same("alltoall splits", out, want)
same("alltoall received splits", counts, np.array([len(p) for p in received], np.int32))
even = np.concatenate(comm.alltoall(np.split(rows, n)))
same("alltoall even", hvd.alltoall(tf.constant(rows)), even)
graph_out, _ = tf.function(lambda t: hvd.alltoall(t, splits=splits))(tf.constant(rows))
same("alltoall tf.function", graph_out, want)

# ------------------------------------------------------------------ broadcast_variables, objects
variables = [tf.Variable(data(me, np.float32, (3,), 6)), tf.Variable(np.int64(me + 7))]
hvd.broadcast_variables(variables, root_rank=0)
same("broadcast_variables eager", variables[0], comm.bcast(data(me, np.float32, (3,), 6), root=0))
same("broadcast_variables int", variables[1], np.int64(7))
inner = tf.Variable(data(me, np.float32, (2,), 8))


@tf.function
def step_with_broadcast(first_batch):
    inner.assign_add(tf.ones_like(inner))
    if first_batch:  # as Horovod's synthetic benchmark does on its first step
        hvd.broadcast_variables([inner], root_rank=0)
    return inner.read_value()


same(
    "broadcast_variables in tf.function",
    step_with_broadcast(True),
    comm.bcast(data(me, np.float32, (2,), 8) + 1, root=0),
)
same("broadcast_object", hvd.broadcast_object({"rank": me}, root_rank=1)["rank"], 1)
same("allgather_object", [o["rank"] for o in hvd.allgather_object({"rank": me})], list(range(n)))

# ------------------------------------------------------------------ independent collectives in one graph
a, b, c = (tf.constant(data(me, np.float32, (k + 2,), 9 + k)) for k in range(3))


@tf.function
def many(a, b, c):  # no data dependence between them: only tf.function's ordering keeps ranks aligned
    return (
        hvd.allreduce(a, op=hvd.Sum, name="first"),
        hvd.allgather(tf.reshape(b, [1, -1]), name="second"),
        hvd.broadcast(c, root_rank=0, name="third"),
        hvd.allreduce(c, op=hvd.Max, name="fourth"),
    )


for _ in range(5):
    r1, r2, r3, r4 = many(a, b, c)
same("graph allreduce", r1, mpi_allreduce(a.numpy(), hvd.Sum))
same("graph allgather", r2, np.stack(comm.allgather(b.numpy())))
same("graph broadcast", r3, comm.bcast(c.numpy(), root=0))
same("graph max", r4, mpi_allreduce(c.numpy(), hvd.Max))
ops = [op for op in many.get_concrete_function(a, b, c).graph.get_operations() if op.type == "PyFunc"]
if len(ops) != 4:
    failures.append(f"expected 4 collective ops in the graph, found {len(ops)}")
for earlier, later in zip(ops, ops[1:], strict=False):
    if earlier not in later.control_inputs:
        failures.append(
            f"{later.name} does not run after {earlier.name}: MPI call order could differ across ranks"
        )

# ------------------------------------------------------------------ gradients (Horovod's)
w = tf.Variable(np.float32(me + 1))
with tf.GradientTape(persistent=True) as tape:
    summed = hvd.allreduce(w * w, op=hvd.Sum)
    gathered = tf.reduce_sum(hvd.allgather(tf.reshape(w * 3.0, [1])))
    spread = hvd.broadcast(w * 5.0, root_rank=0)
# d/dw of allreduce(Sum) is the Sum-allreduced upstream gradient (n) times 2w
same("allreduce gradient", tape.gradient(summed, w), np.float32(2 * (me + 1) * n))
# allgather: this rank's slice of the averaged upstream gradient (1), times 3
same("allgather gradient", tape.gradient(gathered, w), np.float32(3.0))
same("broadcast gradient", tape.gradient(spread, w), np.float32(5.0 if me == 0 else 0.0))

# ------------------------------------------------------------------ DistributedGradientTape
v = tf.Variable(data(me, np.float32, (3,), 10))


def tape_grads(**options):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(v * v) * float(me + 1)
    return hvd.DistributedGradientTape(tape, **options).gradient(loss, [v])[0]


local_grad = 2 * v.numpy() * np.float32(me + 1)
want = mpi_allreduce(local_grad, hvd.Average)
same("DistributedGradientTape", tape_grads(), want)
same("DistributedGradientTape tf.function", tf.function(tape_grads)(), want)
same("DistributedGradientTape predivide", tape_grads(gradient_predivide_factor=2.0), want, exact=False)
same("DistributedGradientTape Sum", tape_grads(op=hvd.Sum), mpi_allreduce(local_grad, hvd.Sum))


class ScaleBy4:  # a user-defined compressor, applied around the allreduce
    @staticmethod
    def compress(t):
        return t * 4.0, None

    @staticmethod
    def decompress(t, ctx):
        return t / 4.0


same("DistributedGradientTape custom compressor", tape_grads(compression=ScaleBy4), want)

# ------------------------------------------------------------------ barrier
marker = comm.bcast(os.path.join(tempfile.mkdtemp(), "arrived") if me == 0 else None, root=0)
if me == n - 1:
    import time

    time.sleep(0.5)  # make arriving late likely; the check below holds only because of the barrier
    open(marker, "w").close()
hvd.barrier()
if not os.path.exists(marker):
    failures.append("barrier returned before the last rank arrived")
hvd.barrier()
if me == 0:
    os.unlink(marker)
    os.rmdir(os.path.dirname(marker))

# ------------------------------------------------------------------ join with uneven steps
steps = 2 + 3 * me  # the last rank runs longest
history = []
train = tf.function(lambda t: hvd.allreduce(t, op=hvd.Sum))
for i in range(steps):
    history.append(train(tf.constant([1.0, float(me)])).numpy())
    history.append(hvd.allreduce(tf.constant([float(i)]), op=hvd.Min).numpy())
last = hvd.join()
same("join returns the last rank", last, np.int32(n - 1))
all_steps = [2 + 3 * r for r in range(n)]
for i in range(steps):
    running = [r for r in range(n) if all_steps[r] > i]
    same(f"join step {i} sum", history[2 * i], np.array([len(running), sum(running)], np.float32))
    same(f"join step {i} min", history[2 * i + 1], np.array([float(i)], np.float32))
# a broadcast while a rank has joined raises on every rank, naming join
if me == 0:
    raises("broadcast after join", hvd.join, ringtrain.ConfigError, "join()", "broadcast")
else:
    raises(
        "broadcast after join", lambda: hvd.broadcast(tf.constant([1.0]), 0), ringtrain.ConfigError, "join()"
    )
same("collectives work after join", hvd.allreduce(tf.constant([1.0]), op=hvd.Sum), np.array([n], np.float32))

# ------------------------------------------------------------------ arguments that cannot be honoured
raises(
    "Adasum", lambda: hvd.allreduce(tf.constant([1.0]), op=hvd.Adasum), ringtrain.ConfigError, "op=hvd.Adasum"
)
raises(
    "Product",
    lambda: hvd.allreduce(tf.constant([1.0]), op=hvd.Product),
    ringtrain.ConfigError,
    "op=hvd.Product",
)
subset = hvd.ProcessSet([0])
raises(
    "process set",
    lambda: hvd.allreduce(tf.constant([1.0]), process_set=subset),
    ringtrain.ConfigError,
    "process_set",
)
raises("init comm", lambda: hvd.init(comm=[0]), ringtrain.ConfigError, "comm")
raises("add_process_set", lambda: hvd.add_process_set([0]), ringtrain.ConfigError, "process_set")
raises(
    "tape predivide",
    lambda: tape_grads(op=hvd.Sum, gradient_predivide_factor=2.0),
    ringtrain.ConfigError,
    "gradient_predivide_factor",
)
raises(
    "op and average",
    lambda: hvd.allreduce(tf.constant([1.0]), op=hvd.Sum, average=True),
    ringtrain.ConfigError,
    "average",
)
# accepted, no effect: devices, the global process set, a process set holding every rank
same(
    "accepted args",
    hvd.allreduce(
        tf.constant([2.0]),
        device_dense="/gpu:0",
        process_set=hvd.ProcessSet(list(range(n))),
        ignore_name_scope=True,
    ),
    np.array([2.0], np.float32),
)

hvd.shutdown()
if hvd.is_initialized():
    failures.append("still initialized after shutdown")

if failures:
    print(f"rank {me}: {len(failures)} failure(s):\n  " + "\n  ".join(failures), flush=True)
    sys.exit(1)
if me == 0:
    print(f"HVD OK size={n} calls={call_counts()}", flush=True)
