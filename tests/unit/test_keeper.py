"""The keeper: a subreaper stops every descendant, setsid grandchildren included, and a killed
PySpark task leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ringtrain.backends._hydra import _alive


def _wait_for(path: Path, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return json.loads(path.read_text())


def _gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def test_subreaper_stops_a_setsid_grandchild(tmp_path):
    out = tmp_path / "pids.json"
    # A stand-in keeper: becomes a subreaper, starts a child that leaves a setsid grandchild
    # and exits, then stops every descendant.
    script = textwrap.dedent(
        f"""
        import json, os, subprocess, sys, time
        from ringtrain.launcher.keeper import set_subreaper, stop_descendants
        set_subreaper(True)
        leave = "import subprocess as s; print(s.Popen(['sleep', '1234'], start_new_session=True).pid)"
        child = subprocess.Popen([sys.executable, "-c", leave], stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        child.wait()
        time.sleep(0.2)
        with open(f"/proc/{{grandchild}}/stat") as f:
            adopted = int(f.read().rsplit(")", 1)[1].split()[1])
        stopped = stop_descendants(2.0)
        facts = {{"grandchild": grandchild, "adopted_by": adopted, "stopped": stopped, "me": os.getpid()}}
        json.dump(facts, open({str(out)!r}, "w"))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    facts = json.loads(out.read_text())
    assert facts["grandchild"] in facts["stopped"]
    assert facts["adopted_by"] == facts["me"]  # the orphan was re-parented to the subreaper
    assert not _alive(facts["grandchild"])


def test_set_subreaper_reports_the_previous_state():
    script = (
        "from ringtrain.launcher.keeper import set_subreaper\n"
        "assert set_subreaper(True) is False\n"
        "assert set_subreaper(False) is True\n"
        "assert set_subreaper(False) is False\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["task", "keeper"])
def test_killed_task_or_keeper_leaves_nothing(tmp_path, victim):
    """No Spark: a stand-in task process runs keeper.run with a real driver channel."""
    report = tmp_path / "tree.json"
    script = textwrap.dedent(
        f"""
        import json, os, subprocess, sys, threading, time
        import cloudpickle
        from ringtrain.launcher import keeper
        from ringtrain.launcher.agent import TaskJob
        from ringtrain.launcher.channel import ChannelServer
        from ringtrain.protocol import Offer, Rendezvous
        from ringtrain.worker import FunctionTask

        def fn():
            p = subprocess.Popen(["sleep", "1234"], start_new_session=True)
            json.dump({{"worker": os.getpid(), "keeper": os.getppid(), "grandchild": p.pid,
                       "task": int(os.environ["TASK_PID"]), "workdir": os.environ["RINGTRAIN_WORKDIR"]}},
                      open({str(report)!r} + ".tmp", "w"))
            os.replace({str(report)!r} + ".tmp", {str(report)!r})
            time.sleep(600)

        def answer_the_rendezvous():  # the driver's part, for a one-task job
            while True:
                conn, message = server.inbox.get()
                if isinstance(message, Offer):
                    conn.send(Rendezvous((message.offer,)))

        os.environ["TASK_PID"] = str(os.getpid())
        server = ChannelServer(b"s" * 32)
        threading.Thread(target=answer_the_rendezvous, daemon=True).start()
        job = TaskJob(("127.0.0.1", server.port), b"s" * 32, "tf", cloudpickle.dumps(FunctionTask(fn)),
                      {{}}, 2.0, False, heartbeat_interval=0.5)
        keeper.run(job, 0, (), lambda offer: [offer])
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    task = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        tree = _wait_for(report)
        assert tree["task"] == task.pid
        assert Path(tree["workdir"]).is_dir()
        os.kill(tree[victim], signal.SIGKILL)
        left = _gone([tree["worker"], tree["keeper"], tree["grandchild"]], timeout=15)
        assert not left, f"left behind: {left}"
        if victim == "task":
            task.wait(5)
        else:
            # The task process adopted the keeper's orphans, stopped them, and fails the task.
            assert task.wait(30) != 0
        assert not Path(tree["workdir"]).exists(), "the working directory outlived the task"
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
