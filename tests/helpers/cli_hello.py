"""CLI fixture: each rank prints its placement, argv and a --env variable, then exits 0."""

import json
import os
import sys

rank = int(os.environ["RANK"])
workers = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
print(f"hello rank={rank} size={os.environ['SIZE']} workers={len(workers)} argv={sys.argv[1:]}")
print(f"GREETING={os.environ.get('GREETING')}")
print(f"to stderr from {rank}", file=sys.stderr)
