"""The task agent: one barrier task's share of the job, from rendezvous to the last exit.

:func:`run_task` is the Spark-facing entry: the barrier stage calls it with the task's
partition, GPUs and ``allGather``. It starts a keeper process (see :mod:`.keeper`) in
which :class:`TaskAgent` runs. The agent connects to the driver, joins the rendezvous,
starts the task's workers as a :class:`~.workers.WorkerGroup`, and supervises them:
it forwards their output (and writes every line to the job directory's rank log),
reports each result and failure, sends a heartbeat with each rank's progress, answers
the driver's stack requests, and stops every worker it started however the task ends.

Two ways to run, decided at the start (see :meth:`TaskAgent.run`):

- **Linked.** The agent reaches the driver's control channel within ``REACH_TIMEOUT``
  seconds. The rendezvous goes over that channel (no barrier allGather, which costs about
  a second), and output streams live.
- **Detached.** The driver cannot be reached (a Spark Connect client behind NAT, say), or
  it told the agents to go on without it. The agents exchange their offers with one
  allGather; partition 0's agent runs a hub (:mod:`.hub`) that does the driver's part
  among them (release, abort on the first failure, liveness, stalls), and every result,
  failure, each rank's last lines of output and the hub's verdict travel back in the
  stage's output rows, sealed with the job's secret.

Nothing here imports pyspark: the agent is tested with fake worker groups, a fake
connection and a fake allGather.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import progress, rendezvous
from ..config import JobConfig
from ..data.reader import DATA_DIR_VAR
from ..data.spill import settle_task
from ..errors import BackendStartError, ChannelError, Failure
from ..protocol import (
    Abort,
    AgentFailed,
    BackendFailed,
    Done,
    Failed,
    Heartbeat,
    Hello,
    Log,
    LogsDropped,
    MpiLaunch,
    Offer,
    Ping,
    Release,
    Rendezvous,
    Result,
    StackDump,
    StackRequest,
    Tail,
    TaskLost,
    WorkDir,
    seal_row,
    write_atomic,
)
from ..worker import PREIMPORTABLE
from . import channel
from .ports import PortReservation, release_all, reserve_ports
from .workers import PLACEMENT_KEYS, MpiGroup, MpiRelay, ProcessGroup, WorkerGroup, WorkerPool

if TYPE_CHECKING:
    from .stage import StageTask

logger = logging.getLogger(__name__)

# TensorFlow's C++ start-up lines (absl/glog format) at INFO and WARNING level, the
# absl pre-init notice, and the cuInit error every CPU-only worker prints.
_TF_NOISE = re.compile(
    r"^(?:[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|E\d{4} .*(?:failed call to cuInit|Unable to register cu(?:DNN|FFT|BLAS) factory))"
)


def is_tf_noise(line: str) -> bool:
    return bool(_TF_NOISE.match(line))


# Seconds an agent tries to open a TCP connection to the driver before it goes on without
# it (detached). A reachable driver answers in milliseconds, even across regions; an
# address that drops packets would otherwise hold every task for minutes.
REACH_TIMEOUT = 5.0

# How many of each rank's last lines travel with its result or failure in detached mode,
# and how long each may be; the rank's log file in the job directory has every line whole.
TAIL_LINES = 50
TAIL_LINE_CHARS = 2000


class _Stopped(Exception):
    """The task must stop (an abort, a lost driver or task) before its workers started."""


@dataclass(frozen=True)
class TaskJob:
    """What the driver hands every barrier task, inside the Spark closure."""

    driver: tuple[str, int]
    secret: bytes = field(repr=False)
    backend: str
    payload: bytes = field(repr=False)
    worker_env: Mapping[str, str]
    kill_grace: float
    show_tf_noise: bool
    gpus_per_worker: int = 1
    attempt: int = 0
    job_dir: str = ""
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 30.0
    # The names of the job's datasets (ringtrain.run(data=...)); empty without data.
    data_names: tuple[str, ...] = ()
    # What the agents' hub needs when the driver cannot be reached (see hub.py): the job's
    # settings, and its deadline as a wall-clock time (time.time()), None for no timeout.
    config: JobConfig = field(default_factory=JobConfig)
    deadline: float | None = None
    # Leave a spare keeper, with its workers started, for the next task (RINGTRAIN_PREWARM).
    prewarm: bool = False

    @property
    def driver_reachable(self) -> bool:
        """False when the driver said up front that executors cannot reach it."""
        return bool(self.driver[0])


def omp_threads(inherited: str | None, task_workers: int, host_cpus: int) -> int:
    """Pure: OpenMP threads for each worker when neither RINGTRAIN_TF_THREADS nor the job set them.

    ``inherited`` is the agent's OMP_NUM_THREADS, which PySpark sets to the task's CPUs
    (``spark.task.cpus``): the task's share is split among its ``task_workers``. Without
    it, the host's ``host_cpus`` are split among them. Only what the task knows before the
    rendezvous counts, so a worker started ahead gets the same value as one started after.
    """
    try:
        share = int(inherited or "")
    except ValueError:
        share = 0
    if share > 0:
        return max(1, share // max(1, task_workers))
    return max(1, host_cpus // max(1, task_workers))


def worker_environ(
    job: TaskJob,
    spec: rendezvous.WorkerSpec,
    task_workers: int = 1,
    data_dir: str | None = None,
    preimport: str = "",
) -> dict[str, str]:
    """One worker's environment: this task's, the job's, then the worker's place in the job.

    ``task_workers`` is how many workers this task starts; they share its CPUs. ``data_dir``
    holds the task's stored rows for a job with data. ``preimport`` names the slow modules
    the worker imports ahead.
    """
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "OMP_NUM_THREADS" not in job.worker_env:
        threads = omp_threads(os.environ.get("OMP_NUM_THREADS"), task_workers, len(os.sched_getaffinity(0)))
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(job.worker_env)
    env.update(spec.environ())
    # The task's stored rows (ringtrain.data.shard reads them); none for a job without data.
    env.pop(DATA_DIR_VAR, None)
    if data_dir is not None:
        env[DATA_DIR_VAR] = data_dir
    env.update(
        RINGTRAIN_BACKEND=job.backend,
        RINGTRAIN_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
        # Lets the gRPC server take over the port this agent holds (see ports.py).
        TF_GRPC_REUSE_PORT="1",
        # The child sees the modules this task sees, including files added with addPyFile,
        # after any PYTHONPATH the user gave the workers.
        PYTHONPATH=os.pathsep.join(p for p in [job.worker_env.get("PYTHONPATH", ""), *sys.path] if p),
    )
    if preimport:
        env["RINGTRAIN_PREIMPORT"] = preimport
    return env


def preimport_value(names: Iterable[str]) -> str:
    """RINGTRAIN_PREIMPORT for these module names: in PREIMPORTABLE's order (each may import
    the ones before it), one spelling for a set, so that the next job's workers and the spares
    started for it get the very same value and a spare's environment can match."""
    return ",".join(sorted(set(names), key=PREIMPORTABLE.index))


