"""The driver: launches one job, restarts it when it fails, and turns what the agents
report into a result or an error.

One call of :func:`launch` is one job: one job directory, a wall-clock ``timeout`` over
all its attempts, and up to ``max_restarts`` restarts after a failure. Each attempt is one
Spark barrier stage; :class:`_Supervisor` is its event loop: it answers the rendezvous,
prints worker output, collects results, runs the stall inspector on the agents'
heartbeats, watches every agent's liveness, and stops everything on the first failure.

When the agents cannot reach this process (see agent.py), they run the same loop among
themselves (hub.py), and what the driver would have seen arrives in the stage's output
rows when the stage ends: results, failures, each rank's last lines and the hub's verdict.
The timeout and Ctrl-C still hold: they cancel the stage, which stops every task.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from .. import backends
from ..config import JobConfig
from ..data.prepare import PreparedData, as_datasets, data_error_from, prepare, raised_data_error
from ..errors import (
    AgentLostError,
    BackendError,
    BackendStartError,
    ChannelError,
    ConfigError,
    DataError,
    Failure,
    JobTimeoutError,
    ResourceError,
    RingtrainError,
    StallError,
    WorkerError,
)
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
    Notice,
    Offer,
    Ping,
    Release,
    Rendezvous,
    Result,
    StackDump,
    StackRequest,
    Tail,
    TaskLost,
    Verdict,
    unseal_row,
)
from . import spark
from .agent import REACH_TIMEOUT, TAIL_LINES, TaskJob, run_barrier_task
from .channel import ChannelServer, Connection
from .stage import BarrierStage, is_connect
from .stall import StallInspector, StallReport

logger = logging.getLogger(__name__)

# How long the driver waits for the Spark job to report on a lost agent, and for the
# stacks of a stall's missing ranks.
SPARK_REPORT_WAIT = 5.0
STACK_WAIT = 3.0

# Seconds after the first agent's hello within which every agent must say hello, or the
# rendezvous goes through the barrier's allGather (some executor cannot reach this
# process). It covers the spread of the tasks' start and each agent's REACH_TIMEOUT.
HELLO_WAIT = 2 * REACH_TIMEOUT + 10.0


class LogPrinter:
    """Writes each worker line to the caller's stdout or stderr, prefixed with its rank."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self._streams = {"stdout": stdout, "stderr": stderr}

    def __call__(self, rank: int, stream: str, line: str) -> None:
        out = self._streams.get(stream) or (sys.stdout if stream == "stdout" else sys.stderr)
        out.write(f"[{rank}] {line}\n")
        out.flush()

    def notice(self, text: str) -> None:
        """A message from ringtrain itself (a restart, a stall warning), on stderr."""
        out = self._streams.get("stderr") or sys.stderr
        out.write(f"ringtrain: {text}\n")
        out.flush()


def launch(
    config: JobConfig, payload: bytes, printer: LogPrinter | None = None, data: Any = None
) -> dict[int, bytes | None]:
    """Run ``payload`` (a pickled worker task) on every worker; return pickled results by rank.

    A failed attempt is started again up to ``config.max_restarts`` times; pre-flight
    errors (ConfigError, ResourceError, DataError), a backend that cannot start, and the
    timeout are never retried. With backend "auto", a backend that cannot start gives way
    to the next candidate, and the reason is logged; a named backend's failure is raised
    as it is. ``data`` (a DataFrame or a dict of them) runs on its own session; every
    attempt moves its rows to the tasks afresh (see :func:`ringtrain.data.prepare.prepare`).
    """
    printer = printer or LogPrinter()
    datasets = as_datasets(data) if data is not None else None
    session = data_session(datasets) if datasets else spark.get_session(config)
    master = spark.ClusterConf.read(session).master
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    job_dir = prepare_job_dir(config.job_dir, master)
    if config.max_restarts and config.job_dir is None and not master.startswith("local"):
        printer.notice(
            f"no shared job directory: checkpoints in {job_dir} stay on each host, so a restart may not "
            "find them. Pass job_dir= (or --job-dir, RINGTRAIN_JOB_DIR) on shared storage"
        )
    attempt = 0
    while True:
        try:
            return _attempt(session, config, payload, printer, attempt, job_dir, deadline, datasets)
        except RingtrainError as err:
            if attempt >= config.max_restarts or not is_retryable(err):
                raise
            attempt += 1
            cause = str(err).splitlines()[0]
            logger.info("restart %d of %d after: %s", attempt, config.max_restarts, cause)
            printer.notice(f"restart {attempt} of {config.max_restarts} after: {type(err).__name__}: {cause}")


