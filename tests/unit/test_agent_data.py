"""The task agent's data steps, with a fake driver connection: the stored
rows' summary rides the rendezvous offer, the layout is written after it, workers find it, and
every way the rows can fail reaches the driver as a DataError."""

from __future__ import annotations

import json
import queue
import threading
import time

import pyarrow as pa
import pytest
from data_store import source_batch

from ringtrain import rendezvous
from ringtrain.data.prepare import BlobEncoder, raised_data_error
from ringtrain.data.reader import DATA_DIR_VAR, Shard
from ringtrain.data.spill import LAYOUT_FILE, SpillSummary, spill
from ringtrain.errors import BackendStartError, DataError
from ringtrain.launcher.agent import TaskAgent, TaskJob, worker_environ
from ringtrain.protocol import Abort, AgentFailed, BackendFailed, Done, Heartbeat, Offer, Rendezvous


class _Conn:
    def __init__(self):
        self.sent: list = []
        self.inbox: queue.Queue = queue.Queue()
        self.last_heard = time.monotonic()
        self.answer = lambda offer: Rendezvous((offer.offer,))

    def send(self, message):
        self.sent.append(message)
        if isinstance(message, Offer):
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
        self.inbox.put(None)

    def of(self, kind):
        return [m for m in self.sent if isinstance(m, kind)]


def _job(**kw):
    fields = dict(
        driver=("127.0.0.1", 1),
        secret=b"s" * 32,
        backend="tf",
        payload=b"payload",
        worker_env={},
        kill_grace=1.0,
        show_tf_noise=False,
        heartbeat_interval=0.1,
        data_names=("train",),
    )
    return TaskJob(**{**fields, **kw})


def _stored(tmp_path, partition: int, rows: int, first: int = 0) -> SpillSummary:
    """Spill ``rows`` rows for ``partition`` as its task would, into tmp_path/task<partition>."""
    blobs = BlobEncoder("train", 1, [0]).encode(iter([source_batch(first, rows)] if rows else []), 0)
    batches = [b.set_column(1, "target", pa.array([partition] * b.num_rows, pa.int32())) for b in blobs]
    return spill(batches, tmp_path / f"task{partition}", partition, ["train"])


