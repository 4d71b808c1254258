"""GPU assignment on local-cluster[2,2,1024] with a fake discovery script (no real GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import wait_for_no_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")


def _run_job(tmp_path, num_proc: int) -> str:
    env = dict(os.environ, RINGTRAIN_FAKE_GPU_COUNTER=str(tmp_path / "gpu-counter"))
    proc = subprocess.run(
        [sys.executable, os.path.join(HELPERS, "gpu_cluster_job.py"), str(num_proc)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_each_worker_sees_one_distinct_gpu(tmp_path):
    out = _run_job(tmp_path, 4)
    line = next(line for line in out.splitlines() if line.startswith(("RESULT ", "ERROR ")))
    assert line.startswith("RESULT "), line
    views = json.loads(line.removeprefix("RESULT "))
    assert [v["rank"] for v in views] == [0, 1, 2, 3]
    assert sorted(v["cuda"] for v in views) == ["0", "1", "2", "3"]
    # Each task runs one worker per GPU it holds, ranked by (partition, local index).
    assert [v["cuda"] for v in views[:2]] in (["0", "1"], ["2", "3"])
    assert all(v["communication"] == "NCCL" for v in views)
    assert not wait_for_no_workers(timeout=2.0)


def test_more_workers_than_gpus_fails_fast_naming_gpus(tmp_path):
    out = _run_job(tmp_path, 6)
    assert "ERROR ResourceError: num_proc=6 asks for 6 GPUs" in out
    assert "(4 GPUs)" in out
