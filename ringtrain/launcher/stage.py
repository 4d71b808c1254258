"""The launch stage: one Spark barrier stage built with the DataFrame API.

``DataFrame.mapInArrow(fn, schema, barrier=True)`` runs the same way on a classic
SparkSession and on a Spark Connect session, which has no SparkContext and so no
RDD API. Each task's function may return records (bytes). They come back as the
stage's output rows, cut into chunks small enough for Spark Connect's Arrow batches,
and the driver puts them back together in order.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import ChannelError

logger = logging.getLogger(__name__)

OUTPUT_SCHEMA = "partition int, record int, chunk int, last boolean, data binary"


def _output_schema() -> Any:
    """OUTPUT_SCHEMA as a StructType: a classic session would parse the string in the JVM
    on every stage (about 30 ms here)."""
    from pyspark.sql.types import BinaryType, BooleanType, IntegerType, StructField, StructType

    types = {"int": IntegerType(), "boolean": BooleanType(), "binary": BinaryType()}
    fields = [column.split() for column in OUTPUT_SCHEMA.split(",")]
    return StructType([StructField(name, types[kind]) for name, kind in fields])


# A Spark Connect server sends results in Arrow batches of about 70 % of
# spark.connect.grpc.arrow.maxBatchSize (4 MiB by default), and its Python client
# refuses gRPC messages over 128 MiB; servers older than 4.1 never split one large row
# across messages. One-MiB rows stay well inside every one of those limits.
CHUNK_BYTES = 1 << 20

# How long cancel() keeps interrupting a stage whose job may still be on its way to
# the cluster: a job submitted just after an interrupt would otherwise run on.
CANCEL_RETRY_SECONDS = 30.0


def is_connect(session: Any) -> bool:
    """Whether ``session`` is a Spark Connect session (no SparkContext, no JVM here)."""
    return type(session).__module__.startswith("pyspark.sql.connect")


@dataclass(frozen=True)
class StageTask:
    """What a task function receives: its partition, its GPUs, the barrier's allGather,
    and its partition of the stage's input as Arrow record batches."""

    partition: int
    gpus: tuple[str, ...]
    all_gather: Callable[[str], list[str]]
    batches: Iterator[Any]


TaskFn = Callable[[StageTask], "Iterable[bytes] | None"]


# The chunk number of the row that closes a task's output; its ``record`` holds how many
# records the task sent, so a record lost at the end is noticed too.
END_CHUNK = -1


def chunk_rows(partition: int, records: Iterable[bytes], chunk_bytes: int = CHUNK_BYTES) -> Iterator[dict]:
    """Pure: the output rows of one task's records, each ``data`` at most ``chunk_bytes`` long.

    An empty record still gives one row, so every record arrives, in order; a last row
    (chunk END_CHUNK) counts them.
    """
    count = 0
    for count, data in enumerate(records, start=1):
        view = memoryview(data)
        for chunk, start in enumerate(range(0, max(len(view), 1), chunk_bytes)):
            yield {
                "partition": partition,
                "record": count - 1,
                "chunk": chunk,
                "last": start + chunk_bytes >= len(view),
                "data": bytes(view[start : start + chunk_bytes]),
            }
    yield {"partition": partition, "record": count, "chunk": END_CHUNK, "last": True, "data": b""}


def assemble(rows: Iterable[dict]) -> dict[int, list[bytes]]:
    """Pure: the records of each partition, from output rows in any order.

    Raises ChannelError when a record, or a chunk of one, is missing.
    """
    counts: dict[int, int] = {}
    by_record: dict[tuple[int, int], list[tuple[int, bool, bytes]]] = {}
    for row in rows:
        if row["chunk"] == END_CHUNK:
            counts[row["partition"]] = row["record"]
        else:
            by_record.setdefault((row["partition"], row["record"]), []).append(
                (row["chunk"], row["last"], row["data"])
            )
    records: dict[int, list[bytes]] = {partition: [] for partition in counts}
    for (partition, record), chunks in sorted(by_record.items()):
        chunks.sort()
        whole = [c[0] for c in chunks] == list(range(len(chunks))) and chunks[-1][1]
        if not whole or len(records.setdefault(partition, [])) != record:
            raise _incomplete(partition)
        records[partition].append(b"".join(c[2] for c in chunks))
    for partition, got in records.items():
        if counts.get(partition) != len(got):
            raise _incomplete(partition)
    return records


def _incomplete(partition: int) -> ChannelError:
    return ChannelError(
        f"the output of partition {partition} arrived incomplete; the Spark job lost part of its result"
    )


def _run_task(task_fn: TaskFn, batches: Iterator[Any]) -> Iterator[Any]:
    """The function ``mapInArrow`` runs in every barrier task."""
    import pyarrow as pa
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    resources = ctx.resources()
    gpus = tuple(resources["gpu"].addresses) if "gpu" in resources else ()
    task = StageTask(ctx.partitionId(), gpus, ctx.allGather, batches)
    records = list(task_fn(task) or ())
    for _ in batches:  # input the task left unread; Spark expects it consumed
        pass
    schema = pa.schema(
        [
            ("partition", pa.int32()),
            ("record", pa.int32()),
            ("chunk", pa.int32()),
            ("last", pa.bool_()),
            ("data", pa.binary()),
        ]
    )
    for row in chunk_rows(task.partition, records):
        yield pa.RecordBatch.from_pylist([row], schema=schema)


