"""The task agent's supervision, with fake workers, a fake driver connection and a fake allGather."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time

import pytest

from ringtrain import progress
from ringtrain.config import JobConfig
from ringtrain.errors import BackendStartError, ConfigError, JobTimeoutError, StallError, WorkerError
from ringtrain.launcher.agent import DriverLink, RankLogs, TaskAgent, TaskJob, _LinkRelay
from ringtrain.launcher.workers import WorkerGroup, WorkerPool, format_stacks, is_blocked
from ringtrain.protocol import (
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
    Tail,
    TaskLost,
    Verdict,
    unseal_row,
)


class FakeConn:
    """The driver's side of the control channel, as the agent sees it."""

    def __init__(self):
        self.sent: list = []
        self.inbox: queue.Queue = queue.Queue()
        self.last_heard = time.monotonic()
        self.closed = threading.Event()
        self.hold = threading.Event()  # set: send() blocks (a slow driver)
        # How the driver answers an offer: with the plan of a one-task job, by default.
        self.answer = lambda offer: Rendezvous((offer.offer,))

    def send(self, message):
        while self.hold.is_set():
            time.sleep(0.01)
        self.sent.append(message)
        if isinstance(message, Offer) and self.answer is not None:
            self.inbox.put(self.answer(message))

    def recv(self):
        message = self.inbox.get()
        if message is None:
            raise EOFError("closed")
        self.last_heard = time.monotonic()
        return message

    def local_host(self):
        return "127.0.0.1"

    def close(self):
        self.closed.set()
        self.inbox.put(None)

    def of(self, kind):
        return [m for m in self.sent if isinstance(m, kind)]


class FakeGroup(WorkerGroup):
    """Workers as threads: each rank's plan returns its exit code, unless a signal ends it first."""

    def __init__(self, specs, files, sink, plans):
        super().__init__(specs, files, sink)
        self.plans = plans
        self.codes: dict[int, int] = {}
        self.stop_calls = 0
        self.killed: list[int] = []
        self.deaf: set[int] = set()  # ranks that cannot act on SIGTERM (blocked in native code)

    def start(self):
        for spec in self.specs:
            threading.Thread(target=self._run, args=(spec.rank,), daemon=True).start()
        return True

    def _run(self, rank):
        code = self.plans[rank](self, rank)
        self.codes.setdefault(rank, code)

    def poll(self, rank):
        return self.codes.get(rank)

    def drain(self, rank):
        pass

    def stop(self, grace):
        self.stop_calls += 1
        super().stop(grace)

    def _signal(self, rank, sig):
        if rank in self.codes:
            return False
        self.killed.append(rank)
        if sig == signal.SIGKILL or rank not in self.deaf:
            self.codes[rank] = -sig
        return True

    def _finish_stop(self):
        pass

    def stacks(self, rank, wait=2.0):
        # The progress files name this test's own pid: never signal it.
        return f"(stack of fake rank {rank})"


def returns(value: bytes, output=()):
    def plan(group, rank):
        for line in output:
            group.sink(rank, "stdout", line)
        group.files.result(rank).write_bytes(value)
        while not group.files.release.exists() and rank not in group.codes:
            time.sleep(0.01)
        return 0

    return plan


def fails(code, text="Traceback: boom\n", after=0.0):
    def plan(group, rank):
        time.sleep(after)
        group.files.error(rank).write_text(text)
        return code

    return plan


def exits_quietly(group, rank):
    return 0  # no result: as after os._exit(0)


def hangs(group, rank):
    while rank not in group.codes:
        time.sleep(0.01)
    return group.codes[rank]


def in_collective(group, rank):
    recorder = progress.FileRecorder(group.files.progress(rank))
    recorder.enter("allreduce(grads)")
    group.deaf.add(rank)
    return hangs(group, rank)


def _job(**kw):
    defaults = dict(
        driver=("127.0.0.1", 1),
        secret=b"s" * 32,
        backend="tf",
        payload=b"payload",
        worker_env={},
        kill_grace=2.0,
        show_tf_noise=False,
        heartbeat_interval=0.1,
        heartbeat_timeout=30.0,
    )
    return TaskJob(**{**defaults, **kw})


class IdlePool(WorkerPool):
    """Starts no process: the fake groups here need none."""

    def prepare(self, envs):
        self.prepared = list(envs)


