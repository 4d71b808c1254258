"""ringtrain.horovod: per-name checks under mpiexec, Horovod's TF2 examples three ways, spark.run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import pids_matching

import ringtrain
import ringtrain.horovod.spark

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"
EXAMPLES = ROOT / "examples" / "horovod"
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
BENCHMARK_ARGS = [
    "--no-cuda",
    "--model",
    "MobileNetV3Small",
    "--batch-size",
    "4",
    "--num-warmup-batches",
    "1",
    "--num-batches-per-iter",
    "2",
    "--num-iters",
    "2",
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    for name in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE", "RINGTRAIN_NP", "RINGTRAIN_MASTER"):
        env.pop(name, None)
    env.update(extra)
    return env


def mpirun(
    *argv: str, timeout: float = 240, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    cmd = [MPIEXEC, "-n", "2", sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=cwd)


def _no_rank_left(pattern: str) -> None:
    deadline = time.monotonic() + 5
    while pids_matching(pattern) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_matching(pattern), f"processes running {pattern} outlived the job"


def test_tensorflow_names_match_mpi4py():
    proc = mpirun(str(HELPERS / "hvd_collectives.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "HVD OK size=2" in proc.stdout


@pytest.mark.parametrize("flavour", ["legacy", "keras3"])
def test_keras_names_match_numpy_and_mpi4py(flavour, tmp_path):
    proc = mpirun(str(HELPERS / "hvd_keras.py"), flavour, str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"HVD KERAS OK {flavour}" in proc.stdout


def test_synthetic_benchmark_runs_under_mpiexec():
    script = str(EXAMPLES / "tensorflow2_synthetic_benchmark.py")
    proc = mpirun(script, *BENCHMARK_ARGS, "--fp16-allreduce", TF_USE_LEGACY_KERAS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "Number of CPUs: 2" in proc.stdout
    assert "Total img/sec on 2 CPU(s)" in proc.stdout
    _no_rank_left("tensorflow2_synthetic_benchmark.py")


def test_keras_mnist_runs_under_mpiexec(tmp_path):
    import offline_mnist

    npz = offline_mnist.write_npz(str(tmp_path / "mnist.npz"))
    script = str(EXAMPLES / "tensorflow2_keras_mnist.py")
    proc = mpirun(
        str(HELPERS / "offline_mnist.py"),
        script,
        "--epochs",
        "3",
        "--steps-per-epoch",
        "8",
        cwd=tmp_path,
        MNIST_NPZ=npz,
        TF_USE_LEGACY_KERAS="1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "Epoch 3: finished gradual learning rate warmup to 0.002." in proc.stdout
    # rank 0 alone writes a checkpoint per epoch
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.h5")) == [
        f"checkpoint-{e}.h5" for e in (1, 2, 3)
    ]


@pytest.mark.usefixtures("no_leftover_workers")
def test_synthetic_benchmark_runs_under_ringtrain_launch():
    script = str(EXAMPLES / "tensorflow2_synthetic_benchmark.py")
    cmd = [
        sys.executable,
        "-m",
        "ringtrain",
        "launch",
        "-np",
        "2",
        "--backend",
        "mpi",
        script,
        *BENCHMARK_ARGS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[0] Number of CPUs: 2" in proc.stdout
    assert "[0] Total img/sec on 2 CPU(s)" in proc.stdout


def _spark_fn(scale, offset=0.0):
    import tensorflow as tf

    import ringtrain.horovod.tensorflow as hvd

    hvd.init()
    total = hvd.allreduce(tf.constant([float(hvd.rank() + 1)]), op=hvd.Sum).numpy()[0]
    last = int(hvd.join())
    return {
        "rank": hvd.rank(),
        "size": hvd.size(),
        "value": float(total) * scale + offset,
        "last_joined": last,
        "env": os.environ.get("HVD_SPARK_TEST"),
    }


@pytest.mark.usefixtures("spark", "no_leftover_workers")
def test_spark_run_returns_every_rank_in_rank_order():
    results = ringtrain.horovod.spark.run(
        _spark_fn, args=(2.0,), kwargs={"offset": 1.0}, num_proc=2, env={"HVD_SPARK_TEST": "set"}
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["size"] == 2 and r["value"] == 7.0 and r["env"] == "set" for r in results), results
    assert {r["last_joined"] for r in results} == {1}, results
