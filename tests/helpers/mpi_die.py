"""Run under ``mpiexec -n 2``: rank 1 dies while rank 0 waits in an allreduce.

The MPI launcher must then end the whole job; rank 0 never gets past the allreduce.
"""

import os

import numpy as np

import ringtrain
from ringtrain import collectives as rc

rc.allreduce(np.ones(4, np.float32))  # the world works
print(f"DIE ready rank {ringtrain.rank()}", flush=True)
if ringtrain.rank() == 1:
    os._exit(3)
rc.allreduce(np.ones(1 << 20, np.float32))
print("DIE rank 0 passed the allreduce: should not happen", flush=True)
