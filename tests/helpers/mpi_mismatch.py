"""Run under ``mpiexec -n 2``: mismatched collectives raise BackendError on every rank.

Prints one "MISMATCH <case>: <message>" line per case and rank, then "MISMATCH OK rank R"
once a correct collective still works afterwards. Exits 1 if a case does not raise.
"""

import sys

import numpy as np

import ringtrain
from ringtrain import collectives as rc
from ringtrain.collectives import _engine

rank = ringtrain.rank()
cases = {
    "shape": lambda: rc.allreduce(np.ones(4 - rank, np.float32)),
    "dtype": lambda: rc.allreduce(np.ones(4, np.float32 if rank == 0 else np.float64)),
    "count": lambda: rc.grouped_allreduce([np.ones(2, np.float32)] * (2 + rank)),
    "op": lambda: rc.allreduce(np.ones(2, np.float32), op=rc.Sum if rank == 0 else rc.Max),
    "root": lambda: rc.broadcast(np.ones(2, np.float32), root_rank=rank),
    "allgather": lambda: rc.allgather(np.ones((2, 3 + rank), np.int32)),
    "compression": lambda: _engine.fused_allreduce(
        [np.ones(4, np.float32)], rc.Sum, "gradients", "fp16" if rank == 0 else None
    ),
}
for name, fn in cases.items():
    try:
        fn()
    except ringtrain.BackendError as err:
        print(f"MISMATCH {name}: {err}", flush=True)
    else:
        print(f"rank {rank}: case {name} did not raise", flush=True)
        sys.exit(1)
total = rc.allreduce(np.ones(3, np.float32), op=rc.Sum)
if not np.array_equal(total, np.full(3, ringtrain.size(), np.float32)):
    sys.exit(1)
print(f"MISMATCH OK rank {rank}", flush=True)
