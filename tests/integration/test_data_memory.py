"""More data than memory: a worker trains over a shard larger than its memory cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from ringtrain.data.prepare import BlobEncoder
from ringtrain.data.spill import build_layout, spill, write_layout

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
WIDTH = 1024  # float32 features: 4 KiB a row
CAP = 1 << 30
SHARD_ROWS = 320 * 1024  # 1.25 GiB of features


def _source_batches(rows: int, per_batch: int = 8192):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=WIDTH).astype(np.float32) / WIDTH
    for first in range(0, rows, per_batch):
        n = min(per_batch, rows - first)
        x = rng.random((n, WIDTH), dtype=np.float32)
        yield pa.RecordBatch.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), WIDTH), pa.array(x @ weights)],
            names=["x", "y"],
        )


def test_a_shard_larger_than_the_workers_memory_cap_trains_to_completion(tmp_path):
    # Encoded and spilled as a stream, as a task agent does: nothing holds the whole shard.
    blobs = BlobEncoder("train", 1, [0]).encode(_source_batches(SHARD_ROWS), source=0)
    summary = spill(blobs, tmp_path, 0, ["train"])
    write_layout(tmp_path, build_layout([summary], [1]))
    shard_bytes = SHARD_ROWS * WIDTH * 4
    assert (tmp_path / "dataset-0.arrow").stat().st_size > shard_bytes > CAP

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", RINGTRAIN_DATA_MAPPED_LIMIT="128M")
    cmd = [
        sys.executable,
        os.path.join(HELPERS, "data_memory_fit.py"),
        str(CAP),
        str(tmp_path),
        str(shard_bytes),
        "512",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cap_holds"], "the cap should forbid allocating the shard's size"
    assert result["rows"] == SHARD_ROWS
    assert result["steps"] == result["expected_steps"] == SHARD_ROWS // 512
    assert np.isfinite(result["loss"])
    # Resident memory, file pages included, stayed below the shard's size: pages read
    # through the mapping were handed back as the epoch went.
    assert result["peak_rss_kb"] * 1024 < shard_bytes