class Harness:
    """One agent for a task with two GPUs (two workers, ranks 0 and 1), run on a thread."""

    def __init__(self, tmp_path, plans, raises=None, **job):
        self.conn = FakeConn()
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        self.plans = plans
        self.group = None
        harness = self

        class Agent(TaskAgent):
            def _make_group(self, specs, offers, host, link):
                if raises:
                    raise raises
                harness.group = FakeGroup(specs, self.files, self._output, harness.plans)
                return harness.group

        self.agent = Agent(
            _job(**job),
            partition=0,
            gpus=("0", "1"),
            all_gather=self._no_gather,
            workdir=self.workdir,
            connect=lambda address, secret, **kw: self.conn,
            pool=IdlePool(),
        )
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    @staticmethod
    def _no_gather(offer):
        raise AssertionError("a linked agent's rendezvous must not use the barrier's allGather")

    def run(self, timeout=10.0):
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not finish"

    def until(self, condition, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition never held"
            time.sleep(0.01)


def test_results_then_release_then_done(tmp_path):
    h = Harness(tmp_path, {0: returns(b"r0", ["hello"]), 1: returns(b"r1")}, job_dir=str(tmp_path / "job"))
    h.thread.start()
    h.until(lambda: len(h.conn.of(Result)) == 2)
    assert {m.rank: m.data for m in h.conn.of(Result)} == {0: b"r0", 1: b"r1"}
    h.until(lambda: h.conn.of(Heartbeat))
    h.conn.inbox.put(Release())
    h.run()
    assert isinstance(h.conn.sent[0], Hello) and isinstance(h.conn.sent[-1], Done)
    assert Log(0, "stdout", "hello") in h.conn.sent
    assert not h.conn.of(Failed)
    assert not h.workdir.exists()  # removed before "done"
    assert "hello" in (tmp_path / "job" / "logs" / "rank-0.log").read_text()


def test_a_failing_worker_is_reported_and_its_peer_stopped(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: fails(3, after=0.2)})
    h.run()
    (failed,) = h.conn.of(Failed)
    assert (failed.failure.rank, failed.failure.exitcode) == (1, 3)
    assert "Traceback: boom" in failed.failure.traceback
    assert h.group.killed == [0] and h.group.stop_calls == 1
    assert isinstance(h.conn.sent[-1], Done)


def test_exit_zero_without_a_result_is_a_failure(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: exits_quietly})
    h.run()
    (failed,) = h.conn.of(Failed)
    assert failed.failure.exitcode == 0 and "os._exit(0)" in failed.failure.traceback


def test_abort_from_the_driver_stops_every_worker(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: hangs})
    h.thread.start()
    h.until(lambda: h.conn.of(Heartbeat))
    h.conn.inbox.put(Abort("a peer failed"))
    h.run()
    assert sorted(h.group.killed) == [0, 1] and not h.conn.of(Failed)
    assert isinstance(h.conn.sent[-1], Done)


def test_a_silent_driver_stops_the_workers_in_bounded_time(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: hangs}, heartbeat_timeout=0.5)
    started = time.monotonic()
    h.run(timeout=5)
    assert time.monotonic() - started < 3
    assert sorted(h.group.killed) == [0, 1]


def test_pings_keep_the_agent_going(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: hangs}, heartbeat_timeout=0.5)
    h.thread.start()
    for _ in range(15):  # 1.5 s, three times the timeout
        h.conn.inbox.put(Ping())
        time.sleep(0.1)
    assert h.thread.is_alive() and not h.group.killed
    h.conn.inbox.put(Abort("done testing"))
    h.run()


def test_losing_the_spark_task_is_reported_and_stops_everything(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: hangs})
    h.thread.start()
    h.until(lambda: h.conn.of(Heartbeat))
    h.agent.lose_task("the Spark task vanished")
    h.run()
    assert h.conn.of(TaskLost) == [TaskLost(0, "the Spark task vanished")]
    assert sorted(h.group.killed) == [0, 1]


def test_backend_that_cannot_start_is_reported(tmp_path):
    h = Harness(tmp_path, {}, raises=BackendStartError("no mpiexec here"))
    h.run()
    assert h.conn.of(BackendFailed) == [BackendFailed(0, "no mpiexec here")]
    assert isinstance(h.conn.sent[-1], Done)


