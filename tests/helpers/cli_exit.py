"""CLI fixture: rank 1 exits with the code given as argv[1]; the others wait to be stopped."""

import os
import sys
import time

if os.environ["RANK"] == "1":
    sys.exit(int(sys.argv[1]))
time.sleep(600)
