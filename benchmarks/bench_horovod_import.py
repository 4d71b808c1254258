"""Start-up cost of a Horovod-style tf-keras script: import times in fresh interpreters.

Each repeat starts a new Python with ``TF_USE_LEGACY_KERAS=1`` (as ringtrain workers
have) and times ``import tensorflow``, then ``import ringtrain.horovod.tensorflow.keras``
and its first callback, says whether Keras 3 was imported on the way, and then times
``import keras`` (Keras 3), the cost the callbacks paid when they were built on Keras 3.

    python -m benchmarks.bench_horovod_import --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import tensorflow as tf
t1 = time.perf_counter()
import ringtrain.horovod.tensorflow.keras as hvd
t2 = time.perf_counter()
hvd.callbacks.BroadcastGlobalVariablesCallback(0)
t3 = time.perf_counter()
keras3_imported = "keras.src" in sys.modules
import keras  # what building the callbacks on Keras 3's base class used to add
t4 = time.perf_counter()
print(json.dumps({"tensorflow": t1 - t0, "horovod_module": t2 - t1, "first_callback": t3 - t2,
                  "keras3_import": t4 - t3, "keras3_imported": keras3_imported}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for key in ("tensorflow", "horovod_module", "first_callback", "keras3_import"):
        values = [r[key] for r in runs]
        median = statistics.median(values)
        print(f"{key:16s} median {median:.3f} s  min {min(values):.3f}  max {max(values):.3f}")
    print(f"keras3 imported: {sorted({r['keras3_imported'] for r in runs})}")


if __name__ == "__main__":
    main()
