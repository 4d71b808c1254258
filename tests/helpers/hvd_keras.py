"""Run under ``mpiexec -n 2``: ringtrain.horovod's Keras API against plain mpi4py and numpy.

Usage: hvd_keras.py legacy|keras3 DIR. ``legacy`` uses ``ringtrain.horovod.tensorflow.keras``
with tf-keras, ``keras3`` uses ``ringtrain.horovod.keras`` with Keras 3. DIR is a
scratch folder shared by the ranks. Prints "HVD KERAS OK <flavour>" on rank 0.
"""

import os
import sys

flavour, scratch = sys.argv[1], sys.argv[2]
if flavour == "legacy":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mpi4py import MPI  # noqa: E402

import ringtrain  # noqa: E402

if flavour == "legacy":
    import ringtrain.horovod.tensorflow.keras as hvd

    keras = tf.keras
    checkpoint_suffix = ".h5"
else:
    import keras

    import ringtrain.horovod.keras as hvd

    checkpoint_suffix = ".keras"

tf.get_logger().setLevel("ERROR")
comm = MPI.COMM_WORLD
hvd.init()
me, n = hvd.rank(), hvd.size()
failures = []


def check(name, ok, detail=""):
    if not ok:
        failures.append(f"{name}: {detail}")


def linear_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


rng = np.random.default_rng(me)
x = rng.standard_normal((16, 3)).astype(np.float32)
y = rng.standard_normal((16, 1)).astype(np.float32)

# ------------------------------------------------------------------ backward_passes_per_step
lr, batch, passes = 0.1, 4, 2
for average in (True, False):
    model = linear_model(10 + me)  # different initial weights on every rank
    w0 = [comm.bcast(w, root=0) for w in model.get_weights()]  # the broadcast must make them rank 0's
    opt = hvd.DistributedOptimizer(
        keras.optimizers.SGD(lr), backward_passes_per_step=passes, average_aggregated_gradients=average
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    model.fit(
        x,
        y,
        batch_size=batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)],
    )
    # Reference: numpy gradients of the mean squared error, summed over `passes` batches at
    # unchanged weights, averaged over ranks with mpi4py, applied every `passes` steps.
    W, b = (w.astype(np.float64) for w in w0)
    for start in range(0, len(x), batch * passes):
        total_W, total_b = np.zeros_like(W), np.zeros_like(b)
        for s in range(start, start + batch * passes, batch):
            xb, yb = x[s : s + batch].astype(np.float64), y[s : s + batch].astype(np.float64)
            err = xb @ W + b - yb
            total_W += 2.0 / len(xb) * xb.T @ err
            total_b += 2.0 / len(xb) * err.sum(axis=0)
        if average:
            total_W, total_b = total_W / passes, total_b / passes
        W = W - lr * comm.allreduce(total_W) / n
        b = b - lr * comm.allreduce(total_b) / n
    got = model.get_weights()
    check(
        f"aggregation average={average} weights",
        np.allclose(got[0], W, atol=1e-5) and np.allclose(got[1], b, atol=1e-5),
        f"rank {me} got {got[0].ravel()} {got[1]} want {W.ravel()} {b}",
    )
    iterations = int(np.asarray(model.optimizer.iterations))
    check(f"aggregation average={average} iterations", iterations == len(x) // batch, f"{iterations}")

# Adam (slot variables) on a model whose weights appear only in its first step: the broadcast waits
# for that step, and the aggregated update keeps every rank identical.
keras.utils.set_random_seed(20 + me)
model = keras.Sequential([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.01), backward_passes_per_step=2)
model.compile(optimizer=opt, loss="mse", jit_compile=False)
model.fit(
    x, y, batch_size=4, epochs=2, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)]
)
flat = np.concatenate([w.ravel() for w in model.get_weights()])
check(
    "unbuilt model with Adam",
    all(np.array_equal(flat, other) for other in comm.allgather(flat)),
    "weights differ",
)