def is_retryable(err: BaseException) -> bool:
    """Whether a job that failed with ``err`` may be started again (worker or infrastructure failure)."""
    fatal = (ConfigError, ResourceError, JobTimeoutError, BackendError)
    return isinstance(err, RingtrainError) and not isinstance(err, fatal)


def data_session(datasets: dict[str, Any]) -> Any:
    """The Spark session the job's DataFrames belong to, which then runs the job."""
    sessions = {id(df.sparkSession): df.sparkSession for df in datasets.values()}
    if len(sessions) > 1:
        raise ConfigError(
            f"the DataFrames in data ({', '.join(map(repr, datasets))}) belong to different Spark "
            "sessions; build them all in the session that should run the job"
        )
    return next(iter(sessions.values()))


def prepare_job_dir(requested: str | None, master: str) -> str:
    """The job directory, created: ``requested``, or a new local one under the temp directory."""
    path = Path(requested) if requested else default_job_dir()
    try:
        (path / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the job directory {path} ({err}); pass a writable job_dir= "
            "(or --job-dir, RINGTRAIN_JOB_DIR)"
        ) from None
    logger.info("job directory: %s", path)
    return str(path)


def default_job_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir(), "ringtrain-jobs", f"{stamp}-{uuid.uuid4().hex[:8]}")


def _attempt(
    session,
    config: JobConfig,
    payload: bytes,
    printer: LogPrinter,
    attempt: int,
    job_dir: str,
    deadline,
    datasets: dict[str, Any] | None = None,
) -> dict[int, bytes | None]:
    # Every attempt checks the slots again: a restart that cannot get them fails like a first start.
    layout = spark.preflight(session, config)
    # The rows move inside each attempt's stage; the first attempt checked they exist.
    prepared = prepare(datasets, layout.num_tasks, check_empty=attempt == 0) if datasets else None
    tried = backends.candidates(config.backend, layout.uses_gpus, backends.mpi_installed())
    for index, backend in enumerate(tried):
        try:
            return _launch_once(
                session,
                layout,
                replace(config, backend=backend),
                payload,
                printer,
                attempt,
                job_dir,
                deadline,
                prepared,
            )
        except BackendStartError as err:
            if index + 1 == len(tried):
                raise
            logger.warning(
                "backend %r could not start (%s); falling back to %r", backend, err, tried[index + 1]
            )
    raise AssertionError("unreachable: candidates() is never empty")


def channel_address(bind_address: str | None, driver_host: str | None, override: str = "") -> tuple[str, str]:
    """(address the control channel binds, address agents dial): the driver's own, never 0.0.0.0
    unless Spark itself binds there. ``override`` (RINGTRAIN_DRIVER_HOST) replaces the address
    agents dial, not the one bound; "none" says they cannot reach this process at all."""
    own = driver_host or "127.0.0.1"
    advertised = "" if override.lower() == "none" else override or own
    return bind_address or own, advertised