def test_heartbeats_carry_each_ranks_progress(tmp_path):
    h = Harness(tmp_path, {0: in_collective, 1: hangs})
    h.thread.start()
    h.until(lambda: any(b.ranks and b.ranks[0].collective for b in h.conn.of(Heartbeat)))
    beat = [b for b in h.conn.of(Heartbeat) if b.ranks and b.ranks[0].collective][-1]
    zero, one = beat.ranks
    assert zero.collective == "allreduce(grads)" and zero.seq == 1
    assert one.silent_for is None  # no progress file: still starting up
    h.conn.inbox.put(Abort("done"))
    h.run()


def test_blocked_worker_is_killed_early(tmp_path):
    h = Harness(tmp_path, {0: in_collective, 1: fails(1, after=0.3)}, kill_grace=30.0)
    started = time.monotonic()
    h.run(timeout=10)
    # Not the whole 30 s grace: rank 0 is stuck in a collective its peer will never join.
    assert time.monotonic() - started < 5
    assert h.group.killed.count(0) == 2  # SIGTERM, then SIGKILL once it was clearly blocked


def test_link_drops_log_lines_when_behind_but_never_control_messages():
    conn = FakeConn()
    conn.hold.set()
    link = DriverLink(conn, heartbeat_timeout=30, max_queued_logs=5)
    for i in range(50):
        link.send_log(Log(1, "stdout", f"line {i}"))
    link.send(Result(1, b"x"))
    conn.hold.clear()
    link.close()
    logs = conn.of(Log)
    assert len(logs) < 50 and conn.of(Result) == [Result(1, b"x")]
    dropped = conn.of(LogsDropped)
    assert sum(d.count for d in dropped) + len(logs) == 50 and all(d.rank == 1 for d in dropped)


def test_rank_logs_keep_every_line(tmp_path):
    logs = RankLogs(str(tmp_path), attempt=2)
    logs.open(0)
    for i in range(1000):
        logs.write(0, f"line {i}")
    logs.close()
    lines = (tmp_path / "logs" / "rank-0.log").read_text().splitlines()
    assert lines[0].startswith("==== ringtrain rank 0, restart 2, ")
    assert lines[1:] == [f"line {i}" for i in range(1000)]


def test_format_stacks_puts_the_main_thread_first():
    dump = (
        "Thread 0x00007f0000000002 (most recent call first):\n"
        '  File "/x/ringtrain/worker/_watch.py", line 80 in run\n\n'
        'Thread 0x00007f0000000003 (most recent call first):\n  File "/x/reader.py", line 5 in read\n\n'
        'Current thread 0x00007f0000000001 (most recent call first):\n  File "/x/train.py", line 9 in step\n'
    )
    text = format_stacks(dump, 0x00007F0000000001)
    assert text.splitlines()[0].startswith("Current thread 0x00007f0000000001")
    assert "reader.py" in text and "_watch.py" not in text


def test_is_blocked():
    def snap(entered_at=0.0, beat_at=0.0, runtime_since=0.0, python_since=0.0, stopping_at=0.0):
        return progress.Snapshot(
            pid=1, main_thread=1, seq=1, collective=None, left_at=0.0, where="", finished_at=0.0,
            entered_at=entered_at, beat_at=beat_at, runtime_since=runtime_since, python_since=python_since,
            stopping_at=stopping_at,
        )  # fmt: skip

    in_collective = snap(entered_at=99.0)
    assert not is_blocked(in_collective, sigterm_at=100.0, now=100.5)  # too soon to tell
    assert is_blocked(in_collective, sigterm_at=100.0, now=102.0)
    # Its SIGTERM handler ran: it is cleaning up and gets the whole grace.
    assert not is_blocked(snap(entered_at=99.0, stopping_at=100.2), sigterm_at=100.0, now=110.0)
    in_tf = snap(beat_at=101.2, runtime_since=100.4)  # first sampled in the call just after the signal
    assert is_blocked(in_tf, sigterm_at=100.0, now=102.0)
    stale = snap(beat_at=99.5, runtime_since=90.0)  # no sample since the signal yet
    assert not is_blocked(stale, sigterm_at=100.0, now=102.0)
    python = snap(beat_at=101.5, python_since=95.0)  # e.g. a user's own handler writing a checkpoint
    assert not is_blocked(python, sigterm_at=100.0, now=110.0)
    assert not is_blocked(None, sigterm_at=100.0, now=110.0)


