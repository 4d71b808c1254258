"""Stage-level GPU scheduling: executors have (fake) GPUs, the session's tasks ask for none,
and only ringtrain's training stage asks for GPUs, through its own resource profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import wait_for_no_workers

# Each helper run starts a local-cluster (and, with --connect, a Connect server in front of
# it); on the shared 2-core machine that took up to 166 s.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")


def _report(directory, *args: str) -> dict:
    env = dict(os.environ, RINGTRAIN_FAKE_GPU_COUNTER=str(directory / "gpu-counter"))
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(HELPERS, "gpu_stage_job.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, proc.stderr[-3000:]
    assert not wait_for_no_workers(timeout=5.0)
    return json.loads(line.removeprefix("REPORT "))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stage-gpus")
    return _report(directory, str(directory))


def _assert_four_distinct_gpus(views):
    assert [v["rank"] for v in views] == [0, 1, 2, 3]
    assert sorted(v["cuda"] for v in views) == ["0", "1", "2", "3"]
    assert all(v["communication"] == "NCCL" for v in views)


def test_each_of_four_workers_gets_its_own_gpu_without_a_session_gpu_amount(report):
    _assert_four_distinct_gpus(report["four"])


def test_too_many_workers_name_the_gpus(report):
    assert report["too_many"].startswith("ResourceError: num_proc=6 asks for 6 GPUs")
    assert "(4 GPUs)" in report["too_many"]


def test_a_plain_job_runs_while_training_holds_every_gpu(report):
    held = report["held"]
    assert "error" not in held, held["error"]
    assert held["holding"], "the training workers never started"
    # Two workers with two GPUs each: together every GPU of the cluster.
    assert sorted(held["cuda"]) == ["0,1", "2,3"]
    # The plain job needs no GPU, so it ran on the free cores before training let go.
    assert held["plain_sum"] == sum(range(100))
    assert held["training_still_holding"]


def test_a_connect_session_gets_stage_level_gpus_too(tmp_path):
    report = _report(tmp_path, "--connect")
    _assert_four_distinct_gpus(report["four"])
    assert report["too_many"].startswith("ResourceError: num_proc=6 asks for 6 GPUs")