class _StartWatch:
    """A Spark Connect progress handler that notes when the stage's tasks are running.

    Connect calls handlers in the thread whose operation reports progress, so only the
    stage's own thread counts.
    """

    def __init__(self, thread: threading.Thread, started: threading.Event):
        self._thread = thread
        self._started = started

    def __call__(self, stages, inflight_tasks: int, operation_id: str | None, done: bool) -> None:
        if threading.current_thread() is self._thread and (
            inflight_tasks or any(s.num_completed_tasks for s in stages or ())
        ):
            self._started.set()


class BarrierStage:
    """Runs ``task_fn`` in a barrier stage of ``num_tasks`` tasks, on a background thread.

    ``data`` is the stage's input: a DataFrame with exactly ``num_tasks`` partitions, or
    None for one row per task. ``profile`` is a ResourceProfile for this stage alone
    (stage-level scheduling), or None for the session's task resources. After the stage
    ends, :attr:`records` holds each partition's records and :attr:`error` what it raised.

    Cancellation: on a Connect session the job carries a session tag and
    ``interruptTag`` stops it. On a classic session it runs in a job group and
    ``cancelJobGroup`` stops it: the classic session's own tags are local to the thread
    that added them, so ``interruptTag`` from another thread finds nothing to stop.
    """

    def __init__(
        self,
        session: Any,
        num_tasks: int,
        task_fn: TaskFn,
        *,
        data: Any = None,
        profile: Any = None,
    ):
        self._session = session
        self._connect = is_connect(session)
        self.num_tasks = num_tasks
        self._task_fn = task_fn
        self._data = data
        self._profile = profile
        self.tag = f"ringtrain-{uuid.uuid4().hex[:12]}"
        self.error: BaseException | None = None
        self.records: dict[int, list[bytes]] = {}
        self._started = threading.Event()
        self._cancelled = threading.Event()
        self._canceller: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name=self.tag, daemon=True)

    def dataframe(self) -> Any:
        """The stage as a DataFrame of output rows (not yet run)."""
        data = self._data
        if data is None:
            data = self._session.range(self.num_tasks, numPartitions=self.num_tasks)
        return data.mapInArrow(
            partial(_run_task, self._task_fn), _output_schema(), barrier=True, profile=self._profile
        )

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._tagged():
                if self._cancelled.is_set():
                    raise InterruptedError("the stage was cancelled before it started")
                table = self.dataframe().toArrow()
            self.records = assemble(table.to_pylist())
        except BaseException as err:  # reported by whoever waits on the stage
            self.error = err

    @contextmanager
    def _tagged(self) -> Iterator[None]:
        """Marks this thread's jobs, so :meth:`cancel` and :meth:`started` can find them."""
        session = self._session
        if self._connect:
            watch = _StartWatch(self._thread, self._started)
            session.registerProgressHandler(watch)
            session.addTag(self.tag)
            try:
                yield
            finally:
                session.removeTag(self.tag)
                session.removeProgressHandler(watch)
            return
        sc = session.sparkContext
        sc.setJobGroup(self.tag, "ringtrain barrier stage", interruptOnCancel=True)
        try:
            yield
        finally:
            # The JVM thread behind this Python thread may serve another one later.
            for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
                sc.setLocalProperty(key, None)

    def started(self) -> bool:
        """Whether the stage's tasks have started (Spark gives a barrier stage all its
        slots at once, so one running task means every task has its slot)."""
        if self._started.is_set():
            return True
        if not self._connect:
            try:
                tracker = self._session.sparkContext.statusTracker()
                for job_id in tracker.getJobIdsForGroup(self.tag):
                    job = tracker.getJobInfo(job_id)
                    for stage_id in job.stageIds if job else ():
                        info = tracker.getStageInfo(stage_id)
                        if info and (info.numActiveTasks or info.numCompletedTasks):
                            self._started.set()
            except Exception as err:  # the context may be stopping
                logger.debug("reading the stage's progress failed: %s", err)
        return self._started.is_set()

    def wait_started(self, timeout: float, poll: float = 0.25) -> bool:
        """Wait up to ``timeout`` s for the tasks to start; False if they did not (or the
        stage ended first without starting)."""
        deadline = time.monotonic() + timeout
        while not self.started():
            if self.done() or time.monotonic() >= deadline:
                return self.started()
            time.sleep(poll)
        return True

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Stop the stage's job; its Python tasks are killed, and with them the agents."""
        self._cancelled.set()
        self._interrupt()
        if self._canceller is None and not self.done():
            self._canceller = threading.Thread(target=self._keep_cancelling, daemon=True)
            self._canceller.start()

    def _keep_cancelling(self) -> None:
        deadline = time.monotonic() + CANCEL_RETRY_SECONDS
        while not self.done() and time.monotonic() < deadline:
            self._thread.join(0.5)
            if not self.done():
                self._interrupt()

    def _interrupt(self) -> None:
        try:
            if self._connect:
                self._session.interruptTag(self.tag)
            else:
                self._session.sparkContext.cancelJobGroup(self.tag)
        except Exception as err:  # the session may already be stopped
            logger.debug("cancelling %s failed: %s", self.tag, err)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