def test_an_error_in_the_agent_itself_reaches_the_driver(tmp_path):
    h = Harness(
        tmp_path, {}, raises=ConfigError("gpus_per_worker=3 does not divide the 2 GPUs of partition 0")
    )
    h.run()
    (failed,) = h.conn.of(AgentFailed)
    assert isinstance(failed.error, ConfigError) and "gpus_per_worker=3" in failed.text
    assert isinstance(h.conn.sent[-1], Done)


def test_heartbeats_flow_while_the_rendezvous_waits(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: hangs})
    h.conn.answer = None  # other tasks of the barrier are still starting
    h.thread.start()
    h.until(lambda: len(h.conn.of(Heartbeat)) >= 3)
    assert h.group is None  # no worker yet, and the driver already hears the agent
    (offer,) = h.conn.of(Offer)
    h.conn.inbox.put(Rendezvous((offer.offer,)))
    h.until(lambda: h.group is not None)
    h.conn.inbox.put(Abort("done"))
    h.run()


def test_the_rendezvous_goes_over_the_channel_and_keeps_unknown_offer_fields(tmp_path):
    h = Harness(tmp_path, {0: returns(b"r0"), 1: returns(b"r1")})
    # The driver passes offers on as text: a field this agent's TaskOffer may not know survives.
    peer = json.dumps({"partition": 1, "host": "10.0.0.9", "ports": [7001], "gpus": [], "data": {"x": 3}})
    h.conn.answer = lambda offer: Rendezvous((offer.offer, peer))
    h.thread.start()
    h.until(lambda: h.group is not None)
    (offer,) = h.conn.of(Offer)
    assert json.loads(offer.offer)["gpus"] == ["0", "1"] and json.loads(offer.offer)["host"] == "127.0.0.1"
    assert [s.rank for s in h.group.specs] == [0, 1] and h.group.specs[0].size == 3
    assert "10.0.0.9:7001" in h.group.specs[0].peers
    h.until(lambda: len(h.conn.of(Result)) == 2)
    h.conn.inbox.put(Release())
    h.run()
    assert h.agent.rows == [] and not h.agent.detached


def test_an_abort_during_the_rendezvous_stops_the_agent_without_starting_workers(tmp_path):
    h = Harness(tmp_path, {0: hangs, 1: hangs})
    h.conn.answer = lambda offer: Abort("another task failed")
    h.run()
    assert h.group is None and not h.conn.of(AgentFailed)
    assert isinstance(h.conn.sent[-1], Done)


# ------------------------------------------------------------------ detached: no driver to reach


class ThreadGather:
    """The barrier's allGather for agents running as threads of this process."""

    def __init__(self, parties):
        self.parties = parties
        self.items = {}
        self.cond = threading.Condition()

    def of(self, partition):
        def gather(message):
            with self.cond:
                self.items[partition] = message
                self.cond.notify_all()
                assert self.cond.wait_for(lambda: len(self.items) == self.parties, timeout=20)
                return [self.items[p] for p in sorted(self.items)]

        return gather


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DetachedJob:
    """Two real agents (partitions 0 and 1, one rank each) whose driver cannot be reached:
    real control connections to partition 0's hub, fake workers, a thread allGather."""

    def __init__(self, tmp_path, plans, driver=None, **job):
        self.plans = plans
        self.groups = {}
        self.gathered = []
        gather = ThreadGather(2)
        job = _job(driver=driver or ("127.0.0.1", _closed_port()), job_dir=str(tmp_path / "job"), **job)
        outer = self

        class Agent(TaskAgent):
            def _make_group(self, specs, offers, host, link):
                outer.groups[self.partition] = FakeGroup(specs, self.files, self._output, outer.plans)
                return outer.groups[self.partition]

        def gather_of(partition):
            def call(message):
                outer.gathered.append(message)
                return gather.of(partition)(message)

            return call

        self.agents = []
        for partition in (0, 1):
            workdir = tmp_path / f"work-{partition}"
            workdir.mkdir()
            self.agents.append(Agent(job, partition, (), gather_of(partition), workdir, pool=IdlePool()))
        self.threads = [threading.Thread(target=a.run, daemon=True) for a in self.agents]

    def run(self, timeout=30.0):
        for thread in self.threads:
            thread.start()
        for thread in self.threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "an agent did not finish"
        return [[unseal_row(b"s" * 32, row) for row in agent.rows] for agent in self.agents]


