"""The launch stage on a classic local[2] session: records, input partitions, cancellation,
the start guard. (tests/integration/test_connect.py runs the same on Spark Connect.)"""

from __future__ import annotations

import pytest
from stage_tasks import (
    SleepAndRecordPid,
    big_records,
    check_a_stage_without_enough_slots_never_starts,
    check_cancel_kills_the_running_tasks,
    expected_big_records,
)

from ringtrain.launcher.stage import BarrierStage, StageTask

pytestmark = pytest.mark.integration


def _run(stage: BarrierStage, timeout: float = 120) -> BarrierStage:
    stage.start()
    stage.join(timeout)
    assert stage.done()
    return stage


def test_records_come_back_whole_and_in_order(spark):
    stage = _run(BarrierStage(spark, 2, big_records))
    assert stage.error is None, stage.error
    assert stage.records == {p: expected_big_records(p) for p in (0, 1)}


def _sum_of_my_ids(task: StageTask) -> list[bytes]:
    ids = [i for batch in task.batches for i in batch.column("id").to_pylist()]
    return [f"{task.partition}:{sum(ids)}:{len(ids)}".encode()]


def test_each_task_reads_its_own_partition_of_the_input(spark):
    data = spark.range(10, numPartitions=2)  # ids 0-4 and 5-9
    stage = _run(BarrierStage(spark, 2, _sum_of_my_ids, data=data))
    assert stage.error is None, stage.error
    assert stage.records == {0: [b"0:10:5"], 1: [b"1:35:5"]}


def _raise(task: StageTask):
    raise ValueError(f"task {task.partition} refuses")


def test_a_raising_task_fails_the_stage(spark):
    stage = _run(BarrierStage(spark, 2, _raise))
    assert "ValueError: task" in str(stage.error) and "refuses" in str(stage.error)


def test_cancel_kills_the_running_tasks(spark, tmp_path):
    check_cancel_kills_the_running_tasks(spark, str(tmp_path))


def test_a_stage_without_enough_slots_never_starts(spark):
    check_a_stage_without_enough_slots_never_starts(spark, wait=5)


def test_a_stage_cancelled_before_it_starts_runs_nothing(spark, tmp_path):
    task = SleepAndRecordPid(str(tmp_path))
    stage = BarrierStage(spark, 2, task)
    stage.cancel()
    _run(stage, timeout=30)
    assert isinstance(stage.error, InterruptedError)
    assert not list(tmp_path.iterdir())
