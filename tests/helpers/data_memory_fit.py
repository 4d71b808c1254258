"""Train over a shard bigger than this process may allocate.

Usage: data_memory_fit.py CAP_BYTES DATA_DIR SHARD_BYTES BATCH
Caps the process's private memory (RLIMIT_DATA: heap and anonymous mappings; file
mappings do not count) at CAP_BYTES, shows that SHARD_BYTES cannot be allocated, then
runs one tf-keras epoch over the shard in DATA_DIR. Prints one JSON line.
"""

import json
import os
import resource
import sys

cap, directory, shard_bytes, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
try:
    bytearray(shard_bytes)
    cap_holds = False
except MemoryError:
    cap_holds = True

os.environ.update(RINGTRAIN_DATA_DIR=directory, RANK="0", SIZE="1", TF_USE_LEGACY_KERAS="1")
import tensorflow as tf  # noqa: E402

import ringtrain  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
shard = ringtrain.data.shard()
model = tf.keras.Sequential([tf.keras.Input(shard.column_type("x")[1]), tf.keras.layers.Dense(1)])
model.compile(optimizer=tf.keras.optimizers.SGD(1e-4), loss="mse")
ds = shard.to_tf_dataset(batch, columns="x", label="y")
history = model.fit(ds, epochs=1, verbose=0)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(
    json.dumps(
        {
            "cap_holds": cap_holds,
            "steps": int(model.optimizer.iterations.numpy()),
            "expected_steps": shard.steps_per_epoch(batch),
            "rows": shard.num_rows,
            "loss": history.history["loss"][-1],
            "peak_rss_kb": int(status["VmHWM"].split()[0]),
        }
    )
)
