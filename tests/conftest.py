"""Shared fixtures: a warm local Spark session and a check that no worker outlives a test."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid

import pytest

# Keep multi-process tests small and quiet: one TF thread per worker.
os.environ.setdefault("RINGTRAIN_TF_THREADS", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# Every process this session starts inherits this marker (see helpers/procs.py).
os.environ["RINGTRAIN_TEST_SESSION"] = uuid.uuid4().hex
# Jobs keep their default job directory (ringtrain-jobs/... under the temp directory) for
# their logs, and the suite runs hundreds of jobs: everything temporary of this session (job
# directories, pytest's tmp_path folders) goes into one directory, removed when it ends.
_SESSION_TMP = tempfile.mkdtemp(prefix="ringtrain-tests-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None  # this process reads TMPDIR again too

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "helpers"))
# Workers unpickle functions defined in test modules by module name, so the test
# folders must be importable in the Spark executors (which inherit this environment).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(_HERE, "integration"), os.path.join(_HERE, "helpers")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


@pytest.fixture(scope="session")
def spark():
    from ringtrain.launcher.spark import loopback_session

    session = loopback_session("local[2]", "ringtrain-tests")
    yield session
    session.stop()


@pytest.fixture
def no_leftover_workers():
    """Fails the test if any worker or keeper process it started is still alive afterwards."""
    from procs import KEEPER, wait_for_no_workers, worker_pids

    before = set(worker_pids()) | set(worker_pids(KEEPER))
    yield
    left = wait_for_no_workers(exclude=before, timeout=2.0)
    left += wait_for_no_workers(exclude=before, timeout=2.0, pattern=KEEPER)
    assert not left, f"worker or keeper processes outlived the job: {left}"


def pytest_unconfigure(config):
    """Remove the session's temp directory (the jobs' directories) once every fixture ended."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
