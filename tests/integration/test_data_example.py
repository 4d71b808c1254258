"""examples/keras_dataframe.py trains to the accuracy it promises through ringtrain.run(data=...),
on both backends (tf-keras under the strategy; Keras 3 with the allreduce optimizer on mpi)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("spark", "no_leftover_workers"),
]

_PATH = Path(__file__).resolve().parents[2] / "examples" / "keras_dataframe.py"
_spec = importlib.util.spec_from_file_location("keras_dataframe", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.mark.parametrize("backend", ["tf", "mpi"])
def test_the_example_reaches_its_held_out_accuracy(spark, backend):
    value, total = example.train_and_score(spark, backend, num_proc=2, epochs=12, batch=32)
    assert total == 360
    assert value >= example.TARGET_ACCURACY, f"held-out accuracy {value:.4f}"
