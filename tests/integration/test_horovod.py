"""ringtrain.horovod: per-name checks, the Horovod-API examples under mpiexec and launch, spark.run."""

from __future__ import annotations

import os
import re
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
BENCHMARK_ARGS = ["--batch", "8", "--warmup-steps", "1", "--steps", "3", "--rounds", "2"]
RATE_LINE = re.compile(r"rank (\d): ([\d.]+) img/s \(rounds ")
TOTAL_LINE = re.compile(r"total: ([\d.]+) img/s on 2 ranks")


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


def _check_benchmark_output(stdout: str, prefix: str = "") -> None:
    """Both ranks timed themselves, the total is their sum, and the broadcast made them agree."""
    rates = {int(rank): float(rate) for rank, rate in RATE_LINE.findall(stdout)}
    assert sorted(rates) == [0, 1], stdout
    total = TOTAL_LINE.search(stdout)
    assert total, stdout
    assert float(total.group(1)) == pytest.approx(sum(rates.values()), abs=0.15), stdout
    assert min(rates.values()) > 0, stdout
    assert (
        f"{prefix}weights differed across ranks before the first step: True; identical after training: True"
        in stdout
    ), stdout


def test_tape_benchmark_runs_under_mpiexec():
    proc = mpirun(str(EXAMPLES / "tape_benchmark.py"), *BENCHMARK_ARGS, "--fp16")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    _check_benchmark_output(proc.stdout)
    assert "fp16 gradients" in proc.stdout
    _no_rank_left("tape_benchmark.py")


def test_keras_digits_trains_and_checkpoints_on_rank_0_only(tmp_path):
    out = tmp_path / "ckpt"
    epochs = 5
    script = str(EXAMPLES / "keras_digits.py")
    proc = mpirun(script, "--epochs", str(epochs), "--accumulate", "2", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    before = float(re.search(r"accuracy before training: ([\d.]+)", proc.stdout).group(1))
    after = float(re.search(r"accuracy after training: ([\d.]+) on 359 digits", proc.stdout).group(1))
    # ten classes: an untrained model is near 0.1; the trained one is far above it
    assert before < 0.3, proc.stdout
    assert after > 0.85, proc.stdout
    # the warm-up reached 2 ranks x the 0.05 base rate at the end of its second epoch
    assert "Epoch 2: finished gradual learning rate warmup to 0.1." in proc.stdout
    # rank 0 alone prints the Keras progress and the accuracy lines
    assert proc.stdout.count("accuracy after training") == 1, proc.stdout
    assert proc.stdout.count(f"Epoch {epochs}/{epochs}") == 1, proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"digits-{e:02d}.h5" for e in range(1, epochs + 1)]
    assert not list(tmp_path.glob("*.h5")), "a checkpoint landed outside --out"
    # the last checkpoint is the trained model: it scores what rank 0 printed
    score = subprocess.run(
        [sys.executable, "-c", _SCORE_CHECKPOINT, str(EXAMPLES), str(out / f"digits-{epochs:02d}.h5")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert score.returncode == 0, score.stderr[-3000:]
    assert float(score.stdout.split()[-1]) == pytest.approx(after, abs=1e-3)


_SCORE_CHECKPOINT = """
import sys
sys.path.insert(0, sys.argv[1])
import keras_digits
import tensorflow as tf
_, _, x, y = keras_digits.split_digits(seed=0)
model = tf.keras.models.load_model(sys.argv[2], compile=False)
print((model.predict(x, verbose=0).argmax(axis=1) == y).mean())
"""


@pytest.mark.usefixtures("no_leftover_workers")
def test_tape_benchmark_runs_under_ringtrain_launch():
    script = str(EXAMPLES / "tape_benchmark.py")
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
    # ringtrain launch prefixes each worker's line with its rank
    assert "[1] rank 1: " in proc.stdout and "[0] total: " in proc.stdout, proc.stdout
    _check_benchmark_output(proc.stdout, prefix="[0] ")


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
