"""Run under ``mpiexec -n 2``: inside tf.function, gradient buckets are reduced during backprop.

A three-layer model whose first layer's backward pass is slowed (0.4 s) by a custom
gradient. With one bucket per layer, the last layer's bucket must be handed to the
communication thread before that slow backward step ends, and the first layer's after.
The graph must chain the stateful start ops in program order (TF's automatic control
dependencies), which keeps every rank's MPI order identical. Prints "OVERLAP OK" on
rank 0; exits 1 otherwise.
"""

import os
import sys
import time

os.environ["RINGTRAIN_FUSION_THRESHOLD"] = "300K"  # one 256 KiB weight per bucket

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# The slow step below sleeps, which holds its TF thread (real compute would not need this);
# a second thread lets the start ops run meanwhile.
tf.config.threading.set_inter_op_parallelism_threads(2)

import ringtrain  # noqa: E402
from ringtrain.collectives import _tf  # noqa: E402

rank = ringtrain.rank()
events: list[tuple[str, float]] = []
submit = _tf.submit_allreduce


def recording_submit(arrays, op, what, compression=None):
    events.append((what, time.perf_counter()))
    return submit(arrays, op, what, compression)


_tf.submit_allreduce = recording_submit


def slow(x):
    time.sleep(0.4)
    events.append(("slow backward done", time.perf_counter()))
    return x


@tf.custom_gradient
def slow_backward(x):
    def grad(dy):
        out = tf.numpy_function(slow, [dy], Tout=tf.float32, stateful=False)
        out.set_shape(dy.shape)
        return out

    return tf.identity(x), grad


ws = [tf.Variable(np.full((256, 256), 0.01 * (i + 1), np.float32)) for i in range(3)]
x = tf.constant(np.full((4, 256), float(rank + 1), np.float32))


@tf.function
def step():
    with tf.GradientTape() as tape:
        h = slow_backward(x @ ws[0])
        h = h @ ws[1]
        loss = tf.reduce_sum(h @ ws[2])
    return ringtrain.DistributedGradientTape(tape).gradient(loss, ws)


failures = []
step()  # trace and warm up
events.clear()
grads = step()
names = [w for w, _ in events]
when = dict(events)
want = ["DistributedGradientTape[1/3]", "DistributedGradientTape[2/3]", "DistributedGradientTape[3/3]"]
if [n for n in names if n != "slow backward done"] != want:
    failures.append(f"buckets submitted as {names}")
elif not when[want[0]] < when["slow backward done"] < when[want[2]]:
    failures.append(f"no overlap: {events}")

# The start ops, in program order, each carry a control edge from the one before.
graph = step.get_concrete_function().graph
starts = [op for op in graph.get_operations() if op.type == "PyFunc" and "ringtrain_start" in op.name]
waits = [op for op in graph.get_operations() if op.type == "PyFunc" and "ringtrain_wait" in op.name]
if len(starts) != 3 or len(waits) != 1:
    failures.append(f"expected 3 start ops and 1 wait op, got {[op.name for op in starts + waits]}")
else:
    chain = starts + waits
    for before, after in zip(chain, chain[1:], strict=False):
        if before not in after.control_inputs:
            failures.append(f"{after.name} does not wait for {before.name}: {after.control_inputs}")

# The results are the averages, identical on both ranks.
gathered = ringtrain.allgather(np.concatenate([g.numpy().ravel() for g in grads])[None, :])
with tf.GradientTape() as tape:
    mean_x = tf.constant(np.full((4, 256), 1.5, np.float32))
    loss = tf.reduce_sum(mean_x @ ws[0] @ ws[1] @ ws[2])
reference = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, ws)])
if not np.array_equal(gathered[0], gathered[1]) or not np.allclose(gathered[0], reference, rtol=1e-5):
    failures.append("gradients are not the ranks' average")

if failures:
    print(f"rank {rank}: " + "; ".join(failures), flush=True)
    sys.exit(1)
if rank == 0:
    print("OVERLAP OK " + " ".join(f"{w}@{t - events[0][1]:.3f}" for w, t in events), flush=True)
