"""Pure launcher logic: task layout, GPU amounts, noise filter, worker environment."""

import os
import pickle
import signal
import socket

import pytest

from ringtrain.backends.tf import communication, gpu_assigned
from ringtrain.config import JobConfig
from ringtrain.errors import ConfigError, Failure, ResourceError, WorkerError
from ringtrain.launcher import ports
from ringtrain.launcher.agent import TaskJob, is_tf_noise, worker_environ
from ringtrain.launcher.driver import _keras_env
from ringtrain.launcher.ports import PortReservation, release_all, reserve_ports
from ringtrain.launcher.spark import ClusterConf, gpus_per_executor, gpus_per_task, layout_for
from ringtrain.rendezvous import TaskOffer, plan


def test_layout_on_cpu():
    assert layout_for(2, slots=4, per_task=0).num_tasks == 2
    assert layout_for(None, slots=3, per_task=0).num_proc == 3
    with pytest.raises(ResourceError, match=r"num_proc=5 needs 5 .* cluster has 2"):
        layout_for(5, slots=2, per_task=0)
    with pytest.raises(ResourceError, match="no free task slots"):
        layout_for(None, slots=0, per_task=0)


def test_layout_on_gpu():
    layout = layout_for(4, slots=2, per_task=2)
    assert (layout.num_tasks, layout.num_proc) == (2, 4)
    assert layout_for(None, slots=2, per_task=2).num_proc == 4
    with pytest.raises(ResourceError, match=r"asks for 6 GPUs.*\(4 GPUs\)"):
        layout_for(6, slots=2, per_task=2)
    with pytest.raises(ConfigError, match="not a multiple"):
        layout_for(3, slots=2, per_task=2)
    two_gpu_workers = layout_for(2, slots=2, per_task=4, gpus_per_worker=2)
    assert (two_gpu_workers.num_tasks, two_gpu_workers.workers_per_task) == (1, 2)


def test_gpu_amounts():
    assert gpus_per_task(None) == 0
    assert gpus_per_task("2") == 2
    assert gpus_per_task("1.0") == 1
    with pytest.raises(ConfigError, match="whole number"):
        gpus_per_task("0.5")
    assert gpus_per_task("0.0") == 0
    assert gpus_per_executor(None) == 0
    assert gpus_per_executor("4") == 4


@pytest.mark.parametrize("value", ["one", "nan", "inf", "-1", "1,5"])
def test_a_gpu_amount_that_is_no_number_names_the_setting(value):
    with pytest.raises(ConfigError, match=rf"spark\.task\.resource\.gpu\.amount='{value}'"):
        gpus_per_task(value)
    with pytest.raises(ConfigError, match=rf"spark\.executor\.resource\.gpu\.amount='{value}'"):
        gpus_per_executor(value)


def test_an_executor_holds_whole_gpus():
    with pytest.raises(ConfigError, match=r"spark\.executor\.resource\.gpu\.amount='1.5' is not a whole"):
        gpus_per_executor("1.5")


def test_the_session_reader_refuses_a_bad_executor_gpu_amount():
    class _Conf:
        def get(self, key, default=None):
            return {"spark.master": "yarn", "spark.executor.resource.gpu.amount": "two"}.get(key, default)

    class _Session:
        conf = _Conf()

    with pytest.raises(ConfigError, match=r"spark\.executor\.resource\.gpu\.amount='two'"):
        ClusterConf.read(_Session())