def talks_then(plan, *lines):
    def wrapped(group, rank):
        for line in lines:
            group.sink(rank, "stdout", f"{line} from {rank}")
        return plan(group, rank)

    return wrapped


def test_unreachable_driver_results_and_tails_come_in_the_rows(tmp_path):
    job = DetachedJob(
        tmp_path, {0: talks_then(returns(b"r0"), "epoch 1"), 1: talks_then(returns(b"r1"), "epoch 1")}
    )
    rows = job.run()
    assert all(agent.detached for agent in job.agents)
    assert len(job.gathered) == 2  # one allGather each: offers and the hub's address
    zero, one = rows
    assert [m for m in zero if isinstance(m, Result)] == [Result(0, b"r0")]
    assert [m for m in one if isinstance(m, Result)] == [Result(1, b"r1")]
    assert Tail(1, (("stdout", "epoch 1 from 1"),)) in one
    assert zero[-1] == Verdict(None)  # the hub saw every rank succeed
    # Every line is in the job directory as well.
    assert "epoch 1 from 1" in (tmp_path / "job" / "logs" / "rank-1.log").read_text()


def test_unreachable_driver_a_failing_rank_stops_the_others_through_the_hub(tmp_path):
    job = DetachedJob(
        tmp_path, {0: hangs, 1: talks_then(fails(3, "Traceback: boom\n", after=0.3), "loading")}
    )
    started = time.monotonic()
    zero, one = job.run()
    assert time.monotonic() - started < 10  # rank 0 did not wait for anything but the hub's abort
    assert job.groups[0].killed == [0]
    (failed,) = [m for m in one if isinstance(m, Failed)]
    assert failed.failure.rank == 1 and failed.failure.output_tail == ("loading from 1",)
    (verdict,) = [m for m in zero if isinstance(m, Verdict)]
    assert isinstance(verdict.error, WorkerError) and verdict.error.ranks == [1]
    text = str(verdict.error)
    assert "exited with code 3" in text and "Traceback: boom" in text and "loading from 1" in text


def test_unreachable_driver_the_hub_finds_a_stall(tmp_path):
    def python_only(group, rank):
        progress.FileRecorder(group.files.progress(rank))  # running, never enters a collective
        return hangs(group, rank)

    settings = JobConfig(stall_warning=0.3, stall_timeout=1.0, heartbeat_interval=0.1, kill_grace=2.0)
    job = DetachedJob(tmp_path, {0: in_collective, 1: python_only}, config=settings)
    zero, one = job.run()
    (verdict,) = [m for m in zero if isinstance(m, Verdict)]
    assert isinstance(verdict.error, StallError) and verdict.error.waiting == (0,)
    assert verdict.error.missing == (1,)
    assert any(isinstance(m, Notice) and "stall warning" in m.text for m in zero)


def test_driver_declared_unreachable_is_never_dialled(tmp_path):
    job = DetachedJob(tmp_path, {0: returns(b"a"), 1: returns(b"b")}, driver=("", 0))
    dialled = []
    for agent in job.agents:
        real = agent._connect
        agent._connect = lambda address, secret, real=real, **kw: (
            dialled.append(address) or real(address, secret, **kw)
        )
    zero, one = job.run()
    hub = job.agents[0]._hub.address
    assert dialled == [hub, hub]  # only the agents' hub
    assert zero[-1] == Verdict(None)


