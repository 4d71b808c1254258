"""The launch stage's pure parts, without Spark: output rows, slot counts from the
configuration, the Connect remote option, and the start guard."""

from __future__ import annotations

import random
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringtrain import cli
from ringtrain.config import JobConfig
from ringtrain.errors import ChannelError, ConfigError, ResourceError
from ringtrain.launcher import spark
from ringtrain.launcher.spark import ClusterConf, Layout, conf_slots
from ringtrain.launcher.stage import CHUNK_BYTES, assemble, chunk_rows, is_connect


@given(
    st.dictionaries(st.integers(0, 7), st.lists(st.binary(max_size=40), max_size=5), min_size=1, max_size=4),
    st.integers(1, 16),
)
def test_records_survive_chunking_in_any_row_order(by_partition, chunk_bytes):
    rows = [row for p, records in by_partition.items() for row in chunk_rows(p, records, chunk_bytes)]
    assert all(len(row["data"]) <= chunk_bytes for row in rows)
    random.Random(0).shuffle(rows)
    assert assemble(rows) == by_partition


def test_big_record_is_cut_into_chunk_sized_rows():
    record = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
    rows = list(chunk_rows(1, [record]))
    assert len(rows) == 5 and [r["chunk"] for r in rows] == [0, 1, 2, 3, -1]
    assert [r["last"] for r in rows[:4]] == [False, False, False, True]
    assert max(len(r["data"]) for r in rows) == CHUNK_BYTES
    assert assemble(rows) == {1: [record]}
    assert assemble(chunk_rows(0, [b""])) == {0: [b""]}
    assert assemble(chunk_rows(0, [])) == {0: []}


def test_a_lost_chunk_is_an_error_not_a_short_record():
    rows = list(chunk_rows(0, [b"x" * 10, b"y"], chunk_bytes=4))
    for missing in range(len(rows)):
        with pytest.raises(ChannelError, match="output of partition 0 arrived incomplete"):
            assemble(rows[:missing] + rows[missing + 1 :])


def _cluster(master: str, **kw) -> ClusterConf:
    return ClusterConf(master=master, **kw)


@pytest.mark.parametrize(
    ("cluster", "task_gpus", "slots"),
    [
        (_cluster("local"), 0, 1),
        (_cluster("local[3]"), 0, 3),
        (_cluster("local[*]"), 0, 6),
        (_cluster("local[4, 2]"), 0, 4),
        (_cluster("local[4]", task_cpus=2), 0, 2),
        (_cluster("local[4]"), 1, 0),  # local mode gives tasks no GPUs
        (_cluster("local-cluster[2,2,1024]"), 0, 4),
        (_cluster("local-cluster[2, 2, 1024]", executor_gpus=2), 1, 4),
        (_cluster("local-cluster[2,2,1024]", executor_gpus=2), 2, 2),
        (_cluster("local-cluster[2,4,1024]", executor_gpus=1), 1, 2),
        (_cluster("yarn", executor_instances=3, executor_cores=4), 0, 12),
        (_cluster("yarn", executor_instances=3), 0, 3),
        (_cluster("k8s://https://api:6443", executor_instances=2, executor_cores=8, executor_gpus=4), 2, 4),
        (_cluster("yarn"), 0, None),  # instances unset
        (_cluster("yarn", executor_instances=3, dynamic_allocation=True), 0, None),
        (_cluster("spark://m:7077", executor_cores=2), 0, None),  # workers decide
    ],
)
def test_slots_from_configuration(cluster, task_gpus, slots):
    assert conf_slots(cluster, task_gpus, cpu_count=lambda: 6) == slots


class _FakeConf:
    def __init__(self, values):
        self._values = values

    def get(self, key, default=None):
        return self._values.get(key, default)


class _FakeSession:
    def __init__(self, **values):
        self.conf = _FakeConf(values)


def test_cluster_conf_reads_the_session_settings():
    session = _FakeSession(
        **{
            "spark.master": "local-cluster[2,2,1024]",
            "spark.task.cpus": "2",
            "spark.executor.resource.gpu.amount": "2",
            "spark.dynamicAllocation.enabled": "TRUE",
        }
    )
    cluster = ClusterConf.read(session)
    assert (cluster.task_cpus, cluster.executor_gpus, cluster.task_gpus) == (2, 2, None)
    assert cluster.dynamic_allocation and not cluster.is_local
    assert ClusterConf.read(_FakeSession(**{"spark.master": "local[2]"})).is_local


def test_dynamic_allocation_is_refused_before_any_job():
    session = _FakeSession(**{"spark.master": "yarn", "spark.dynamicAllocation.enabled": "true"})
    with pytest.raises(ConfigError, match="barrier mode.*does not run with dynamic allocation"):
        spark.preflight(session, JobConfig(num_proc=2))


