"""The agents' hub: the driver's part of a job, run among the task agents when they
cannot reach the driver.

Partition 0's agent starts it before the rendezvous and publishes its address in the
allGather. Every agent, partition 0's included, then links to it as it would to the
driver, and the hub runs the driver's own supervision loop (:class:`~.driver._Supervisor`)
over those links: it releases the workers once every rank has a result, stops every
agent at the first failure, watches the agents' heartbeats, relays the MPI launch, and
runs the stall inspector. What only the hub knows (its verdict, stall warnings) travels
to the driver in partition 0's output rows.

The peers of a job can always reach partition 0's host (the workers' collectives and
Hydra's proxies need that), so the hub can too.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import AgentLostError, RingtrainError
from ..protocol import Notice, Verdict
from .channel import ChannelServer
from .driver import _Supervisor

if TYPE_CHECKING:
    from .agent import TaskJob

logger = logging.getLogger(__name__)


class _NoStage:
    """Where the driver's loop watches a Spark stage, the hub has none: it ends only when
    the task hosting the hub vanishes, and cancelling is the driver's business."""

    error = None

    def __init__(self) -> None:
        self._ended = threading.Event()

    def end(self) -> None:
        self._ended.set()

    def done(self) -> bool:
        return self._ended.is_set()

    def cancel(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


class _Notices:
    """The hub's printer: worker lines never come here (the agents keep them); notices are
    kept for the driver and logged on the executor."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, rank: int, stream: str, line: str) -> None:
        pass

    def notice(self, text: str) -> None:
        logger.warning("ringtrain hub: %s", text)
        self.texts.append(f"{time.strftime('%H:%M:%S')} (seen by the agents' hub) {text}")


class _HubSupervisor(_Supervisor):
    """The driver's loop, plus one duty only the hub has: an agent that took part in the
    allGather but never links to the hub within the heartbeat timeout is lost."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._join_deadline = time.monotonic() + self.config.heartbeat_timeout

    def _check_agents(self, now: float) -> None:
        # Not the driver's rendezvous (the agents have done it by allGather): every agent
        # must link to the hub in time.
        if self._join_deadline and now >= self._join_deadline:
            self._join_deadline = 0.0
            linked = {hello.partition for hello in self.agents.values()}
            for partition in sorted(set(range(self.num_tasks)) - linked):
                self._lose(
                    partition,
                    f"its agent never linked to the agents' hub within {self.config.heartbeat_timeout:g} s "
                    "(RINGTRAIN_HEARTBEAT_TIMEOUT)",
                )


class AgentHub:
    """The hub in partition 0's agent: :meth:`start` once the rendezvous is known,
    :meth:`finish` for the messages the driver must get in the rows."""

    def __init__(self, job: TaskJob, host: str):
        self._job = job
        self._server = ChannelServer(job.secret, host)
        self.address = (host, self._server.port)
        self._stage = _NoStage()
        self._notices = _Notices()
        self._verdict: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, num_tasks: int, num_proc: int) -> None:
        job = self._job
        # The driver's deadline, on this host's clock: the hub stops the job at the same time,
        # with the same grace, and the driver gets its JobTimeoutError with the rows.
        deadline = None if job.deadline is None else time.monotonic() + (job.deadline - time.time())
        supervisor = _HubSupervisor(
            self._server, self._stage, num_tasks, num_proc, job.config, self._notices, deadline, job.job_dir
        )
        self._thread = threading.Thread(
            target=self._run, args=(supervisor,), name="ringtrain-hub", daemon=True
        )
        self._thread.start()

    def _run(self, supervisor: _Supervisor) -> None:
        try:
            supervisor.run()
        except RingtrainError as err:
            self._verdict = err
        except BaseException as err:  # reported to the driver, never lost in an executor log
            logger.exception("the agents' hub failed")
            self._verdict = RingtrainError(f"the agents' hub failed: {type(err).__name__}: {err}")

    def task_lost(self) -> None:
        """The Spark task hosting the hub vanished: the hub stops waiting for it."""
        self._stage.end()

    def finish(self, timeout: float) -> list[Any]:
        """Wait up to ``timeout`` s for the hub's loop to end; the messages for the driver."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._server.close()
        messages: list[Any] = [Notice(text) for text in self._notices.texts]
        if self._thread is None:
            return messages
        if self._thread.is_alive():
            verdict: BaseException | None = AgentLostError(
                f"the agents' hub did not see the job end within {timeout:g} s; some task agent "
                "did not stop in time"
            )
        else:
            verdict = self._verdict
        messages.append(Verdict(verdict))
        return messages