def test_tf_noise_filter_drops_startup_lines_only():
    noise = [
        "I0000 00:00:1795320329.774868    3617 port.cc:153] oneDNN custom operations are on.",
        "W0000 00:00:1795320329.776125    3617 cudart_stub.cc:31] Could not find cuda drivers",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "E0000 00:00:1795320128.060025    2695 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    ]
    kept = [
        "E0000 00:00:1795320128.060025    2695 collective_ops.cc:12] Collective op failed",
        "Traceback (most recent call last):",
        "I love this model",
    ]
    assert all(is_tf_noise(line) for line in noise)
    assert not any(is_tf_noise(line) for line in kept)


def test_communication_choice():
    assert communication(gpu_assigned=True) == "NCCL"
    assert communication(gpu_assigned=False) == "RING"
    assert gpu_assigned({"CUDA_VISIBLE_DEVICES": "1"})
    assert not gpu_assigned({"CUDA_VISIBLE_DEVICES": ""})
    assert not gpu_assigned({})


def test_worker_environ_places_worker_and_keeps_user_env():
    spec = plan([TaskOffer(0, "h", (7,), ("3",))])[0]
    job = TaskJob(("h", 1), b"s", "tf", b"", {"MY_VAR": "x", "TF_USE_LEGACY_KERAS": "0"}, 1.0, False)
    env = worker_environ(job, spec)
    assert env["RANK"] == "0" and env["CUDA_VISIBLE_DEVICES"] == "3" and env["MY_VAR"] == "x"
    assert env["TF_USE_LEGACY_KERAS"] == "0" and env["TF_GRPC_REUSE_PORT"] == "1"


@pytest.mark.parametrize("backend", ["tf", "mpi"])
def test_workers_get_tf_keras_by_default_on_every_backend(monkeypatch, backend):
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    assert _keras_env(JobConfig(backend=backend)) == {"TF_USE_LEGACY_KERAS": "1"}
    assert _keras_env(JobConfig(backend=backend, legacy_keras=False)) == {"TF_USE_LEGACY_KERAS": "0"}
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "0")  # the user's own choice wins
    assert _keras_env(JobConfig(backend=backend)) == {"TF_USE_LEGACY_KERAS": "0"}