# ------------------------------------------------------------------ learning-rate callbacks
model = linear_model(1)
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.4)), loss="mse", jit_compile=False)
history = model.fit(
    x,
    y,
    batch_size=4,
    epochs=3,
    verbose=0,
    callbacks=[hvd.callbacks.LearningRateScheduleCallback(initial_lr=0.4, multiplier=0.5)],
)
want = [0.4 * 0.5**e for e in range(3)]
check(
    "LearningRateScheduleCallback",
    np.allclose(history.history["lr"], want),
    f"{history.history['lr']} want {want}",
)

model = linear_model(2)
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.2)), loss="mse", jit_compile=False)
history = model.fit(
    x,
    y,
    batch_size=4,
    epochs=3,
    verbose=0,
    callbacks=[hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.2, warmup_epochs=2)],
)
steps = len(x) // 4
# lr(epoch) = initial / n * (epoch * (n - 1) / warmup + 1), set before each batch of the warm-up epochs;
# the last batch of epoch e sees epoch e + (steps - 1) / steps + 1 / steps = e + 1.
want = [0.2 / n * ((e + 1) * (n - 1) / 2 + 1) for e in range(2)] + [0.2 / n * (2 * (n - 1) / 2 + 1)]
check(
    "LearningRateWarmupCallback",
    np.allclose(history.history["lr"], want),
    f"{history.history['lr']} want {want}",
)

# ------------------------------------------------------------------ BestModelCheckpoint: rank 0 writes
path = os.path.join(scratch, f"best-{me}{checkpoint_suffix}")
model = linear_model(3)
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.05)), loss="mse", jit_compile=False)
model.fit(
    x,
    y,
    batch_size=4,
    epochs=2,
    verbose=0,
    callbacks=[
        hvd.callbacks.MetricAverageCallback(),
        hvd.callbacks.BestModelCheckpoint(monitor="loss", filepath=path),
    ],
)
check(
    "BestModelCheckpoint writes on rank 0 only",
    os.path.exists(path) == (me == 0),
    f"rank {me} exists={os.path.exists(path)}",
)

# ------------------------------------------------------------------ load_model keeps the optimizer state
saved = os.path.join(scratch, f"model{checkpoint_suffix}")
model = linear_model(4)
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse", jit_compile=False)
model.fit(
    x, y, batch_size=4, epochs=1, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)]
)
if me == 0:
    model.save(saved)
comm.Barrier()
loaded = hvd.load_model(saved)
opt = loaded.optimizer
check(
    "load_model wraps the optimizer", getattr(type(opt), "_ringtrain_distributed", False), type(opt).__mro__
)
check(
    "load_model keeps iterations",
    int(np.asarray(opt.iterations)) == int(np.asarray(model.optimizer.iterations)),
    f"{np.asarray(opt.iterations)}",
)
loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)
flat = np.concatenate([w.ravel() for w in loaded.get_weights()])
check(
    "load_model trains in step",
    all(np.array_equal(flat, other) for other in comm.allgather(flat)),
    "weights differ",
)

# ------------------------------------------------------------------ arguments that cannot be honoured
for name, make in {
    "op=hvd.Adasum": lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), op=hvd.Adasum),
    "backward_passes_per_step": lambda: hvd.DistributedOptimizer(
        keras.optimizers.SGD(0.1), backward_passes_per_step=0
    ),
    "custom compressor": lambda: hvd.DistributedOptimizer(
        keras.optimizers.SGD(0.1), compression=type("C", (), {"compress": 1, "decompress": 1})
    ),
    "filepath": lambda: hvd.callbacks.BestModelCheckpoint(monitor="loss"),
    "broadcast_global_variables": lambda: hvd.broadcast_global_variables(0),
}.items():
    try:
        make()
    except ringtrain.ConfigError as err:
        check(f"{name} error names it", name.split("=")[0] in str(err) or name in str(err), str(err))
    else:
        failures.append(f"{name}: no ConfigError")

if failures:
    print(f"rank {me}: {len(failures)} failure(s):\n  " + "\n  ".join(failures), flush=True)
    sys.exit(1)
if me == 0:
    print(f"HVD KERAS OK {flavour}", flush=True)