def test_told_to_gather_the_agent_leaves_the_driver_for_the_hub(tmp_path):
    h = Harness(tmp_path, {1: returns(b"r1"), 2: returns(b"r2")})
    h.conn.answer = lambda offer: Rendezvous(gather=True)
    hub_conn = FakeConn()
    peer = {"offer": json.dumps({"partition": 1, "host": "10.0.0.9", "ports": [7001], "gpus": []}),
            "hub": ["10.0.0.9", 7100]}  # fmt: skip
    h.agent.partition = 2  # no hub of its own: partition 1 (listed first) runs it
    h.agent._all_gather = lambda mine: [json.dumps(peer), mine]
    h.agent._connect = lambda address, secret, **kw: hub_conn if address == ("10.0.0.9", 7100) else h.conn
    h.thread.start()
    h.until(lambda: len(hub_conn.of(Result)) == 2)
    assert h.conn.closed.is_set()  # the driver's link is closed; the hub's is used
    assert hub_conn.of(Result) == [Result(1, None), Result(2, None)]  # the hub only counts them
    hub_conn.inbox.put(Release())
    h.run()
    rows = [unseal_row(b"s" * 32, row) for row in h.agent.rows]
    assert Result(1, b"r1") in rows and Result(2, b"r2") in rows


def test_unreachable_driver_the_hub_keeps_the_jobs_deadline(tmp_path):
    settings = JobConfig(timeout=30.0, kill_grace=2.0)
    job = DetachedJob(tmp_path, {0: hangs, 1: hangs}, config=settings, deadline=time.time() + 1.0)
    started = time.monotonic()
    zero, one = job.run()
    assert time.monotonic() - started < 8
    (verdict,) = [m for m in zero if isinstance(m, Verdict)]
    assert isinstance(verdict.error, JobTimeoutError) and "ranks [0, 1]" in str(verdict.error)
    assert job.groups[0].killed == [0] and job.groups[1].killed == [1]  # stopped, with the grace


def test_unreachable_driver_the_mpi_launch_reaches_an_agent_that_links_late(tmp_path):
    launches = {}

    class RelayGroup(FakeGroup):
        """Partition 0 publishes the proxy commands, every partition waits for them."""

        def __init__(self, specs, files, sink, plans, link, partition):
            super().__init__(specs, files, sink, plans)
            self.relay, self.partition = _LinkRelay(link), partition

        def start(self):
            if self.partition == 0:
                self.relay.publish(MpiLaunch(proxies=(("proxy", "0"), ("proxy", "1"))))
            launches[self.partition] = self.relay.wait()
            return super().start()

    job = DetachedJob(tmp_path, {0: returns(b"a"), 1: returns(b"b")})
    for agent in job.agents:

        def make(specs, offers, host, link, agent=agent):
            group = RelayGroup(specs, agent.files, agent._output, job.plans, link, agent.partition)
            job.groups[agent.partition] = group
            return group

        agent._make_group = make
    real = job.agents[1]._connect

    def late(address, secret, **kw):
        time.sleep(1.0)  # partition 0 has published by now
        return real(address, secret, **kw)

    job.agents[1]._connect = late
    zero, one = job.run()
    assert launches[0] == launches[1] == MpiLaunch(proxies=(("proxy", "0"), ("proxy", "1")))
    assert zero[-1] == Verdict(None)


def test_the_task_job_crosses_the_keepers_socketpair():
    import pickle

    job = _job(config=JobConfig(worker_env={"A": "1"}, spark_conf={"k": "v"}), deadline=123.0)
    again = pickle.loads(pickle.dumps(job))
    assert again == job and again.config.worker_env["A"] == "1"
    with pytest.raises(TypeError):
        again.config.worker_env["B"] = "2"  # still read-only


def test_ports_are_released_even_when_stopping_the_workers_fails(tmp_path, monkeypatch):
    from ringtrain.launcher import agent as agent_module

    held = []
    original = agent_module.reserve_ports

    def reserve(count):
        held.extend(original(count))
        return list(held)

    monkeypatch.setattr(agent_module, "reserve_ports", reserve)
    h = Harness(tmp_path, {0: fails(3), 1: fails(4)})

    class _StopFails(FakeGroup):
        def stop(self, grace):
            super().stop(grace)
            raise OSError("the process group is gone")

    def make_group(specs, offers, host, link):
        h.group = _StopFails(specs, h.agent.files, h.agent._output, h.plans)
        return h.group

    h.agent._make_group = make_group
    h.agent.run()  # logs the failed stop, then finishes as usual
    assert isinstance(h.conn.sent[-1], Done)
    assert len(held) == 2
    assert all(r._sock.fileno() == -1 for r in held)
