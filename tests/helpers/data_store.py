"""Builds stored shards in-process, without Spark: encode source partitions, spill per task, lay out.

The same code paths as a job (BlobEncoder, spill, build_layout, Shard), with Spark's
shuffle replaced by a filter on each blob's target.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ringtrain.data.prepare import BlobEncoder
from ringtrain.data.reader import Shard
from ringtrain.data.spill import settle_task, spill


def source_batch(first: int, n: int) -> pa.RecordBatch:
    ids = np.arange(first, first + n)
    return pa.RecordBatch.from_pydict(
        {
            "id": pa.array(ids, pa.int64()),
            "x": pa.array([[float(i), -float(i), 0.5] for i in ids], pa.list_(pa.float32())),
            "word": pa.array([f"w{i}" for i in ids]),
            "flag": pa.array(ids % 3 == 0),
            "raw": pa.array([bytes([i % 256]) * (i % 5) for i in ids], pa.binary()),
        }
    )


def store(tmp_path, partitions, tasks, workers=1, blob_bytes=2048, names=("train",)):
    """Run the whole path in-process: encode each source partition, spill per task, lay out."""
    blobs = []
    first = 0
    for name in names:
        encoder = BlobEncoder(name, tasks, list(range(tasks)), blob_bytes=blob_bytes)
        for source, n in enumerate(partitions):
            parts = [source_batch(first, n)] if n else []
            first += n
            blobs.extend(encoder.encode(iter(parts), source))
    table = pa.Table.from_batches(blobs, schema=blobs[0].schema)
    dirs, summaries = [], []
    for task in range(tasks):
        mine = table.filter(pa.compute.equal(table.column("target"), task))
        directory = tmp_path / f"task{task}"
        summaries.append(spill(mine.to_batches(max_chunksize=7), directory, task, list(names)))
        dirs.append(directory)
    # What each task agent does after the exchange, with every task's summary as JSON.
    gathered = [s.to_json() for s in reversed(summaries)]
    for directory in dirs:
        layout = settle_task(directory, gathered, [workers] * tasks)
    ranks = [Shard.open(dirs[r.partition], names[0], r.rank) for r in layout.ranks]
    return ranks, dirs