class _Run:
    """Partition 0 of a two-task job (two GPUs: ranks 0 and 1), whose peer task stored ``peer``.

    The agent stops at the worker group (its creation raises), having written the layout.
    """

    def __init__(self, tmp_path, stored_rows, peer: SpillSummary | None = None):
        self.conn = _Conn()
        self.offers: list[rendezvous.TaskOffer] = []
        self.groups: list = []
        (tmp_path / "work").mkdir()
        run = self

        def answer(offer):  # the driver's answer: every task's offer, here in any order
            run.offers.append(rendezvous.TaskOffer.from_json(offer.offer))
            theirs = rendezvous.TaskOffer(1, "127.0.0.2", (7,), data=peer.to_json() if peer else "")
            return Rendezvous((theirs.to_json(), offer.offer))

        def gather(offer_json):
            raise AssertionError("a linked agent's rendezvous goes through the driver")

        self.conn.answer = answer

        class Agent(TaskAgent):
            def _make_group(self, specs, offers, host, link):
                run.groups.append([s.rank for s in specs])
                raise BackendStartError("no workers in this test")

        self.agent = Agent(
            _job(),
            0,
            ("0", "1"),
            gather,
            tmp_path / "work",
            connect=lambda address, secret, **kw: self.conn,
            data_dir=str(tmp_path / "task0"),
            stored_rows=stored_rows,
        )
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def join(self, timeout=10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not finish"


def test_the_summary_rides_the_offer_and_the_layout_follows_rendezvous_order(tmp_path):
    mine = _stored(tmp_path, 0, 6)
    peer = _stored(tmp_path, 1, 3, first=6)
    run = _Run(tmp_path, lambda timeout: mine.to_json(), peer)
    run.join()
    (offer,) = run.offers
    assert SpillSummary.from_json(offer.data) == mine
    assert run.groups == [[0, 1]]  # this task's workers got ranks 0 and 1
    layout = json.loads((tmp_path / "task0" / LAYOUT_FILE).read_text())
    assert [(r["rank"], r["partition"], r["ranges"]["train"]) for r in layout["ranks"]] == [
        (0, 0, [0, 3]),
        (1, 0, [3, 6]),
        (2, 1, [0, 3]),
    ]
    shard = Shard.open(tmp_path / "task0", "train", 1)
    assert shard.to_numpy(["id"])["id"].tolist() == [3, 4, 5]
    assert shard.rows_per_rank == [3, 3, 3]
    assert run.conn.of(BackendFailed) and isinstance(run.conn.sent[-1], Done)


def test_heartbeats_flow_while_the_rows_are_stored_and_an_abort_ends_the_wait(tmp_path):
    run = _Run(tmp_path, lambda timeout: time.sleep(timeout))  # never completes
    deadline = time.monotonic() + 10
    while len(run.conn.of(Heartbeat)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not run.offers  # no rendezvous before the rows are stored
    run.conn.inbox.put(Abort("a peer failed"))
    run.join()
    assert not run.offers and not run.conn.of(AgentFailed)
    assert isinstance(run.conn.sent[-1], Done)


def test_a_store_that_failed_reaches_the_driver_as_its_data_error(tmp_path):
    def failed(timeout):
        raise DataError("task 0 could not store its rows under /x (No space left on device)")

    run = _Run(tmp_path, failed)
    run.join()
    (report,) = run.conn.of(AgentFailed)
    assert isinstance(report.error, DataError) and "No space left" in str(report.error)
    assert not run.offers


def test_an_empty_dataset_fails_every_task_after_the_exchange(tmp_path):
    mine, peer = _stored(tmp_path, 0, 0), _stored(tmp_path, 1, 0)
    run = _Run(tmp_path, lambda timeout: mine.to_json(), peer)
    run.join()
    (report,) = run.conn.of(AgentFailed)
    assert isinstance(report.error, DataError)
    assert "dataset 'train' is empty" in str(report.error)
    assert not run.groups  # no worker started


def test_workers_see_the_data_directory_only_in_a_job_with_data(monkeypatch):
    monkeypatch.setenv(DATA_DIR_VAR, "/stale/from/the/executor")
    spec = rendezvous.plan([rendezvous.TaskOffer(0, "h", (1,))])[0]
    assert worker_environ(_job(), spec, data_dir="/local/task0")[DATA_DIR_VAR] == "/local/task0"
    assert DATA_DIR_VAR not in worker_environ(_job(data_names=()), spec)


def test_offers_without_data_still_parse():
    old = json.dumps({"partition": 2, "host": "h", "ports": [5], "gpus": [], "gpus_per_worker": 1})
    assert rendezvous.TaskOffer.from_json(old) == rendezvous.TaskOffer(2, "h", (5,))
    offer = rendezvous.TaskOffer(1, "h", (5,), data='{"partition": 1, "pieces": {}}')
    assert rendezvous.TaskOffer.from_json(offer.to_json()) == offer


@pytest.mark.parametrize(
    "text, found",
    [
        (
            'Traceback (most recent call last):\n  File "t.py", line 3, in fn\n    shard("x")\n'
            "ringtrain.errors.DataError: no dataset named 'x' was passed to this job; it has 'train'\n",
            "no dataset named 'x' was passed to this job; it has 'train'",
        ),
        (
            'Traceback (most recent call last):\n  File "t.py", line 3\nringtrain.errors.DataError: a\n\n'
            "During handling of the above exception, another exception occurred:\n\n"
            'Traceback (most recent call last):\n  File "t.py", line 5\nValueError: b\n',
            None,
        ),
        ("SystemExit: 3\n", None),
        ("", None),
    ],
)
def test_a_worker_traceback_names_its_final_data_error(text, found):
    assert raised_data_error(text) == found
