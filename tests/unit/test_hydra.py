"""Tests of the Hydra manual-launcher helpers (ringtrain.backends._hydra)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ringtrain.backends import _hydra
from ringtrain.errors import BackendError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "scripts", "mpi_world_demo.py")

# Captured from MPICH 5.0.2: mpiexec -launcher manual -localhost 127.0.0.1 -hosts p0:2,p1:1 -n 3 ...
_LINE = (
    "HYDRA_LAUNCH: /work/main/.venv/bin/hydra_pmi_proxy --control-port 127.0.0.1:38213 --rmk user"
    " --launcher manual --demux poll --pgid 0 --retries 10 --usize -1 --pmi-port 0 --gpus-per-proc -2"
    " --gpu-subdevs-per-proc -2 --proxy-id {} "  # mpiexec ends each line with a space
)
CAPTURED = _LINE.format(0) + "\n" + _LINE.format(1) + "\nHYDRA_LAUNCH_END\n"


def test_parse_captured_output():
    proxies = _hydra.parse_launch_output(CAPTURED)
    assert len(proxies) == 2
    for i, argv in enumerate(proxies):
        assert argv[0].endswith("hydra_pmi_proxy")
        assert argv[argv.index("--control-port") + 1] == "127.0.0.1:38213"
        assert argv[-2:] == ["--proxy-id", str(i)]


def test_parse_orders_by_proxy_id_and_ignores_noise():
    lines = CAPTURED.splitlines()
    text = "\n".join(["some warning", lines[1], lines[0], lines[2], "rank output after the end"])
    proxies = _hydra.parse_launch_output(text)
    assert [p[-1] for p in proxies] == ["0", "1"]


def test_parse_accepts_iterable_of_lines():
    assert len(_hydra.parse_launch_output(iter(CAPTURED.splitlines(keepends=True)))) == 2


@pytest.mark.parametrize(
    "text",
    [
        CAPTURED.replace("HYDRA_LAUNCH_END\n", ""),  # no end marker
        "HYDRA_LAUNCH_END\n",  # no proxies
        CAPTURED.replace("--proxy-id 1", "--proxy-id 2"),  # gap in ids
        CAPTURED.replace("--proxy-id 1", "--proxy-id 0"),  # duplicate id
        CAPTURED.replace("--proxy-id 1 ", ""),  # missing id
    ],
)
def test_parse_rejects_bad_output(text):
    with pytest.raises(BackendError):
        _hydra.parse_launch_output(text)


def test_build_command():
    cmd = _hydra.build_mpiexec_command(
        [2, 1], ["python", "-m", "w"], mpiexec="/x/mpiexec", control_host="10.0.0.5"
    )
    assert cmd[0] == "/x/mpiexec"
    assert cmd[cmd.index("-launcher") + 1] == "manual"
    assert cmd[cmd.index("-localhost") + 1] == "10.0.0.5"
    assert cmd[cmd.index("-hosts") + 1] == "rt-p0:2,rt-p1:1"
    assert cmd[cmd.index("-n") + 1] == "3"
    assert "-genvnone" in cmd and "-disable-hostname-propagation" in cmd
    assert cmd[-3:] == ["python", "-m", "w"]


def test_build_command_names_are_distinct_even_for_one_host():
    # Hydra merges duplicate host names into one proxy; every partition needs its own.
    names = _hydra.host_names([1] * 5)
    assert len(set(names)) == 5


def test_build_command_options():
    cmd = _hydra.build_mpiexec_command([1], ["p"], mpiexec="m", share_memory=False, extra_args=["-v"])
    assert "-localhost" not in cmd and "-disable-hostname-propagation" not in cmd
    assert "-v" in cmd


@pytest.mark.parametrize("counts", [[], [1, 0], [-1]])
def test_build_command_rejects_bad_counts(counts):
    with pytest.raises(BackendError):
        _hydra.build_mpiexec_command(counts, ["p"], mpiexec="m")


def test_start_mpiexec_missing_binary():
    with pytest.raises(BackendError, match="cannot start mpiexec"):
        _hydra.start_mpiexec(["/nonexistent/mpiexec", "-n", "1", "true"], timeout=2)


def test_start_mpiexec_no_launch_lines_times_out():
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="no HYDRA_LAUNCH_END"):
        _hydra.start_mpiexec([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_start_mpiexec_early_exit():
    with pytest.raises(BackendError, match="exited with code 2"):
        _hydra.start_mpiexec([sys.executable, "-c", "print('boom'); raise SystemExit(2)"], timeout=5)


def test_terminate_group_escalates_to_sigkill():
    # Ignores SIGTERM, as mpiexec does while it waits for its proxies.
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    proc.stdout.readline()
    t0 = time.monotonic()
    rc = _hydra.terminate_group(proc, grace=0.3)
    assert rc == -9
    assert time.monotonic() - t0 < 3


def test_terminate_group_reaches_children_in_their_own_groups():
    # hydra_pmi_proxy puts each rank in its own process group.
    code = (
        "import subprocess, sys, time;"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True);"
        "print(c.pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    child = int(proc.stdout.readline())
    _hydra.terminate_group(proc, grace=1.0)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _pid_running(child):
        time.sleep(0.05)
    assert not _pid_running(child)


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _hydra_processes() -> set[int]:
    """Live mpiexec / hydra_pmi_proxy / rank processes started by this test session.

    Only processes carrying this session's marker count, so MPI jobs of other
    sessions on the same machine are never mistaken for leaks.
    """
    from procs import pids_matching

    return {
        pid
        for pattern in ("mpiexec", "hydra_pmi_proxy", "--role rank")
        for pid in pids_matching(pattern)
        if _pid_running(pid)
    }


@pytest.mark.integration
def test_demo_end_to_end():
    try:
        _hydra.find_mpiexec()
        import mpi4py  # noqa: F401
    except (BackendError, ImportError) as e:
        pytest.skip(f"MPI not available: {e}")
    before = _hydra_processes()
    res = subprocess.run(
        [sys.executable, DEMO, "--agents", "2", "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "SUCCESS" in out
    assert out.count(" OK") == 2, out
    deadline = time.monotonic() + 5.0
    left = _hydra_processes() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _hydra_processes() - before
    assert not left, left
