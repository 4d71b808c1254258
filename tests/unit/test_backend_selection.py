"""backend="auto": the choice, and the fallback when the first backend cannot start."""

import logging

import pytest

from ringtrain import backends
from ringtrain.config import JobConfig
from ringtrain.errors import BackendStartError
from ringtrain.launcher import driver, spark


def test_candidates():
    assert backends.candidates("auto", gpus_assigned=True, mpi_available=True) == ["tf", "mpi"]
    assert backends.candidates("auto", gpus_assigned=False, mpi_available=True) == ["mpi", "tf"]
    assert backends.candidates("auto", gpus_assigned=False, mpi_available=False) == ["tf"]
    assert backends.candidates("auto", gpus_assigned=True, mpi_available=False) == ["tf"]
    # A named backend is never swapped for another.
    assert backends.candidates("mpi", gpus_assigned=True, mpi_available=False) == ["mpi"]
    assert backends.candidates("tf", gpus_assigned=False, mpi_available=True) == ["tf"]


def test_mpi_is_found_in_this_environment():
    assert backends.mpi_installed()


@pytest.fixture
def fake_cluster(monkeypatch, tmp_path):
    """Replaces Spark with a 2-slot CPU cluster and records each backend launched."""
    tried = []

    class _Conf:
        def get(self, key, default=None):
            return {"spark.master": "local[2]"}.get(key, default)

    class _Session:
        conf = _Conf()

    def launch_once(session, layout, config, *rest):
        tried.append(config.backend)
        if config.backend in fake_cluster_failing:
            raise BackendStartError(f"{config.backend} is broken here")
        return {0: b"ok"}

    fake_cluster_failing: set[str] = set()
    monkeypatch.setattr(driver, "default_job_dir", lambda: tmp_path)
    monkeypatch.setattr(spark, "get_session", lambda config: _Session())
    monkeypatch.setattr(spark, "preflight", lambda session, config: spark.Layout(2, 1, False))
    monkeypatch.setattr(backends, "mpi_installed", lambda: True)
    monkeypatch.setattr(driver, "_launch_once", launch_once)
    return tried, fake_cluster_failing


def test_auto_falls_back_and_logs_why(fake_cluster, caplog):
    tried, failing = fake_cluster
    failing.add("mpi")
    with caplog.at_level(logging.WARNING, logger="ringtrain.launcher.driver"):
        assert driver.launch(JobConfig(num_proc=2, backend="auto"), b"") == {0: b"ok"}
    assert tried == ["mpi", "tf"]
    assert "backend 'mpi' could not start (mpi is broken here); falling back to 'tf'" in caplog.text


def test_named_backend_never_falls_back(fake_cluster):
    tried, failing = fake_cluster
    failing.add("mpi")
    with pytest.raises(BackendStartError, match="mpi is broken here"):
        driver.launch(JobConfig(num_proc=2, backend="mpi"), b"")
    assert tried == ["mpi"]


def test_auto_raises_when_every_backend_fails(fake_cluster):
    tried, failing = fake_cluster
    failing.update({"mpi", "tf"})
    with pytest.raises(BackendStartError, match="tf is broken here"):
        driver.launch(JobConfig(num_proc=2), b"")
    assert tried == ["mpi", "tf"]