def _launch_once(
    session,
    layout: spark.Layout,
    config: JobConfig,
    payload: bytes,
    printer: LogPrinter,
    attempt: int,
    job_dir: str,
    deadline: float | None,
    prepared: PreparedData | None = None,
):
    # A Spark Connect client is dialled at its own address; a classic driver binds where Spark does.
    bind_address = None if is_connect(session) else session.conf.get("spark.driver.bindAddress", None)
    bind, advertised = channel_address(bind_address, spark.driver_host(session), config.driver_host)
    secret = secrets.token_bytes(32)
    with ChannelServer(secret, bind, config.channel_ports) as server:
        job = TaskJob(
            driver=(advertised, server.port),
            secret=secret,
            backend=config.backend,
            payload=payload,
            worker_env=worker_env(config, attempt, job_dir),
            kill_grace=config.kill_grace,
            show_tf_noise=config.show_tf_noise,
            gpus_per_worker=config.gpus_per_worker,
            attempt=attempt,
            job_dir=job_dir,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            data_names=prepared.names if prepared else (),
            config=config,
            deadline=None if deadline is None else time.time() + (deadline - time.monotonic()),
            prewarm=config.prewarm,
        )
        task_fn = partial(run_barrier_task, job)
        barrier = BarrierStage(
            session,
            layout.num_tasks,
            task_fn,
            data=prepared.input_df if prepared else None,
            profile=layout.profile,
        )
        barrier.start()
        try:
            spark.await_slots(barrier, layout, config)
            supervisor = _Supervisor(
                server, barrier, layout.num_tasks, layout.num_proc, config, printer, deadline, job_dir, secret
            )
            supervisor.address = f"{advertised}:{server.port}" if advertised else ""
        except BaseException:
            # The stage is submitted but nothing supervises it yet: cancel its job group, so no
            # task keeps running (or waiting for slots) after this call returns.
            barrier.cancel()
            barrier.join(config.abort_wait)
            raise
        return supervisor.run()


def worker_env(config: JobConfig, attempt: int, job_dir: str) -> dict[str, str]:
    """Every worker's extra environment: forwarded settings, then the job's own, then ringtrain's."""
    env = dict(config.worker_settings)
    env |= _keras_env(config) | _thread_env(config) | dict(config.worker_env)
    env |= {
        "RINGTRAIN_KILL_GRACE": repr(config.kill_grace),
        "RINGTRAIN_HEARTBEAT_INTERVAL": repr(config.heartbeat_interval),
        "RINGTRAIN_RESTART_COUNT": str(attempt),
        "RINGTRAIN_JOB_DIR": job_dir,
        "RINGTRAIN_RESULTS": config.results,
    }
    return env


def _keras_env(config: JobConfig) -> dict[str, str]:
    """tf.keras in workers is tf-keras unless the user chose otherwise (see RINGTRAIN_LEGACY_KERAS)."""
    default = "1" if config.legacy_keras else "0"
    return {"TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS", default)}


def _thread_env(config: JobConfig) -> dict[str, str]:
    if not config.threads_per_worker:
        return {}
    n = str(config.threads_per_worker)
    return {"TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": n, "OMP_NUM_THREADS": n}


