"""CLI fixture: rank 1 fails on the first attempt only; every rank reports its attempt."""

import sys

import ringtrain

print(f"attempt {ringtrain.restart_count()} job_dir {ringtrain.job_dir()}", flush=True)
if ringtrain.rank() == 1 and ringtrain.restart_count() == 0:
    sys.exit(3)