def test_stage_level_gpus_on_a_local_master_name_the_session_setting():
    cluster = _cluster("local[4]", executor_gpus=2)
    with pytest.raises(ConfigError, match="set spark.task.resource.gpu.amount for the session"):
        spark.task_profile(_FakeSession(), cluster, 1)


def test_classic_and_connect_sessions_are_told_apart():
    assert not is_connect(_FakeSession())
    connect_like = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})()
    assert is_connect(connect_like)


class _FakeStage:
    def __init__(self, starts: bool):
        self._starts = starts
        self.cancelled = False

    def wait_started(self, timeout):
        return self._starts

    def done(self):
        return self.cancelled

    def cancel(self):
        self.cancelled = True

    def join(self, timeout):
        pass


def test_start_guard_cancels_a_stage_that_gets_no_slots():
    config = JobConfig(num_proc=4, start_timeout=1.5)
    stage = _FakeStage(starts=False)
    with pytest.raises(ResourceError, match=r"num_proc=4 needs 4 barrier task slots.* within 1.5 s"):
        spark.await_slots(stage, Layout(4, 1, slots_known=False), config)
    assert stage.cancelled
    started = _FakeStage(starts=True)
    spark.await_slots(started, Layout(4, 1, slots_known=False), config)
    unknown_but_counted = _FakeStage(starts=False)
    spark.await_slots(unknown_but_counted, Layout(4, 1), config)  # counted: no guard
    assert not started.cancelled and not unknown_but_counted.cancelled


def test_local_address_towards_loopback_is_loopback():
    assert spark.local_address_towards("127.0.0.1") == "127.0.0.1"
    assert spark.local_address_towards("no-such-host.invalid") is None


@pytest.fixture
def no_cli_env(monkeypatch):
    for name in [*cli.FLAG_VARS.values(), "RINGTRAIN_CONF", "RINGTRAIN_ENV", "SPARK_REMOTE"]:
        monkeypatch.delenv(name, raising=False)


def _config(*argv: str) -> JobConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["launch", *argv, "train.py"]))


def test_remote_comes_from_flag_then_variables(no_cli_env, monkeypatch):
    assert _config().remote is None
    monkeypatch.setenv("SPARK_REMOTE", "sc://from-spark:15002")
    assert _config().remote == "sc://from-spark:15002"
    assert _config("--master", "local[2]").remote is None  # a master named on purpose wins
    monkeypatch.setenv("RINGTRAIN_REMOTE", "sc://from-ringtrain")
    assert _config().remote == "sc://from-ringtrain"
    assert _config("--remote", "sc://flag:1").remote == "sc://flag:1"
    with pytest.raises(ConfigError, match="not both"):
        _config("--remote", "sc://flag:1", "--master", "local[2]")


def test_remote_reachability():
    for ok in ("local", "local[2]"):
        spark.check_remote_reachable(ok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ResourceError, match=f"cannot reach the Spark Connect server 127.0.0.1:{port}"):
        spark.check_remote_reachable(f"sc://127.0.0.1:{port}/;token=x")
    assert time.monotonic() - started < 10
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        spark.check_remote_reachable(f"sc://127.0.0.1:{server.getsockname()[1]}")
    for bad in ("http://h:1", "sc://", "spark://h:7077", "sc://h:notaport"):
        with pytest.raises(ConfigError, match="not a Spark Connect URL"):
            spark.check_remote_reachable(bad)


def test_output_rows_match_the_stage_schema():
    from ringtrain.launcher.stage import _output_schema

    schema = _output_schema()
    assert schema.simpleString() == "struct<partition:int,record:int,chunk:int,last:boolean,data:binary>"
    assert [list(row) for row in chunk_rows(0, [b"x"])] == [schema.names] * 2


def test_agents_dial_the_driver_host_or_the_connect_clients_own_address():
    classic = _FakeSession(**{"spark.driver.host": "10.1.2.3"})
    assert spark.driver_host(classic) == "10.1.2.3"
    remote_cls = type("SparkSession", (_FakeSession,), {"__module__": "pyspark.sql.connect.session"})
    local_server = remote_cls(**{"spark.driver.host": "10.1.2.3"})
    local_server.client = type("Client", (), {"host": "localhost"})()
    assert spark.driver_host(local_server) == "10.1.2.3"  # the client is on the driver's host
    far_server = remote_cls(**{"spark.driver.host": "10.1.2.3"})
    far_server.client = type("Client", (), {"host": "192.0.2.99"})()
    own = spark.local_address_towards("192.0.2.99")
    assert spark.driver_host(far_server) == (own or "10.1.2.3")
