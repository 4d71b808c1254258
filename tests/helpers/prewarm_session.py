"""Runs one job with spare task agents on its own local[2] session, then stops the session.

Prints one JSON line, ``{"keepers": [...], "waiting": [...]}``: the spare keepers and their
waiting workers alive just before ``SparkSession.stop()``. The caller checks that they end
with the session (test_prewarm.py).
"""

from __future__ import annotations

import json
import os
import sys
import time

from procs import KEEPER, WORKER, pids_matching

import ringtrain
from ringtrain.launcher.spark import loopback_session


def _imports_numpy():
    import numpy  # noqa: F401  (so the spares import it ahead)

    return os.getpid()


def _spares(count: int, timeout: float = 60.0) -> tuple[list[int], list[int]]:
    deadline = time.monotonic() + timeout
    while True:
        keepers = sorted(set(pids_matching(f"{KEEPER} ")) & set(pids_matching("--spare")))
        waiting = sorted(pids_matching(f"{WORKER} --placement"))
        if (len(keepers) >= count and len(waiting) >= count) or time.monotonic() >= deadline:
            return keepers, waiting
        time.sleep(0.1)


def main() -> None:
    os.environ["RINGTRAIN_PREWARM"] = "1"
    spark = loopback_session("local[2]", "ringtrain-prewarm-session")
    ringtrain.run(_imports_numpy, num_proc=2, backend="tf")
    keepers, waiting = _spares(2)
    print(json.dumps({"keepers": keepers, "waiting": waiting}), flush=True)
    spark.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
