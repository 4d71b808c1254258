"""Form one MPI world across Spark barrier tasks with Hydra's manual launcher.

One task agent (partition 0's) runs ``mpiexec -launcher manual``. mpiexec does
not start any process itself: it prints one ``HYDRA_LAUNCH: <hydra_pmi_proxy argv>``
line per "host" and waits for those proxies to dial back to its control port. The
agent sends the argv list to the driver over the job's authenticated control
channel, and the driver relays it to every agent (``protocol.MpiLaunch``); each
agent runs the proxy of its partition, the proxies start the ranks, and the ranks
share one COMM_WORLD. No ssh and no hostfile are involved.

This module holds the pure pieces (command line, launch-line parsing) and the
small process helpers (start mpiexec, start a proxy, tear a group down).

Facts this relies on (MPICH 5.0.2 Hydra, measured):
- Host names given to ``-hosts`` are never resolved in manual mode. Duplicate
  names are merged into one proxy, so every partition gets its own name
  (``rt-p<i>``), even when all tasks run on one machine (Spark local mode).
- Ranks are numbered in ``-hosts`` order: proxy 0 gets ranks 0..k0-1, and so on,
  which is ringtrain's (partition id, local index) order.
- ``--control-port`` names mpiexec's host as given by ``-localhost``; without it,
  the machine's hostname, which other cluster nodes may not resolve.
- With ``-genvnone`` a rank sees the environment of the process that ran its
  proxy; without it, mpiexec's environment wins over the proxy's.
- By default Hydra tells each rank its host name (the fake ``rt-p<i>``), and
  MPICH then treats every partition as its own node: no shared memory between
  partitions on one machine. ``-disable-hostname-propagation`` lets MPICH detect
  the real host, which was faster (about 38-40 ms vs 48-62 ms for a 64 MB
  allreduce of two ranks on one 2-core machine).
- mpiexec ignores SIGTERM while it waits for proxies; proxies do not end on
  SIGTERM either; and each rank runs in its own process group, so killing a
  proxy's group leaves its ranks orphaned. :func:`terminate_group` handles all
  three.
"""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..errors import BackendError

LAUNCH_PREFIX = "HYDRA_LAUNCH:"
LAUNCH_END = "HYDRA_LAUNCH_END"

# Proxy host names. They only label proxies (Hydra never resolves them in manual
# mode), but they must be distinct or Hydra merges partitions into one proxy.
HOST_NAME_FORMAT = "rt-p{}"


def find_mpiexec() -> str:
    """Path of Hydra's mpiexec: next to ``sys.executable`` first, then PATH.

    The MPICH wheel installs mpiexec into the environment's bin directory, which
    is often not on the PATH of a PySpark worker.
    """
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    found = shutil.which("mpiexec")
    if found:
        return found
    raise BackendError(
        "backend 'mpi' needs Hydra's mpiexec, found neither next to "
        f"{sys.executable} nor on PATH; install the 'mpich' wheel into this environment"
    )


def host_names(counts: Sequence[int]) -> list[str]:
    """One distinct proxy host name per partition."""
    return [HOST_NAME_FORMAT.format(i) for i in range(len(counts))]