def test_reserved_port_refuses_other_programs_but_hands_over_to_reuseport():
    with PortReservation() as reservation:
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("0.0.0.0", reservation.port))
        plain.close()
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("0.0.0.0", reservation.port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", reservation.port), timeout=5)
        accepted, _ = server.accept()
        accepted.close()
        client.close()
        server.close()


def test_config_validation():
    with pytest.raises(ConfigError, match="num_proc must be >= 1, got 0"):
        JobConfig(num_proc=0)
    with pytest.raises(ConfigError, match="num_proc must be an int"):
        JobConfig(num_proc=True)
    with pytest.raises(ConfigError, match="unknown backend 'horovod'"):
        JobConfig(backend="horovod")


def test_config_from_env_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_KILL_GRACE", "-1")
    with pytest.raises(ConfigError, match="RINGTRAIN_KILL_GRACE='-1'"):
        JobConfig.from_env()
    monkeypatch.setenv("RINGTRAIN_KILL_GRACE", "0.5")
    monkeypatch.setenv("RINGTRAIN_LEGACY_KERAS", "maybe")
    with pytest.raises(ConfigError, match="RINGTRAIN_LEGACY_KERAS"):
        JobConfig.from_env()


def test_errors_survive_pickling():
    failure = Failure(rank=1, host="h", exitcode=None, signal_name="SIGKILL", traceback="")
    err = pickle.loads(pickle.dumps(WorkerError([failure])))
    assert err.ranks == [1]
    assert "rank 1 on h was killed by signal SIGKILL" in str(err)
    assert err.exitcode == 128 + signal.SIGKILL
    config_err = pickle.loads(pickle.dumps(ConfigError("bad")))
    assert isinstance(config_err, ValueError) and str(config_err) == "bad"


def test_script_task_runs_its_shipped_copy_where_the_path_is_missing(tmp_path, monkeypatch, capsys):
    from ringtrain.worker import ScriptTask

    script = tmp_path / "train.py"
    script.write_text("import sys\nprint('ran', sys.argv[1:])\n")
    task = ScriptTask.from_path(str(script), ("--epochs", "2"))
    script.unlink()  # as on an executor host that never had the file
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("RINGTRAIN_WORKDIR", str(workdir))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("sys.argv", ["pytest"])
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    task()
    assert capsys.readouterr().out == "ran ['--epochs', '2']\n"
    assert (workdir / "script-0" / "train.py").exists()


def test_with_parent_death_kills_the_command_when_its_starter_is_killed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from ringtrain.launcher.workers import with_parent_death

    pidfile = tmp_path / "child.pid"
    # A stand-in agent: starts a long sleep the way the agent starts mpiexec and proxies.
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from ringtrain.launcher.workers import with_parent_death\n"
            "child = subprocess.Popen(with_parent_death(['/bin/sleep', '300']), start_new_session=True)\n"
            f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(300)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        # The wrapper sets the parent-death signal, then execs the command in place (same pid).
        deadline = time.monotonic() + 10
        while True:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0]
            if program == b"/bin/sleep" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert program == b"/bin/sleep", f"pid {child} still runs {program!r}"
        starter.kill()  # SIGKILL: no clean-up code runs in the "agent"
        starter.wait()
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        alive = os.path.exists(f"/proc/{child}")
        if alive:
            with open(f"/proc/{child}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        assert not alive, "the command outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
    assert with_parent_death(["x"])[-1] == "x"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failed_reservation_releases_every_port_already_held(monkeypatch):
    made = []

    class _Socket(socket.socket):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

        def bind(self, address):
            if len(made) == 3:
                raise OSError(98, "Address already in use")
            super().bind(address)

    monkeypatch.setattr(ports.socket, "socket", _Socket)
    with pytest.raises(OSError, match="already in use"):
        reserve_ports(4)
    assert len(made) == 3
    assert all(sock.fileno() == -1 for sock in made)  # the two held and the failed one


def test_many_reservations_leave_no_descriptor_behind():
    before = _open_fds()
    for _ in range(50):
        release_all(reserve_ports(4))
    assert _open_fds() == before


def test_omp_threads_split_the_tasks_cpus_among_its_workers():
    from ringtrain.launcher.agent import omp_threads

    assert omp_threads("1", task_workers=1, host_cpus=16) == 1  # PySpark's spark.task.cpus
    assert omp_threads("8", task_workers=2, host_cpus=16) == 4
    assert omp_threads("1", task_workers=4, host_cpus=16) == 1  # never 0
    # No value from the task: the host's cores, split among the task's workers.
    assert omp_threads(None, task_workers=4, host_cpus=16) == 4
    assert omp_threads("junk", task_workers=3, host_cpus=2) == 1


def test_workers_never_inherit_an_unset_or_whole_task_omp_num_threads(monkeypatch):
    offers = [TaskOffer(0, "h", (7, 8), ("0", "1")), TaskOffer(1, "h", (9, 10), ("2", "3"))]
    specs = plan(offers)
    job = TaskJob(("h", 1), b"s", "tf", b"", {}, 1.0, False)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # a task of 6 CPUs running 2 workers
    assert worker_environ(job, specs[0], task_workers=2)["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert worker_environ(job, specs[0], task_workers=2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    # RINGTRAIN_TF_THREADS (or the user's worker env) sets it: that value is kept.
    chosen = TaskJob(("h", 1), b"s", "tf", b"", {"OMP_NUM_THREADS": "5"}, 1.0, False)
    assert worker_environ(chosen, specs[0], task_workers=2)["OMP_NUM_THREADS"] == "5"


def test_error_line_picks_the_python_exception_a_spark_error_quotes():
    from ringtrain.launcher import driver, spark

    quoted = (
        "py4j.protocol.Py4JJavaError: An error occurred while calling o42.collect.\n"
        "org.apache.spark.SparkException: Job aborted due to stage failure: Task 1 failed\n"
        '  File "agent.py", line 9, in run\n'
        "ValueError: rank 1 ran out of data\n"
    )
    assert spark.error_line(RuntimeError(quoted)) == "ValueError: rank 1 ran out of data"
    assert spark.error_line(RuntimeError("refused\nmore")) == "refused"
    assert spark.error_line(RuntimeError("")) == "RuntimeError"
    assert not hasattr(driver, "_first_line")  # one home: the driver uses spark.error_line