def early_environ(
    job: TaskJob, gpus: tuple[str, ...], task_workers: int = 1, preimport: str = ""
) -> dict[str, str]:
    """The environment a worker with ``gpus`` (one of the task's ``task_workers``) starts
    with, before the rendezvous places it: :func:`worker_environ` without what only the
    placement knows."""
    unplaced = rendezvous.WorkerSpec(0, 1, 0, 1, 0, "", 0, gpus, ())
    env = worker_environ(job, unplaced, task_workers, preimport=preimport)
    return {k: v for k, v in env.items() if k not in PLACEMENT_KEYS}


class DriverLink:
    """The agent's end of the control channel: a sender, a listener, liveness.

    Control messages are never dropped. Log lines are: when more than ``max_queued_logs``
    wait (the driver or the network is slower than the workers' output), further lines
    are skipped and counted, and the driver is told how many; the rank's log file in the
    job directory still has them. ``stop_reason`` is set once: the driver's abort, the
    connection's loss, the driver's silence, or the Spark task's loss.
    """

    def __init__(
        self,
        conn: Any,
        heartbeat_timeout: float,
        max_queued_logs: int = 10_000,
        partition: int = 0,
        stream_logs: bool = True,
    ):
        self._conn = conn
        self._stream_logs = stream_logs
        self._heartbeat_timeout = heartbeat_timeout
        self._max_logs = max_queued_logs
        self._partition = partition
        # What each heartbeat reports; the agent points it at its workers' progress.
        self.progress: Callable[[], tuple] = tuple
        self._outbox: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._queued_logs = 0
        self._dropped: dict[int, int] = {}
        self._closing = False
        self._stopped = threading.Event()
        self.stop_reason: str | None = None
        self.released = threading.Event()
        self.launches: queue.Queue[MpiLaunch] = queue.Queue()
        self.rendezvous: queue.Queue[Rendezvous] = queue.Queue()
        self.stack_requests: queue.Queue[StackRequest] = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="ringtrain-agent-send", daemon=True)
        self._sender.start()
        threading.Thread(target=self._listen, name="ringtrain-agent-listen", daemon=True).start()

    @property
    def host(self) -> str:
        """This host's address on its connection (the one peers on the same network reach)."""
        return self._conn.local_host()

    def start_heartbeats(self, interval: float) -> None:
        """Send a heartbeat every ``interval`` seconds, from its own thread, so the agent stays
        visibly alive in every phase (a long rendezvous, mpiexec starting), not only while it
        supervises workers."""
        threading.Thread(
            target=self._beat, args=(interval,), name="ringtrain-agent-beat", daemon=True
        ).start()

    def _beat(self, interval: float) -> None:
        while not self._closing:
            try:
                ranks = self.progress()
            except Exception as err:  # a progress file being replaced; report none this time
                logger.debug("progress unreadable: %s", err)
                ranks = ()
            self.send(Heartbeat(self._partition, ranks))
            time.sleep(interval)

    # -- outgoing

    def send(self, message: Any) -> None:
        with self._ready:
            if not self._closing:
                self._outbox.append(message)
                self._ready.notify()

    def send_log(self, log: Log) -> None:
        if not self._stream_logs:
            return
        with self._ready:
            if self._closing:
                return
            if self._queued_logs >= self._max_logs:
                self._dropped[log.rank] = self._dropped.get(log.rank, 0) + 1
                return
            self._queued_logs += 1
            self._outbox.append(log)
            self._ready.notify()

    def _send_loop(self) -> None:
        while True:
            with self._ready:
                while not self._outbox and not self._closing:
                    self._ready.wait()
                if not self._outbox:
                    return
                message = self._outbox.popleft()
                if isinstance(message, Log):
                    self._queued_logs -= 1
                dropped, self._dropped = self._dropped, {}
            try:
                for rank, count in dropped.items():
                    self._conn.send(LogsDropped(rank, count))
                self._conn.send(message)
            except OSError:
                self.stop("lost the connection to the driver")
                with self._ready:
                    self._outbox.clear()
                    self._queued_logs = 0

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within ``timeout``), then close the connection."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._sender.join(timeout)
        self._conn.close()

    # -- incoming

    def _listen(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if isinstance(message, Release):
                    self.released.set()
                elif isinstance(message, Abort):
                    self.stop(f"the driver stopped the job: {message.reason}")
                elif isinstance(message, MpiLaunch):
                    self.launches.put(message)
                elif isinstance(message, Rendezvous):
                    self.rendezvous.put(message)
                elif isinstance(message, StackRequest):
                    self.stack_requests.put(message)
                elif not isinstance(message, Ping):
                    logger.warning("ignoring an unknown control message %r", type(message).__name__)
        except Exception:  # EOF, a reset, a bad frame: the driver is gone to us
            if not self._closing:
                self.stop("lost the connection to the driver")

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stopped.set()

    def receive(self, inbox: queue.Queue) -> Any:
        """The next message on ``inbox`` (one of the queues above); None if the task must stop first."""
        while self.wait_stop(0) is None:
            try:
                return inbox.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def wait_stop(self, timeout: float) -> str | None:
        """Why this task must stop, waiting up to ``timeout`` seconds; None to carry on."""
        if self._stopped.wait(timeout):
            return self.stop_reason
        silent = time.monotonic() - self._conn.last_heard
        if silent > self._heartbeat_timeout:
            self.stop(f"the driver has sent nothing for {silent:.0f} s (RINGTRAIN_HEARTBEAT_TIMEOUT)")
            return self.stop_reason
        return None


class _LinkRelay(MpiRelay):
    def __init__(self, link: DriverLink):
        self._link = link

    def publish(self, launch: MpiLaunch) -> None:
        # Relayed to every agent by the driver: a barrier allGather would cost a second,
        # since Spark checks its barrier futures once a second.
        self._link.send(launch)

    def wait(self) -> MpiLaunch | None:
        return self._link.receive(self._link.launches)


class RankLogs:
    """Every line of each rank's output, appended to ``<job_dir>/logs/rank-N.log``."""

    def __init__(self, job_dir: str, attempt: int):
        self._dir = Path(job_dir, "logs") if job_dir else None
        self._attempt = attempt
        self._files: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._broken = False

    def open(self, rank: int) -> None:
        """Start the rank's log for this attempt with a header line."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(rank, f"==== ringtrain rank {rank}, restart {self._attempt}, {stamp} ====")

    def write(self, rank: int, line: str) -> None:
        if self._dir is None or self._broken:
            return
        with self._lock:
            try:
                out = self._files.get(rank)
                if out is None:
                    self._dir.mkdir(parents=True, exist_ok=True)
                    out = self._files[rank] = open(self._dir / f"rank-{rank}.log", "a", buffering=1)  # noqa: SIM115
                out.write(line + "\n")
            except OSError as err:
                self._broken = True
                logger.warning(
                    "cannot write rank logs under %s (%s); the live stream goes on", self._dir, err
                )

    def close(self) -> None:
        with self._lock:
            for out in self._files.values():
                out.close()
            self._files.clear()


class TaskAgent:
    """Runs one barrier task's share of the job. ``all_gather`` is the barrier's allGather.

    ``sweep(grace)`` stops every remaining descendant at the end (the keeper passes its
    own); ``connect`` opens a control connection (tests pass a fake). For a job with
    data, ``data_dir`` is where the task's rows are being stored and ``stored_rows(timeout)``
    returns that store's summary (JSON) once it is complete, None while it is not, and
    raises what the store failed with. After :meth:`run`, :attr:`rows` holds the task's
    output rows (sealed), which carry everything the driver must learn when the agent ran
    detached.
    """

    def __init__(
        self,
        job: TaskJob,
        partition: int,
        gpus: tuple[str, ...],
        all_gather: Callable[[str], list[str]],
        workdir: str | Path,
        *,
        connect: Callable[..., Any] = channel.connect,
        sweep: Callable[[float], Any] | None = None,
        data_dir: str | None = None,
        stored_rows: Callable[[float], str | None] | None = None,
        pool: WorkerPool | None = None,
        preimport: str = "",
    ):
        self.job = job
        self.partition = partition
        self.gpus = gpus
        self.files = WorkDir(workdir)
        self.data_dir = data_dir
        self._stored_rows = stored_rows
        self._all_gather = all_gather
        self._connect = connect
        self._sweep = sweep
        self._link: DriverLink | None = None
        self._lost: str | None = None
        self._logs = RankLogs(job.job_dir, job.attempt)
        self._tails: dict[int, collections.deque] = {}
        self._hub: Any = None
        self._pool = pool or WorkerPool()
        self._preimport = preimport
        self.detached = False
        self.rows: list[bytes] = []
        # The early environment of each worker this task started, and the slow modules they
        # imported: what a spare keeper prepares for the task's next job.
        self.spare_envs: list[dict[str, str]] = []
        self.imports: set[str] = set()

    def lose_task(self, reason: str) -> None:
        """The Spark task hosting this agent vanished: tell the driver, and stop."""
        self._lost = reason
        if self._hub is not None:
            self._hub.task_lost()
        link = self._link
        if link is not None and link.stop_reason is None:
            self._tell(TaskLost(self.partition, reason))
            link.stop(reason)

    def run(self) -> None:
        self._prestart_workers()
        link = self._link = self._reach_driver()
        if self._lost:
            self.lose_task(self._lost)
        reservations: list[PortReservation] = []
        group: WorkerGroup | None = None
        specs: list[rendezvous.WorkerSpec] = []
        try:
            host = link.host if link is not None else own_address(self.job.driver[0])
            per_worker = self.job.gpus_per_worker
            count = rendezvous.workers_per_task(self.gpus, per_worker)
            stored = self._await_stored_rows(link)
            if stored is None:
                return  # stopped while the rows were still arriving
            reservations = reserve_ports(count)
            offer = rendezvous.TaskOffer(
                self.partition, host, tuple(r.port for r in reservations), self.gpus, per_worker, stored
            )
            offers = self._exchange(offer, host)
            link = self._link
            assert link is not None
            if self.data_dir is not None:
                self._lay_out_rows(self.data_dir, offers)
            specs = [s for s in rendezvous.plan(offers) if s.partition == self.partition]
            write_atomic(self.files.payload, self.job.payload)
            for spec in specs:
                self._logs.open(spec.rank)
            try:
                group = self._make_group(specs, offers, host, link)
                started = group.start()
            except BackendStartError as err:
                self._tell(BackendFailed(self.partition, str(err)))
                started = False
            if started:
                self._supervise(group, link)
        except _Stopped as stop:
            logger.info("partition %s: stopping before the workers started: %s", self.partition, stop)
        except Exception as err:
            # E.g. a rendezvous that cannot place the workers: the user must see why.
            logger.exception("partition %s: the task agent failed", self.partition)
            self._tell(AgentFailed(self.partition, _picklable(err), f"{type(err).__name__}: {err}"))
        finally:
            # Workers stop before their ports are released, and everything before "done".
            try:
                if group is not None:
                    group.stop(self.job.kill_grace)
            except Exception:
                # The sweep below still reaches what the group left behind.
                logger.exception("partition %s: stopping the workers failed", self.partition)
            finally:
                self._pool.close()
                release_all(reservations)
            self._learn_imports(specs)
            if self._sweep is not None:
                self._sweep(self.job.kill_grace)
            shutil.rmtree(self.files.path, ignore_errors=True)
            self._logs.close()
            if self.detached:
                for spec in specs:
                    self.rows.append(seal_row(self.job.secret, Tail(spec.rank, self._tail(spec.rank))))
            link = self._link
            if link is not None:
                link.send(Done(self.partition))
                link.close()
            if self._hub is not None:
                wait = self.job.kill_grace + self.job.config.abort_wait + 5.0
                self.rows.extend(seal_row(self.job.secret, m) for m in self._hub.finish(wait))

    # -- workers started ahead

    def _slot_gpus(self) -> list[tuple[str, ...]]:
        per_worker = self.job.gpus_per_worker
        count = rendezvous.workers_per_task(self.gpus, per_worker)
        return [tuple(self.gpus[i * per_worker : (i + 1) * per_worker]) for i in range(count)]

    def _prestart_workers(self) -> None:
        """Start (or take from a spare keeper) the tf backend's worker interpreters now, so
        their start and imports overlap the rendezvous."""
        if self.job.backend != "tf":
            self._pool.close()
            return
        try:
            slots = self._slot_gpus()
            envs = [early_environ(self.job, gpus, len(slots), self._preimport) for gpus in slots]
        except Exception as err:  # a bad GPU split: the rendezvous reports it
            logger.debug("no worker started ahead: %s", err)
            return
        self._pool.prepare(envs)
        if self._pool.adopted:
            logger.info("partition %s: %d spare worker(s) taken", self.partition, self._pool.adopted)
        # The next job's spares: the same start, importing what this job's workers import.
        self.spare_envs = envs

    def preimport_names(self) -> str:
        """The slow modules this task's workers imported, as RINGTRAIN_PREIMPORT lists them."""
        return preimport_value(self.imports)

    def _learn_imports(self, specs: list[rendezvous.WorkerSpec]) -> None:
        for spec in specs:
            try:
                found = self.files.imports(spec.rank).read_text()
            except OSError:
                continue
            self.imports.update(name for name in found.split(",") if name)
        if self.spare_envs:
            names = self.preimport_names()
            for env in self.spare_envs:
                env.pop("RINGTRAIN_PREIMPORT", None)
                if names:
                    env["RINGTRAIN_PREIMPORT"] = names

    # -- reaching the driver, and the rendezvous

    def _reach_driver(self) -> DriverLink | None:
        """A link to the driver, or None when it cannot be reached within REACH_TIMEOUT."""
        if not self.job.driver_reachable:
            return None
        try:
            conn = self._connect(self.job.driver, self.job.secret, connect_timeout=REACH_TIMEOUT)
        except ChannelError as err:
            logger.info(
                "partition %s: %s; going on without the driver: results and failures travel in the "
                "stage's output rows, and each rank's output stays in its log in the job directory",
                self.partition,
                err,
            )
            return None
        return self._open_link(conn, stream_logs=True)

    def _open_link(self, conn: Any, stream_logs: bool) -> DriverLink:
        link = DriverLink(conn, self.job.heartbeat_timeout, partition=self.partition, stream_logs=stream_logs)
        link.send(Hello(self.partition, link.host, os.getpid()))
        link.start_heartbeats(self.job.heartbeat_interval)
        return link

    def _exchange(self, offer: rendezvous.TaskOffer, host: str) -> list[rendezvous.TaskOffer]:
        """Every task's offer: through the driver when it is linked, else through allGather.

        Offers travel as their JSON text, unparsed on the way, so fields added to TaskOffer
        reach every agent unchanged by either route.
        """
        link = self._link
        if link is not None:
            link.send(Offer(self.partition, offer.to_json()))
            answer = link.receive(link.rendezvous)
            if answer is None:
                raise _Stopped(link.stop_reason)
            if not answer.gather:
                return [rendezvous.TaskOffer.from_json(text) for text in answer.offers]
            # Some task cannot reach the driver: every task goes through allGather instead.
            logger.info("partition %s: the driver asked for the rendezvous without it", self.partition)
            link.close()
            self._link = None
        return self._exchange_detached(offer, host)

    def _exchange_detached(self, offer: rendezvous.TaskOffer, host: str) -> list[rendezvous.TaskOffer]:
        """One allGather of every offer and the hub's address; then link to the hub."""
        from .hub import AgentHub

        self.detached = True
        if self.partition == 0:
            self._hub = AgentHub(self.job, host)
            if self._lost:
                self._hub.task_lost()
        mine = {"offer": offer.to_json(), "hub": list(self._hub.address) if self._hub else None}
        gathered = [json.loads(text) for text in self._all_gather(json.dumps(mine))]
        offers = [rendezvous.TaskOffer.from_json(g["offer"]) for g in gathered]
        hub_address = next(tuple(g["hub"]) for g in gathered if g["hub"])
        if self._hub is not None:
            self._hub.start(len(offers), sum(o.num_workers for o in offers))
        conn = self._connect(hub_address, self.job.secret)
        self._link = self._open_link(conn, stream_logs=False)
        if self._lost:
            self.lose_task(self._lost)
        return offers

    def _tell(self, message: Any) -> None:
        """Report ``message`` to the driver (or the hub); detached, also keep it for the rows."""
        if self.detached:
            if isinstance(message, Failed):
                tail = tuple(line for _, line in self._tail(message.failure.rank))
                message = Failed(replace(message.failure, output_tail=tail))
            self.rows.append(seal_row(self.job.secret, message))
            if isinstance(message, Result):
                message = Result(message.rank, None)  # the hub only counts results
        if self._link is not None:
            self._link.send(message)

    def _tail(self, rank: int) -> tuple[tuple[str, str], ...]:
        return tuple(self._tails.get(rank, ()))

    def _await_stored_rows(self, link: DriverLink | None) -> str | None:
        """This task's data summary once its rows are on disk ("" without data); None if the
        task must stop first. The rows arrive while the agent is already connected, so the
        driver hears its heartbeats however long they take (detached, with no link yet, only
        the loss of the task stops the wait)."""
        if self.data_dir is None or self._stored_rows is None:
            return ""
        while not self._lost and (link is None or link.wait_stop(0) is None):
            summary = self._stored_rows(0.1)
            if summary is not None:
                return summary
        return None

    @staticmethod
    def _lay_out_rows(data_dir: str, offers: list[rendezvous.TaskOffer]) -> None:
        """Give each of this task's workers its rows, from every task's summary.

        Tasks in partition order, as :func:`rendezvous.plan` orders the ranks. Raises
        DataError (an empty dataset, columns that differ between tasks) alike on every task.
        """
        ordered = sorted(offers, key=lambda o: o.partition)
        settle_task(data_dir, [o.data for o in ordered], [o.num_workers for o in ordered])

    def _make_group(self, specs, offers, host: str, link: DriverLink) -> WorkerGroup:
        if self.job.backend == "mpi":
            env = worker_environ(self.job, specs[0], len(specs), self.data_dir)
            return MpiGroup(
                specs, self.files, self._output, offers, self.partition, env, _LinkRelay(link), host
            )
        if importlib.util.find_spec("tensorflow") is None:
            raise BackendStartError(f"tensorflow is not installed for {sys.executable}")
        return ProcessGroup(
            specs,
            self.files,
            self._output,
            lambda spec: worker_environ(self.job, spec, len(specs), self.data_dir, self._preimport),
            self._pool,
        )

    def _output(self, rank: int, stream: str, line: str) -> None:
        self._logs.write(rank, line)
        if stream == "stderr" and not self.job.show_tf_noise and is_tf_noise(line):
            return
        tail = self._tails.get(rank)
        if tail is None:
            tail = self._tails[rank] = collections.deque(maxlen=TAIL_LINES)
        tail.append((stream, line[:TAIL_LINE_CHARS]))
        link = self._link
        if link is not None:
            link.send_log(Log(rank, stream, line))

    def _supervise(self, group: WorkerGroup, link: DriverLink) -> None:
        """Report each result as soon as it is written and each failure as it happens.

        A worker with a result stays alive until the driver releases the job (every rank
        has a result): a peer may still be pulling the last collective's buffers from it.
        Returns when every worker has ended, one has failed, or the task must stop.
        """
        pending = set(group.ranks)
        sent: set[int] = set()
        # Replaced, never mutated: the heartbeat thread reads it.
        watched = [tuple(sorted(pending))]
        link.progress = lambda: self._progress(group, watched[0])
        while pending:
            reason = link.wait_stop(0.05)
            if reason is not None:
                logger.info("partition %s: stopping: %s", self.partition, reason)
                return
            if link.released.is_set() and not self.files.release.exists():
                self.files.release.touch()
            for rank in sorted(pending - sent):
                if self.files.result(rank).exists():
                    sent.add(rank)
                    self._tell(Result(rank, self.files.result(rank).read_bytes() or None))
            # Report what already ended even when stopping: it may be the root cause.
            for rank in sorted(pending):
                code = group.poll(rank)
                if code is None:
                    continue
                pending.discard(rank)
                watched[0] = tuple(sorted(pending))
                group.drain(rank)
                report = self._report(group, rank, code, rank in sent)
                if report is not None:
                    if isinstance(report, Result):
                        sent.add(rank)
                    self._tell(report)
                if isinstance(report, Failed):
                    # The job is failing: stop this task's other workers now rather than
                    # leave them waiting in a collective for the driver's abort.
                    return
            while not link.stack_requests.empty():
                request = link.stack_requests.get()
                threading.Thread(target=self._send_stacks, args=(group, request, link), daemon=True).start()

    def _progress(self, group: WorkerGroup, ranks: tuple[int, ...]) -> tuple:
        now = time.monotonic()
        found = []
        for rank in ranks:
            host = group.spec(rank).host
            snap = progress.read(self.files.progress(rank))
            found.append(snap.as_rank_progress(rank, host, now) if snap else progress.no_progress(rank, host))
        return tuple(found)

    def _report(self, group: WorkerGroup, rank: int, code: int, result_sent: bool) -> Result | Failed | None:
        spec = group.spec(rank)
        if code == 0:
            if result_sent:
                return None
            result = self.files.result(rank)
            if result.exists():
                return Result(rank, result.read_bytes() or None)
            why = (
                "the worker exited with code 0 before fn returned a result: something in it called "
                "os._exit(0) (or the process was made to exit). Return from fn, or raise, instead\n"
            )
            return Failed(Failure(rank, spec.host, 0, None, why))
        error = self.files.error(rank)
        text = error.read_text(errors="replace") if error.exists() else ""
        signal_name = signal.Signals(-code).name if code < 0 else None
        return Failed(Failure(rank, spec.host, None if code < 0 else code, signal_name, text))

    def _send_stacks(self, group: WorkerGroup, request: StackRequest, link: DriverLink) -> None:
        for rank in sorted(set(request.ranks) & set(group.ranks)):
            link.send(StackDump(rank, group.stacks(rank)))


def own_address(towards: str) -> str:
    """This host's address for its peers when the driver cannot be reached: the one on its
    route to ``towards`` (no packet is sent), else on its default route, else loopback."""
    from .spark import local_address_towards

    for target in (towards, "203.0.113.1"):  # TEST-NET-3, for the default route (no packet is sent)
        if target:
            found = local_address_towards(target)
            if found:
                return found
    return "127.0.0.1"


def _picklable(err: BaseException) -> BaseException | None:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return None
    return err


def run_task(
    job: TaskJob,
    partition: int,
    gpus: tuple[str, ...],
    all_gather: Callable[[str], list[str]],
    batches: Iterable[Any] = (),
) -> list[bytes]:
    """Run partition ``partition``'s share of ``job``; the entry point of each barrier task.

    ``batches`` is the task's input: its rows of the job's DataFrames, when it has data.
    Returns the task's output rows, each sealed with the job's secret. The agent runs in a
    keeper process, so killing this (PySpark) process never leaves a worker behind.
    """
    from . import keeper

    return keeper.run(job, partition, gpus, all_gather, batches)


def run_barrier_task(job: TaskJob, task: StageTask) -> list[bytes]:
    """Entry point of each barrier task (run by the launch stage, see stage.py)."""
    return run_task(job, task.partition, task.gpus, task.all_gather, task.batches)
