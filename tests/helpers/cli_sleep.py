"""CLI fixture: each rank says it is ready, then sleeps until it is stopped."""

import os
import time

print(f"ready {os.environ['RANK']}", flush=True)
time.sleep(600)
