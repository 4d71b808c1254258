"""examples/keras_dataframe.py trains to the accuracy it promises, on both backends.

Its DataFrames go through the data path's components (prepare, a spilling stage); the
workers then run the example's own training functions on their shards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from data_jobs import spill_prepared

import ringtrain
from ringtrain.data.prepare import prepare

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("spark", "no_leftover_workers"),
]

_PATH = Path(__file__).resolve().parents[2] / "examples" / "keras_dataframe.py"
_spec = importlib.util.spec_from_file_location("keras_dataframe", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def _train_on(dirs, backend, epochs, batch):
    os.environ["RINGTRAIN_DATA_DIR"] = dirs[ringtrain.rank()]
    train = example.train_tf if backend == "tf" else example.train_mpi
    return train(epochs, batch)


@pytest.mark.parametrize("backend", ["tf", "mpi"])
def test_the_example_reaches_its_held_out_accuracy(spark, tmp_path, backend):
    train_df, val_df = example.build_frames(spark)
    prepared = prepare({"train": train_df, "val": val_df}, 2)
    _, dirs = spill_prepared(prepared, tmp_path)
    results = ringtrain.run(_train_on, dirs, backend, 12, 32, num_proc=2, backend=backend, return_all=True)
    value, total = example.accuracy(results)
    assert total == 360
    assert value >= example.TARGET_ACCURACY, f"held-out accuracy {value:.4f}"