class _Supervisor:
    """One attempt's event loop: prints logs, gathers results, watches stalls and liveness,
    stops everything on failure."""

    def __init__(
        self,
        server: ChannelServer,
        barrier: BarrierStage,
        num_tasks: int,
        num_proc: int,
        config: JobConfig,
        printer: LogPrinter,
        deadline: float | None,
        job_dir: str,
        secret: bytes = b"",
    ):
        self.server = server
        self.barrier = barrier
        self.num_tasks = num_tasks
        self.num_proc = num_proc
        self.config = config
        self._secret = secret  # opens the stage's output rows
        self.address = ""  # where agents dial this process; "" when they cannot
        self.printer = printer
        self.deadline = deadline
        self.job_dir = job_dir
        self.results: dict[int, bytes | None] = {}
        self.failures: list[Failure] = []
        self.agents: dict[Connection, Hello] = {}
        self.done_tasks: set[int] = set()
        self.lost: dict[int, str] = {}  # partition -> what happened
        self.backend_failure: str | None = None
        self.agent_error: RingtrainError | None = None
        self.stall_error: StallError | None = None
        self.trigger: str | None = None  # the first thing that went wrong
        self.stopped = False
        self.inspector = StallInspector(config.stall_warning, config.stall_timeout)
        self._stall_request: tuple[str, StallReport, float] | None = None
        self._stacks: dict[int, str] = {}
        self._next_ping = 0.0
        self._next_check = 0.0
        self._barrier_done_at: float | None = None
        # The rendezvous: offers by partition, or (gathering) the agents went to allGather.
        self.offers: dict[int, str] = {}
        self.gathering = False
        self.unlinked: set[Connection] = set()  # agents told to go on without this process
        self._first_hello_at: float | None = None
        self._tasks_seen_at: float | None = None
        self._mpi_launch: MpiLaunch | None = None
        self._rows_taken = False
        self._tails_shown = False
        self._detached_noted = False

    # ------------------------------------------------------------------ outcome

    def run(self) -> dict[int, bytes | None]:
        try:
            self._wait(lambda: len(self.results) == self.num_proc or self.trigger is not None, self.deadline)
            if self.trigger is None and len(self.results) < self.num_proc and not self._linked():
                # Detached agents: their hub stops the job at the same deadline, with the grace
                # its workers are due, and its JobTimeoutError comes back with the rows. This
                # process cancels the stage only if that does not happen in time.
                self._wait(lambda: self._rows_taken, time.monotonic() + self._stop_wait)
            if self.trigger is None and len(self.results) < self.num_proc:
                self.trigger = "timeout"
            if self.trigger is not None:
                raise self._failure()
            # Every rank has a result: let the workers exit. Agents then drain their output
            # and say done; the Spark job ends with them.
            self.server.broadcast(Release())
            self._wait(lambda: len(self.done_tasks) >= self.num_tasks, time.monotonic() + self._stop_wait)
            self._drain()
            # Let the stage end by itself: cancelling a finishing stage kills its Python
            # workers, and the session's next job then waits for fresh ones.
            self.barrier.join(self.config.abort_wait)
            return self.results
        except BaseException:
            self._stop("the driver is stopping the job")  # a no-op if already stopped
            raise
        finally:
            self.barrier.cancel()
            self.barrier.join(self.config.abort_wait)

    @property
    def _stop_wait(self) -> float:
        return self.config.kill_grace + self.config.abort_wait

    def _note(self, trigger: str) -> None:
        if self.trigger is None:
            self.trigger = trigger

    def _failure(self) -> RingtrainError:
        """Stop everything, then build the error for what went wrong first."""
        trigger = self.trigger
        if trigger == "lost":
            # Give Spark a moment to say what happened to the task before the job is cancelled.
            self._wait(self.barrier.done, time.monotonic() + SPARK_REPORT_WAIT, quiet=True)
        self._stop(
            {
                "backend": "the backend could not start",
                "timeout": "the job timed out",
                "stall": "the job stalled",
                "lost": "a task agent was lost",
                "agent": "a task agent failed",
            }.get(trigger or "", "a worker failed")
        )
        if trigger == "agent" and self.agent_error is not None:
            return self.agent_error
        if trigger == "backend":
            return BackendStartError(f"backend {self.config.backend!r}: {self.backend_failure}")
        if trigger == "stall" and self.stall_error is not None:
            return self.stall_error
        if trigger == "lost":
            return self._lost_error()
        if trigger == "timeout":
            running = sorted(set(range(self.num_proc)) - set(self.results))
            over = f" over all {self.config.max_restarts + 1} attempts" if self.config.max_restarts else ""
            return JobTimeoutError(
                f"the job did not finish within its {self.config.timeout:g} s timeout{over}; ranks "
                f"{running} were still running and have been stopped. Raise the timeout or look "
                "for a rank stuck waiting on its peers"
            )
        return self._worker_error()

    def _worker_error(self) -> RingtrainError:
        """WorkerError for the failures; DataError when the first failing rank's fn raised one
        (``ringtrain.data.shard`` refusing a name or a batch size), which a restart cannot fix."""
        failures = self._ordered_failures()
        first = failures[0] if failures else None
        message = raised_data_error(first.traceback) if first is not None else None
        if message is None:
            return WorkerError.of(failures)
        return DataError(
            f"rank {first.rank} on {first.host}: {message}\n--- traceback from rank {first.rank} ---\n"
            + first.traceback.rstrip()
        )

    def _lost_error(self) -> AgentLostError:
        partition, what = next(iter(self.lost.items()))
        hello = next((h for h in self.agents.values() if h.partition == partition), None)
        host = hello.host if hello else "an unknown host"
        err = self.barrier.error
        spark_said = (
            spark.error_line(err).rstrip(".")
            if err is not None
            else "nothing yet (the task is still running)"
        )
        return AgentLostError(
            f"the task agent of partition {partition} on {host} was lost: {what}. Spark reported: "
            f"{spark_said}. Every other worker was stopped; if the executor was lost, retry with "
            "max_restarts",
            partition=partition,
            host=host,
            spark_reason=spark_said if err is not None else "",
        )

    def _ordered_failures(self) -> list[Failure]:
        """First the failures that explain themselves (a traceback), then the rest, by arrival."""
        return sorted(self.failures, key=lambda f: 0 if f.traceback else 1)

    def _stop(self, reason: str) -> None:
        """Abort every agent and wait, briefly, for them to confirm their workers are gone."""
        if self.stopped:
            return
        self.stopped = True
        self.server.broadcast(Abort(reason))
        linked = self._linked()
        if len(linked) < self.num_tasks:
            # Agents this process cannot reach stop only when their Spark tasks are killed.
            self.barrier.cancel()

        def all_stopped() -> bool:
            # An agent still connected is still stopping its workers, even when Spark has
            # already ended its task: wait for its "done" (a closed connection counts as lost).
            if linked - set(self.lost) - self.done_tasks:
                return False
            return len(linked) >= self.num_tasks or self.barrier.done()

        try:
            self._wait(all_stopped, time.monotonic() + self._stop_wait, quiet=True)
        except RingtrainError:
            pass
        self.barrier.cancel()

    # ------------------------------------------------------------------ the loop

    def _wait(self, finished, deadline: float | None, quiet: bool = False) -> None:
        """Handle messages until ``finished()``, ``deadline`` or (unless ``quiet``) a failure."""
        while not finished():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if not quiet and self.trigger is not None:
                return
            self._tick(now)
            try:
                conn, message = self.server.inbox.get(timeout=0.1)
            except queue.Empty:
                if self.barrier.done() and not self._rows_taken:
                    self._take_rows()
                    continue
                # Rows that failed to encode fail the stage before any agent starts: nothing to wait for.
                early = not self.agents and self._stage_data_error() is not None
                if self.barrier.done() and not finished() and (early or self._agents_quiet()):
                    self._drain()
                    if not finished() and not quiet and self.trigger is None:
                        raise self._job_ended_early() from None
                    if quiet:
                        return
                continue
            self._handle(conn, message)

    def _tick(self, now: float) -> None:
        """Heartbeats out, liveness and stalls in: at most once per interval or half second."""
        if now >= self._next_ping:
            self._next_ping = now + self.config.heartbeat_interval
            self.server.broadcast(Ping())
            for conn, hello in list(self.agents.items()):
                silent = now - conn.last_heard
                if (
                    hello.partition not in self.done_tasks | set(self.lost)
                    and silent > self.config.heartbeat_timeout
                ):
                    self._lose(
                        hello.partition,
                        f"its agent (pid {hello.pid}) has sent nothing for {silent:.0f} s "
                        "(RINGTRAIN_HEARTBEAT_TIMEOUT)",
                    )
        if now >= self._next_check and not self.stopped:
            self._next_check = now + 0.5
            self._check_stall(now)
            self._check_agents(now)

    def _check_stall(self, now: float) -> None:
        if self._stall_request is None:
            verdict = self.inspector.check()
            if verdict is None:
                return
            kind, report = verdict
            self._stacks = {}
            self.server.broadcast(StackRequest(tuple(r.rank for r in report.missing)))
            self._stall_request = (kind, report, now + STACK_WAIT)
            return
        kind, report, until = self._stall_request
        if now < until and not all(r.rank in self._stacks for r in report.missing):
            return
        self._stall_request = None
        if kind == "fail":
            advice = (
                f"The job failed after {self.config.stall_timeout:g} s of stall (RINGTRAIN_STALL_TIMEOUT) "
                "and every worker was stopped. Every rank must run the same collectives in the same order; "
                "the stack(s) above show where the missing rank(s) were instead."
            )
            self.stall_error = report.error(self._stacks, advice)
            self._note("stall")
            return
        if self.config.stall_timeout:
            advice = f"The job fails with StallError after {self.config.stall_timeout:g} s of stall."
        else:
            advice = "RINGTRAIN_STALL_TIMEOUT=0: the job keeps waiting."
        self.printer.notice("stall warning: " + report.describe(self._stacks, advice))

    # ------------------------------------------------------------------ rendezvous, rows

    def _linked(self) -> set[int]:
        """The partitions whose agents talk to this process (not told to go on without it)."""
        return {h.partition for c, h in self.agents.items() if c not in self.unlinked}

    def _offer(self, conn: Connection, message: Offer) -> None:
        if conn in self.unlinked:
            return
        if self.gathering:
            self._unlink(conn)
            return
        self.offers[message.partition] = message.offer
        if len(self.offers) == self.num_tasks:
            self.server.broadcast(Rendezvous(tuple(self.offers[p] for p in sorted(self.offers))))

    def _unlink(self, conn: Connection) -> None:
        """Tell one agent to go on without this process (the rendezvous through allGather)."""
        self.unlinked.add(conn)
        try:
            conn.send(Rendezvous(gather=True))
        except OSError:
            pass

    def _check_agents(self, now: float) -> None:
        """Some agents said hello, the others did not in time: every agent goes to allGather.
        None did, well after the tasks started: tell the user why no output streams."""
        if self.gathering or len(self.offers) == self.num_tasks:
            return
        if self._first_hello_at is not None:
            if len(self.agents) < self.num_tasks and now - self._first_hello_at >= HELLO_WAIT:
                self.gathering = True
                for conn in list(self.agents):
                    self._unlink(conn)
                self._note_detached(
                    f"only {len(self.agents)} of {self.num_tasks} task agents reached this process at "
                    f"{self.address} within {HELLO_WAIT:g} s"
                )
            return
        if self._detached_noted or not self.barrier.started():
            return
        if self._tasks_seen_at is None:
            self._tasks_seen_at = now
        elif now - self._tasks_seen_at >= REACH_TIMEOUT + 5.0:
            where = f"at {self.address}" if self.address else "(RINGTRAIN_DRIVER_HOST=none)"
            self._note_detached(f"no task agent has reached this process {where}")

    def _note_detached(self, why: str) -> None:
        if self._detached_noted:
            return
        self._detached_noted = True
        self.printer.notice(
            f"{why}, so worker output does not stream here: results and errors arrive when the Spark "
            f"stage ends, with each rank's last lines; every line is in {self.job_dir}/logs/rank-N.log "
            "on the rank's host. Set RINGTRAIN_DRIVER_HOST to an address of this machine that the "
            "executors can reach for live output"
        )

    def _take_rows(self) -> None:
        """What the agents put in the stage's output rows, once the stage has ended."""
        self._rows_taken = True
        if self.barrier.error is not None:
            return
        verdict: BaseException | None = None
        for partition in sorted(self.barrier.records):
            for blob in self.barrier.records[partition]:
                try:
                    message = unseal_row(self._secret, blob)
                except RingtrainError as err:
                    logger.warning("partition %s: dropped an output row: %s", partition, err)
                    continue
                if isinstance(message, Verdict):
                    verdict = message.error
                elif isinstance(message, Tail):
                    self._show_tail(message)
                elif isinstance(message, Notice):
                    self.printer.notice(message.text)
                else:
                    self._handle(None, message)
        if verdict is not None:
            # The hub saw the job as the driver would have: its error is the one to raise.
            is_ours = isinstance(verdict, RingtrainError)
            self.agent_error = verdict if is_ours else RingtrainError(f"{type(verdict).__name__}: {verdict}")
            self.trigger = "agent"

    def _show_tail(self, tail: Tail) -> None:
        if not self._tails_shown:
            self._tails_shown = True
            reach = f"at {self.address}" if self.address else "(RINGTRAIN_DRIVER_HOST=none)"
            self._note_detached(f"the task agents did not reach this process {reach}")
            self.printer.notice(
                f"each rank's last lines of output follow (up to {TAIL_LINES}); "
                f"{self.job_dir}/logs/rank-N.log on the rank's host has every line"
            )
        for stream, line in tail.lines:
            self.printer(tail.rank, stream, line)

    def _agents_quiet(self) -> bool:
        """After the Spark job ended: have all agents finished sending (or had their chance)?

        An agent's last frames can still be in flight, or being unpickled, when its task
        has already ended, so the driver waits for every ``done``, up to ``abort_wait``.
        """
        if self._barrier_done_at is None:
            self._barrier_done_at = time.monotonic()
        if len(self.done_tasks) >= self.num_tasks:
            return True
        return time.monotonic() - self._barrier_done_at >= self.config.abort_wait

    def _drain(self) -> None:
        while True:
            try:
                conn, message = self.server.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(conn, message)

    def _lose(self, partition: int, what: str) -> None:
        if partition not in self.lost and partition not in self.done_tasks:
            self.lost[partition] = what
            self._note("lost")

    def _handle(self, conn: Connection | None, message: Any) -> None:
        """One message from an agent's connection, or (``conn`` None) from the output rows."""
        if message is None:  # the connection closed
            hello = self.agents.get(conn)
            if conn in self.unlinked:
                return  # told to go on without this process
            if hello is not None and hello.partition not in self.done_tasks:
                self._lose(
                    hello.partition, f"its agent (pid {hello.pid}) closed the connection before finishing"
                )
            return
        if isinstance(message, Log):
            self.printer(message.rank, message.stream, message.line)
        elif isinstance(message, Heartbeat):
            self.inspector.update(message.ranks)
        elif isinstance(message, Result):
            self.results[message.rank] = message.data
        elif isinstance(message, Failed):
            self.failures.append(message.failure)
            self.inspector.forget(message.failure.rank)
            self._note("failed")
        elif isinstance(message, StackDump):
            self._stacks[message.rank] = message.text
        elif isinstance(message, Hello):
            self.agents[conn] = message
            if self._first_hello_at is None:
                self._first_hello_at = time.monotonic()
            if self.gathering:
                self._unlink(conn)
            elif self._mpi_launch is not None:
                conn.send(self._mpi_launch)
        elif isinstance(message, Offer):
            self._offer(conn, message)
        elif isinstance(message, Done):
            self.done_tasks.add(message.partition)
        elif isinstance(message, TaskLost):
            self._lose(message.partition, message.reason)
        elif isinstance(message, MpiLaunch):
            # Partition 0's mpiexec printed one proxy command per task: hand them to every agent,
            # and to any that links later (agents link to a hub at their own pace).
            self._mpi_launch = message
            self.server.broadcast(message)
        elif isinstance(message, AgentFailed):
            if self.agent_error is None:
                error = message.error
                self.agent_error = (
                    error
                    if isinstance(error, RingtrainError)
                    else RingtrainError(
                        f"the task agent of partition {message.partition} failed: {message.text}"
                    )
                )
            self._note("agent")
        elif isinstance(message, BackendFailed):
            if self.backend_failure is None:
                self.backend_failure = f"partition {message.partition}: {message.reason}"
            self._note("backend")
        elif isinstance(message, LogsDropped):
            self.printer.notice(
                f"the live output of rank {message.rank} fell behind and skipped {message.count} line(s); "
                f"{self.job_dir}/logs/rank-{message.rank}.log has every line"
            )
        else:
            logger.warning("ignoring an unknown control message %r", type(message).__name__)

    def _stage_data_error(self) -> DataError | None:
        """The DataError an executor raised while encoding the job's rows, which fails the
        stage before any task agent starts (a null, an array of another length)."""
        err = self.barrier.error
        return data_error_from(err) if err is not None else None

    def _job_ended_early(self) -> RingtrainError:
        if self.failures:
            return self._worker_error()
        data_error = self._stage_data_error()
        if data_error is not None:
            return data_error
        err = self.barrier.error
        if err is not None and not self._linked():
            # No agent could reach this process, so a failed stage is all it learns: a task (and
            # with it an agent) ended before it could put its report in the output rows.
            said = spark.error_line(err).rstrip(".")
            return AgentLostError(
                f"a task of the barrier stage failed before its agent could report: Spark reported: "
                f"{said}. The other tasks were stopped; if an executor was lost, retry with max_restarts",
                spark_reason=said,
            )
        if err is None:
            return ChannelError(
                f"the Spark job ended but only {len(self.results)} of {self.num_proc} workers "
                "reported; see the executor logs"
            )
        return RingtrainError(
            f"the Spark barrier job failed before the workers finished: {spark.error_line(err)}"
        )
