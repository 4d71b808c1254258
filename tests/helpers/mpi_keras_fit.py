"""Run under mpiexec: Keras model.fit with DistributedOptimizer on every rank.

Each rank seeds and draws its own data, so only the broadcast makes the initial
weights agree and only the averaged gradients keep them together. Prints
"KERAS OK <flavour>" on rank 0 when every rank ends with the same, trained weights.
Usage: mpi_keras_fit.py [keras3|legacy]
"""

import os
import sys

flavour = sys.argv[1] if len(sys.argv) > 1 else "keras3"
if flavour == "legacy":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ringtrain  # noqa: E402
import ringtrain.keras as rk  # noqa: E402
from ringtrain import collectives  # noqa: E402

if flavour == "legacy":
    keras = tf.keras
else:
    import keras

rank = ringtrain.rank()
tf.random.set_seed(100 + rank)
rng = np.random.default_rng(rank)
x = rng.standard_normal((64, 4)).astype(np.float32)
y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
opt = rk.DistributedOptimizer(keras.optimizers.Adam(0.01))
model.compile(optimizer=opt, loss="mse", jit_compile=False)
initial = [w.copy() for w in model.get_weights()]
history = model.fit(
    x,
    y,
    batch_size=16,
    epochs=2,
    verbose=0,
    callbacks=[rk.BroadcastGlobalVariablesCallback(0), rk.MetricAverageCallback()],
)
final = model.get_weights()
flat = np.concatenate([w.ravel() for w in final])
gathered = collectives.allgather(flat[None, :])
if not all(np.array_equal(gathered[0], g) for g in gathered):
    print(f"rank {rank}: weights differ across ranks", flush=True)
    sys.exit(1)
root_initial = collectives.broadcast(np.concatenate([w.ravel() for w in initial]), 0)
if np.allclose(root_initial, flat):
    print(f"rank {rank}: weights did not change", flush=True)
    sys.exit(1)
losses = collectives.allgather(np.array(history.history["loss"][-1:], np.float64))
if not np.all(losses == losses[0]):
    print(f"rank {rank}: averaged losses differ: {losses}", flush=True)
    sys.exit(1)
if rank == 0:
    print(f"KERAS OK {flavour} loss={losses[0]:.4f}", flush=True)
