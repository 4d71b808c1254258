"""Workers started ahead of their placement, and spare keepers between jobs (no Spark)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

from ringtrain.backends._hydra import _alive
from ringtrain.launcher.agent import TaskJob, early_environ, worker_environ
from ringtrain.launcher.workers import PLACEMENT_KEYS, ProcessGroup, WorkerPool
from ringtrain.protocol import WorkDir, write_atomic
from ringtrain.rendezvous import WorkerSpec
from ringtrain.worker import FunctionTask

pytestmark = pytest.mark.integration  # real worker processes


# Defined outside any module, so cloudpickle ships it by value to the worker.
_PROBE_SOURCE = """
import os, sys
def probe():
    return {
        "numpy_before_fn": "numpy" in sys.modules,
        "pid": os.getpid(),
        "rank": os.environ["RANK"],
        "preimport_left": os.environ.get("RINGTRAIN_PREIMPORT"),
    }
"""


def _probe():
    namespace: dict = {}
    exec(_PROBE_SOURCE, namespace)
    return namespace["probe"]


def _job(**kw):
    worker_env = {"RINGTRAIN_RESULTS": "all", "RINGTRAIN_JOB_DIR": "/tmp/job"}
    return TaskJob(("127.0.0.1", 1), b"s" * 32, "tf", b"", worker_env, 2.0, False, **kw)


def _spec(rank: int) -> WorkerSpec:
    return WorkerSpec(rank, 2, rank, 2, 0, "127.0.0.1", 7000 + rank, (), ("127.0.0.1:7000", "127.0.0.1:7001"))


def _run_group(tmp_path, pool, job, rank=1, preimport=""):
    """Place slot 0 of ``pool`` as ``rank``, running the probe; return what it reported."""
    files = WorkDir(tmp_path)
    write_atomic(files.payload, cloudpickle.dumps(FunctionTask(_probe())))
    group = ProcessGroup(
        [_spec(rank)],
        files,
        lambda r, s, line: None,
        lambda spec: worker_environ(job, spec, preimport=preimport),
        pool,
    )
    group.start()
    deadline = time.monotonic() + 60
    while not files.result(rank).exists():
        assert group.poll(rank) is None, files.error(rank).read_text() if files.error(rank).exists() else "?"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    files.release.touch()
    while group.poll(rank) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.poll(rank) == 0
    facts = pickle.loads(files.result(rank).read_bytes())
    group.stop(1.0)
    return facts, files


def test_a_worker_started_ahead_takes_its_placement_and_imports_ahead(tmp_path):
    job = _job()
    pool = WorkerPool()
    early = early_environ(job, (), preimport="numpy")
    assert not PLACEMENT_KEYS & set(early) and early["RINGTRAIN_PREIMPORT"] == "numpy"
    pool.prepare([early])
    started = pool._waiting[0].proc.pid
    facts, files = _run_group(tmp_path, pool, job, rank=1, preimport="numpy")
    assert facts["pid"] == started  # the very process started before the placement
    assert facts["rank"] == "1" and facts["numpy_before_fn"]  # placed, numpy imported ahead
    assert facts["preimport_left"] is None  # the worker's own setting, not fn's
    assert files.imports(1).read_text() == "numpy"  # what the next job's workers import ahead


def test_a_spare_started_with_another_environment_is_replaced(tmp_path):
    job = _job()
    pool = WorkerPool()
    other = dict(early_environ(job, ()), TF_NUM_INTRAOP_THREADS="7")
    pool.spare([other])
    stale = pool._waiting[0].proc
    facts, _ = _run_group(tmp_path, pool, job)
    assert not facts["numpy_before_fn"]
    assert facts["pid"] != stale.pid and stale.poll() is not None and pool.adopted == 0


def test_a_matching_spare_is_adopted(tmp_path):
    job = _job()
    pool = WorkerPool()
    pool.spare([early_environ(job, ())])
    spare = pool._waiting[0].proc.pid
    pool.prepare([early_environ(job, ())])
    facts, _ = _run_group(tmp_path, pool, job)
    assert facts["pid"] == spare and pool.adopted == 1


def test_workers_nobody_took_are_killed_and_exit_quietly_without_a_placement():
    pool = WorkerPool()
    pool.prepare([early_environ(_job(), ()), early_environ(_job(), ())])
    procs = [w.proc for w in pool._waiting.values()]
    pool.close()
    assert all(p.poll() is not None for p in procs)
    # Closing stdin instead (the agent went away) ends a waiting worker by itself, with 0.
    pool.prepare([early_environ(_job(), ())])
    waiting = pool.take(0, early_environ(_job(), ()))
    waiting.proc.stdin.close()
    assert waiting.proc.wait(30) == 0


def test_a_spare_keeper_serves_the_next_task_and_dies_with_its_python_worker(tmp_path):
    """A stand-in PySpark worker runs two tasks through keeper.run, then exits."""
    report = tmp_path / "report.json"
    script = textwrap.dedent(
        f"""
        import json, os, pickle, sys, threading, time
        import cloudpickle
        from ringtrain.backends._hydra import descendants
        from ringtrain.launcher import keeper
        from ringtrain.launcher.agent import TaskJob
        from ringtrain.launcher.channel import ChannelServer
        from ringtrain.protocol import Offer, Rendezvous, Release, Result
        from ringtrain.worker import FunctionTask

        def fn():
            numpy_ahead = "numpy" in sys.modules
            import numpy
            return {{"pid": os.getpid(), "numpy_ahead": numpy_ahead}}

        def driver(server, results):  # the rendezvous, then a release once the rank has a result
            while True:
                conn, message = server.inbox.get()
                if isinstance(message, Offer):
                    conn.send(Rendezvous((message.offer,)))
                elif isinstance(message, Result):
                    results.append(pickle.loads(message.data))
                    conn.send(Release())

        def waiting_workers(keeper_pid):
            deadline = time.monotonic() + 30
            while not descendants(keeper_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            return descendants(keeper_pid)

        facts = {{}}
        for attempt in (0, 1):
            server, results = ChannelServer(b"s" * 32), []
            threading.Thread(target=driver, args=(server, results), daemon=True).start()
            job = TaskJob(("127.0.0.1", server.port), b"s" * 32, "tf",
                          cloudpickle.dumps(FunctionTask(fn)), {{"RINGTRAIN_RESULTS": "all"}}, 2.0, False,
                          prewarm=True)
            spare = keeper._spare
            facts[attempt] = {{"spare_keeper": spare.proc.pid if spare else None,
                              "waiting": waiting_workers(spare.proc.pid) if spare else []}}
            keeper.run(job, 0, (), lambda offer: [offer])
            facts[attempt]["fn"] = results[0]
            server.close()
        facts["spare_keeper"] = keeper._spare.proc.pid
        facts["waiting"] = waiting_workers(facts["spare_keeper"])
        facts["left"] = descendants(os.getpid())
        json.dump(facts, open({str(report)!r}, "w"))
        # Then this "PySpark worker" exits, with a spare and its waiting worker in place.
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(report.read_text())
    first, second = facts["0"], facts["1"]
    assert first["spare_keeper"] is None and not first["fn"]["numpy_ahead"]
    # The second task was handed the spare, ran fn in the spare's waiting worker, and that
    # worker had imported numpy ahead, because the first task's fn had used it.
    assert second["spare_keeper"] is not None and second["fn"]["pid"] in second["waiting"]
    assert second["fn"]["numpy_ahead"]
    # Between tasks only a spare keeper and its waiting worker are left: nothing of a job.
    assert sorted(facts["left"]) == sorted([facts["spare_keeper"], *facts["waiting"]])
    assert len(facts["waiting"]) == 1
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in facts["left"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in facts["left"]), "a spare outlived its Python worker"


# A stand-in spare keeper: reads one framed message from its socket, reports it, and exits;
# with "deaf" it closes its socket at once and stays alive.
_STAND_IN = """
import pickle, socket, sys, time
from ringtrain.launcher import keeper
sock = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2] == "deaf":
    sock.close()
    time.sleep(60)
try:
    print(repr(keeper._recv(sock)), flush=True)
except EOFError:
    print("EOF", flush=True)
"""


def _stand_in_spare(env, mode="listen"):
    from ringtrain.launcher import keeper

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", _STAND_IN, str(theirs.fileno()), mode],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    theirs.close()
    return keeper._Spare(proc, ours, dict(env))


def test_a_spare_keeper_takes_the_job_only_alive_and_with_the_task_environment():
    from ringtrain.launcher import keeper

    env = keeper._keeper_env()
    matching = _stand_in_spare(env)
    assert keeper._hand_to_spare(matching, env, ("job",)) is matching
    assert matching.proc.stdout.readline().strip() == "('job',)"
    matching.close()
    # Another environment (here one more variable, as a changed executor setting would give):
    # the spare is stopped, it never sees the job, and the task starts its own keeper.
    other = _stand_in_spare({**env, "SOME_SETTING": "changed"})
    assert keeper._hand_to_spare(other, env, ("job",)) is None
    assert other.proc.poll() is not None and other.proc.stdout.read().strip() == "EOF"
    # Dead before the task came, or unable to take the job: not used either.
    dead = _stand_in_spare(env)
    dead.proc.kill()
    dead.proc.wait()
    assert keeper._hand_to_spare(dead, env, ("job",)) is None
    deaf = _stand_in_spare(env, "deaf")
    deaf.sock.settimeout(30)
    assert deaf.sock.recv(1, socket.MSG_PEEK) == b""  # waits until its end is closed
    assert deaf.alive()
    assert keeper._hand_to_spare(deaf, env, ("job",)) is None
    assert deaf.proc.poll() is not None  # stopped after its grace


def test_the_preimport_list_has_one_spelling_whatever_the_order_found():
    from ringtrain.launcher.agent import preimport_value

    # The spares' environment and the next job's must agree, or no spare ever matches.
    assert preimport_value(["keras", "tensorflow", "numpy", "tf_keras"]) == "numpy,tensorflow,tf_keras,keras"
    assert preimport_value({"tensorflow", "numpy"}) == preimport_value(["numpy", "tensorflow"])
    assert preimport_value([]) == ""


def test_a_spare_for_other_gpus_is_never_adopted():
    job = _job()
    on_gpu_0, on_gpu_1 = early_environ(job, ("0",)), early_environ(job, ("1",))
    assert on_gpu_0["CUDA_VISIBLE_DEVICES"] == "0" and on_gpu_1["CUDA_VISIBLE_DEVICES"] == "1"
    pool = WorkerPool()
    pool.spare([on_gpu_0])
    spare = pool._waiting[0].proc
    waiting = pool.take(0, on_gpu_1)
    try:
        assert waiting.proc.pid != spare.pid and spare.poll() is not None and pool.adopted == 0
        assert waiting.env["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        waiting.proc.kill()
        waiting.proc.wait()
        pool.close()
