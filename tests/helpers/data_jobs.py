"""Spark-side pieces of the data tests: DataFrames of chosen partition sizes, and a stage that spills.

They run inside executors, so they live in an importable module (tests/helpers is on
the executors' PYTHONPATH, see conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ringtrain.data.reader import Shard
from ringtrain.data.spill import SpillSummary, build_layout, settle_task, spill, write_layout

ROWS_SCHEMA = "id long, x array<float>, label int, word string"


class SizedRows:
    """``mapInArrow`` over a one-row-per-partition range: partition i emits ``sizes[i]`` rows.

    Row ``id`` counts from 0 across partitions; ``x`` is ``[id, id % 7, 1]``; ``label``
    is 1 where ``id % 7 >= 3``.
    """

    def __init__(self, sizes: list[int], width: int | list[int] = 3):
        self.sizes = sizes
        self.widths = width if isinstance(width, list) else [width] * len(sizes)

    def __call__(self, batches):
        # The seed row's value says which partition this is (TaskContext's partition id
        # counts across a union, so it would not).
        seeds = [v for batch in batches for v in batch.column(0).to_pylist()]
        if not seeds:
            return
        part = seeds[0]
        n = self.sizes[part]
        if n == 0:
            return
        ids = np.arange(sum(self.sizes[:part]), sum(self.sizes[:part]) + n)
        base = np.stack([ids, ids % 7, np.ones_like(ids)], axis=1).astype(np.float32)
        width = self.widths[part]
        x = np.resize(base, (n, width)) if width != 3 else base
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(ids, pa.int64()),
                pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), width).cast(pa.list_(pa.float32())),
                pa.array((ids % 7 >= 3).astype(np.int32)),
                pa.array([f"w{i}" for i in ids]),
            ],
            names=["id", "x", "label", "word"],
        )


def sized_frame(spark, sizes: list[int], width: int | list[int] = 3):
    """A DataFrame whose partition i holds exactly ``sizes[i]`` rows (see :class:`SizedRows`)."""
    seeds = spark.range(0, len(sizes), 1, len(sizes))
    return seeds.mapInArrow(SizedRows(sizes, width), ROWS_SCHEMA)


class SpillInto:
    """A stage function over the prepared input: each task spills its partition under ``root``."""

    def __init__(self, root: str, names: list[str], barrier: bool = False, workers_per_task: int = 1):
        self.root = root
        self.names = names
        self.barrier = barrier
        self.workers_per_task = workers_per_task

    def __call__(self, batches):
        from pyspark import BarrierTaskContext, TaskContext

        ctx = BarrierTaskContext.get() if self.barrier else TaskContext.get()
        part = ctx.partitionId()
        directory = Path(self.root, f"task{part}")
        summary = spill(batches, directory, part, self.names)
        if self.barrier:
            # The one exchange of a real job: every task learns every task's counts.
            gathered = ctx.allGather(summary.to_json())
            layout = settle_task(directory, gathered, [self.workers_per_task] * len(gathered))
            assert [r.partition for r in layout.ranks] == sorted(r.partition for r in layout.ranks)
        yield pa.RecordBatch.from_pydict(
            {"partition": pa.array([part], pa.int32()), "summary": [summary.to_json()]}
        )


def spill_prepared(prepared, root: str | Path, workers_per_task: int = 1, barrier: bool = False):
    """Run the prepared input through a spilling stage; return each rank's Shard of every dataset."""
    stage = SpillInto(str(root), list(prepared.names), barrier, workers_per_task)
    rows = prepared.input_df.mapInArrow(stage, "partition int, summary string", barrier=barrier).collect()
    summaries = [SpillSummary.from_json(r.summary) for r in rows]
    assert sorted(r.partition for r in rows) == list(range(prepared.num_tasks))
    layout = build_layout(summaries, [workers_per_task] * prepared.num_tasks)
    dirs = [Path(root, f"task{p}") for p in range(prepared.num_tasks)]
    for directory in dirs:
        write_layout(directory, layout)
    shards = {
        name: [Shard.open(dirs[r.partition], name, r.rank) for r in layout.ranks] for name in prepared.names
    }
    return shards, [str(dirs[r.partition]) for r in layout.ranks]