def build_mpiexec_command(
    counts: Sequence[int],
    program: Sequence[str],
    *,
    mpiexec: str | None = None,
    control_host: str | None = None,
    share_memory: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``mpiexec -launcher manual`` argv for ``counts[i]`` ranks on partition ``i``.

    ``control_host`` is the address the proxies dial back to; pass the IP the
    rank-0 agent advertised in the rendezvous, so proxies on other machines can
    reach it. ``share_memory`` lets MPICH find ranks on the same real host (see
    the module notes). ``program`` is the rank command, e.g.
    ``[sys.executable, "-m", "ringtrain.worker"]``.
    """
    if not counts:
        raise BackendError("an MPI world needs at least one partition")
    if any(int(c) < 1 for c in counts):
        # Hydra cannot give a proxy zero ranks; a partition without workers must
        # be left out by the caller.
        raise BackendError(f"every partition needs at least one rank, got counts {list(counts)}")
    if not program:
        raise BackendError("no rank program given")
    hosts = ",".join(f"{name}:{int(c)}" for name, c in zip(host_names(counts), counts, strict=True))
    cmd = [mpiexec or find_mpiexec(), "-launcher", "manual", "-genvnone"]
    if control_host:
        cmd += ["-localhost", control_host]
    if share_memory:
        cmd += ["-disable-hostname-propagation"]
    cmd += list(extra_args)
    cmd += ["-hosts", hosts, "-n", str(sum(int(c) for c in counts))]
    cmd += list(program)
    return cmd


def _proxy_id(argv: Sequence[str]) -> int:
    try:
        return int(argv[list(argv).index("--proxy-id") + 1])
    except (ValueError, IndexError) as e:
        raise BackendError(f"HYDRA_LAUNCH line without a --proxy-id: {shlex.join(argv)}") from e


def parse_launch_output(lines: str | Iterable[str]) -> list[list[str]]:
    """Per-proxy argv from mpiexec's manual-launcher output, indexed by proxy id.

    Other lines are ignored. Raises :class:`BackendError` if the end marker is
    missing or the proxy ids are not exactly 0..n-1.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    found: dict[int, list[str]] = {}
    ended = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(LAUNCH_PREFIX):
            argv = shlex.split(line[len(LAUNCH_PREFIX) :])
            if not argv:
                raise BackendError("empty HYDRA_LAUNCH line")
            pid = _proxy_id(argv)
            if pid in found:
                raise BackendError(f"proxy id {pid} printed twice by mpiexec")
            found[pid] = argv
        elif line.startswith(LAUNCH_END):
            ended = True
            break
    if not ended:
        raise BackendError(f"mpiexec output ended before {LAUNCH_END}")
    if sorted(found) != list(range(len(found))) or not found:
        raise BackendError(f"mpiexec printed proxy ids {sorted(found)}, expected 0..n-1")
    return [found[i] for i in range(len(found))]


class MpiexecLaunch:
    """A running ``mpiexec -launcher manual`` and the proxy argv it printed.

    After the launch lines, mpiexec's stdout carries the ranks' output (and
    Hydra's own error messages). A daemon thread keeps draining it into
    ``on_line``, because a full pipe would block mpiexec and with it every rank.
    """

    def __init__(self, proc: subprocess.Popen, proxies: list[list[str]], lines: queue.Queue):
        self.proc = proc
        self.proxies = proxies
        self._lines = lines

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def terminate(self, grace: float = 2.0) -> int | None:
        return terminate_group(self.proc, grace)


def start_mpiexec(
    cmd: Sequence[str],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> MpiexecLaunch:
    """Start mpiexec in its own process group and read its launch lines.

    Raises :class:`BackendError` (after tearing mpiexec down) if mpiexec cannot
    start, exits, or prints no complete launch block within ``timeout`` seconds.
    Lines after the launch block go to ``on_line`` (default: our stdout).
    """
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            # Own session: teardown can signal mpiexec and only mpiexec's group,
            # never the Spark worker that started it.
            start_new_session=True,
            text=True,
            bufsize=1,
        )
    except OSError as e:
        raise BackendError(f"cannot start mpiexec ({cmd[0]}): {e}") from e

    lines: queue.Queue = queue.Queue()
    sink = on_line or (lambda s: print(s, flush=True))

    def pump() -> None:
        assert proc.stdout is not None
        in_launch = True
        for line in proc.stdout:
            line = line.rstrip("\n")
            if in_launch:
                lines.put(line)
                if line.startswith(LAUNCH_END):
                    in_launch = False
            else:
                sink(line)
        lines.put(None)  # EOF

    threading.Thread(target=pump, name="mpiexec-output", daemon=True).start()

    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        timed_out = False
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            line, timed_out = None, True
        if line is None:
            rc = terminate_group(proc, grace=1.0)
            why = f"printed no {LAUNCH_END} within {timeout:g} s" if timed_out else f"exited with code {rc}"
            tail = "\n".join(seen[-20:])
            raise BackendError(f"mpiexec {why}; command: {shlex.join(cmd)}\n{tail}".rstrip())
        seen.append(line)
        if line.startswith(LAUNCH_END):
            break
    try:
        proxies = parse_launch_output(seen)
    except BackendError:
        terminate_group(proc, grace=1.0)
        raise
    return MpiexecLaunch(proc, proxies, lines)


def start_proxy(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Run one printed proxy command in its own process group.

    With ``-genvnone`` the ranks inherit ``env``: this is how a task agent gives
    its own ranks CUDA_VISIBLE_DEVICES and ringtrain's variables.
    """
    try:
        return subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            **popen_kwargs,
        )
    except OSError as e:
        raise BackendError(f"cannot start hydra_pmi_proxy ({argv[0] if argv else '?'}): {e}") from e


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields follow the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pgid: int, pids: Iterable[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in pids:
        # Hydra puts every rank in its own process group, so signal each
        # descendant's group as well as the pid itself.
        for send in (os.killpg, os.kill):
            try:
                send(p, sig)
            except (ProcessLookupError, PermissionError):
                pass


def terminate_group(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """Stop ``proc``, its process group and every descendant; return its exit code.

    Sends SIGTERM, waits up to ``grace`` seconds, then SIGKILLs whatever is left.
    The escalation is needed because mpiexec and hydra_pmi_proxy were seen to
    ignore SIGTERM. ``proc`` must have been started with ``start_new_session``
    (as every helper here does), so its pid is also its process group id.
    """
    if proc.poll() is not None:
        return proc.returncode
    # Collect descendants first: once the proxy dies its ranks are reparented to
    # init and can no longer be found from it.
    kids = descendants(proc.pid)
    _signal_all(proc.pid, kids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(k) for k in kids):
            return proc.returncode
        time.sleep(0.02)
    kids = sorted(set(kids) | set(descendants(proc.pid)))
    _signal_all(proc.pid, kids, signal.SIGKILL)
    try:
        return proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # uninterruptible sleep; nothing more we can do
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"  # a zombie is dead, only not yet reaped by its parent
    except (OSError, IndexError):
        return False
