"""Pure logic behind ringtrain.horovod and the new collectives: no MPI, no TensorFlow, no Spark."""

from __future__ import annotations

import os
import pickle
import warnings

import ml_dtypes
import numpy as np
import pytest

import ringtrain
from ringtrain.collectives import _join, _more
from ringtrain.collectives._ops import Average, Max, Min, Sum
from ringtrain.collectives._signature import Call, mismatch_message
from ringtrain.horovod import _common
from ringtrain.keras import _aggregate, _callbacks


def allreduce_call(shape=(3,), op="Sum", compression=None, what="allreduce"):
    return Call(what, op, ((shape, "float32"),), compression=compression)


JOINED = Call(_join.JOIN, "-", ())

# ------------------------------------------------------------------ cross ranks


@pytest.mark.parametrize(
    ("local_ranks", "local_sizes", "rank", "want"),
    [
        ([0, 1, 0, 1], [2, 2, 2, 2], 0, (0, 2, True)),
        ([0, 1, 0, 1], [2, 2, 2, 2], 3, (1, 2, True)),
        ([0, 1, 2, 0, 1], [3, 3, 3, 2, 2], 2, (0, 1, False)),
        ([0, 1, 2, 0, 1], [3, 3, 3, 2, 2], 4, (1, 2, False)),
        ([0, 0, 0], [1, 1, 1], 1, (1, 3, True)),
    ],
)
def test_cross_placement_groups_ranks_by_local_rank(local_ranks, local_sizes, rank, want):
    assert _more.cross_placement(local_ranks, local_sizes, rank) == want


# ------------------------------------------------------------------ join


def test_joined_ranks_serve_an_allreduce_and_a_barrier():
    call = allreduce_call(compression="fp16")
    assert _join.served_call([call, JOINED, call], me=1) == call
    barrier = Call(_join.BARRIER, "-", ())
    assert _join.served_call([JOINED, barrier], me=0) == barrier


def test_no_joined_rank_or_disagreeing_ranks_are_a_plain_mismatch():
    assert _join.served_call([allreduce_call((3,)), allreduce_call((4,))], me=0) is None
    assert _join.served_call([allreduce_call((3,)), JOINED, allreduce_call((4,))], me=0) is None
    assert not _join.joined_ranks_serve([allreduce_call(), allreduce_call(op="Max")], me=1)


@pytest.mark.parametrize(
    "call",
    [
        Call("broadcast", "-", (((3,), "float32"),), root=0),
        Call("allgather", "-", (((3,), "float32"),), free_first_dim=True),
        Call("alltoall(x)", "-", (((4,), "float32"),), free_first_dim=True),
    ],
)
def test_collectives_joined_ranks_cannot_serve_raise_on_every_rank(call):
    for me in (0, 1, 2):
        with pytest.raises(ringtrain.ConfigError) as err:
            _join.served_call([call, JOINED, call], me=me)
        assert f"{call.what} cannot run while rank(s) 1 have called join()" in str(err.value)
        assert f"(raised on rank {me})" in str(err.value)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int32", "int64"])
def test_neutral_inputs_leave_every_op_unchanged(dtype):
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    values = np.array([-3, 0, 5], dtype=np_dtype)
    for op, reduce in ((Sum, np.add), (Average, np.add), (Min, np.minimum), (Max, np.maximum)):
        neutral = _join.neutral(((3,), dtype), op)
        assert neutral.dtype == np_dtype and neutral.shape == (3,)
        assert np.array_equal(reduce(values, neutral), values), (op, neutral)


def test_last_joined_is_the_rank_that_served_fewest_collectives():
    def gathered(served):
        return np.array([[7, s] for s in served], np.int64)

    assert _join._last_joined(gathered([4, 0, 2])) == 1
    assert _join._last_joined(gathered([0, 3, 0])) == 2  # a tie goes to the highest rank
    assert _join._last_joined(gathered([0])) == 0


def test_compression_is_part_of_the_signature_and_named_in_the_mismatch():
    plain, squeezed = allreduce_call(), allreduce_call(compression="fp16")
    assert plain.comparable() != squeezed.comparable()
    text = mismatch_message([plain, squeezed], me=0)
    assert "rank 1 uses compression='fp16' but rank 0 uses None" in text


# ------------------------------------------------------------------ alltoall splits, scaling


@pytest.mark.parametrize(
    ("shape", "splits", "problem"),
    [
        ((6, 2), None, None),
        ((5, 2), None, "divisible by the world size 2"),
        ((), None, "rank >= 1"),
        ((6,), [1, 2, 3], "one per rank (2)"),
        ((6,), [4, 3], "sum to at most the first dimension 6"),
        ((6,), [-1, 3], "must be >= 0"),
        ((6,), [1.5, 2.0], "must be integers"),
        ((6,), [2, 4], None),
    ],
)
def test_alltoall_splits_are_checked_before_any_data_moves(shape, splits, problem):
    counts, found = _more._splits_problem(np.zeros(shape, np.float32), splits, size=2)
    if problem is None:
        assert found is None
        assert counts.tolist() == ([3, 3] if splits is None else splits)
    else:
        assert problem in found


def test_scaling_keeps_the_dtype():
    assert _more.scaled(np.array([7, -7], np.int32), 0.5).tolist() == [3, -3]  # truncated toward zero
    half = _more.scaled(np.array([1.0, 3.0], np.float16), 0.25)
    assert half.dtype == np.float16 and half.tolist() == [0.25, 0.75]
    same = np.array([1.0], np.float32)
    assert _more.scaled(same, 1.0) is same
    with pytest.raises(ringtrain.ConfigError, match="prescale_factor must be a number"):
        _more.check_factor("2", "prescale_factor")


# ------------------------------------------------------------------ horovod arguments


def test_op_resolution_follows_horovod():
    assert _common.resolve_op(None, None, "allreduce") is Average
    assert _common.resolve_op(Max, None, "allreduce") is Max
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _common.resolve_op(None, False, "allreduce") is Sum
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    with pytest.raises(ringtrain.ConfigError, match="pass op or average, not both"):
        _common.resolve_op(Sum, True, "allreduce")
    for unsupported in (_common.Adasum, _common.Product):
        with pytest.raises(ringtrain.ConfigError, match=f"op=hvd.{unsupported.name} is not supported"):
            _common.resolve_op(unsupported, None, "allreduce")
    with pytest.raises(ringtrain.ConfigError, match="op must be"):
        _common.resolve_op("sum", None, "allreduce")


def test_compression_maps_to_the_wire_format_or_a_custom_compressor():
    Compression = _common.Compression
    assert _common.split_compression(Compression.none, "x") == (None, None)
    assert _common.split_compression(Compression.fp16, "x") == ("fp16", None)

    class Custom:
        compress = decompress = staticmethod(lambda *a: a)

    assert _common.split_compression(Custom, "x") == (None, Custom)
    with pytest.raises(ringtrain.ConfigError, match="compression must be"):
        _common.split_compression("fp16", "allreduce")


def test_groups_are_validated_as_horovod_does():
    _common.check_groups(0, None)
    _common.check_groups(0, 3)
    _common.check_groups(0, [[1], [2]])
    with pytest.raises(ringtrain.ConfigError, match="groups must be"):
        _common.check_groups(0, -1)


def test_collectives_need_init_first(monkeypatch):
    monkeypatch.setattr(_common, "_initialized", False)
    with pytest.raises(ringtrain.ConfigError, match=r"call hvd.init\(\) first"):
        _common.size()


def test_spark_run_rejects_what_it_cannot_honour():
    import ringtrain.horovod.spark as hvd_spark

    with pytest.raises(ringtrain.ConfigError, match="extra_mpi_args"):
        hvd_spark.run(print, num_proc=2, extra_mpi_args="-x FOO")
    with pytest.raises(ringtrain.ConfigError, match="kwargs must be a mapping"):
        hvd_spark.run(print, kwargs={1: 3})


def _keywords(*args, **kwargs):
    return args, kwargs, os.environ.get("HVD_SPARK_LOGIC")


def test_spark_run_hands_every_keyword_to_fn_not_to_the_job(monkeypatch):
    """Names ringtrain.run also takes (timeout, num_proc, ...) are fn's when they come in kwargs."""
    import ringtrain.horovod.spark as hvd_spark

    jobs = []

    def fake_run(target, *args, **options):
        jobs.append(options)
        return [pickle.loads(pickle.dumps(target))(*args)]  # the task travels pickled

    monkeypatch.setattr(ringtrain, "run", fake_run)
    monkeypatch.setenv("HVD_SPARK_LOGIC", "off")  # restored afterwards; the call sets it here
    user_kwargs = {"timeout": 5, "num_proc": 7, "max_restarts": 3, "job_dir": "x", "backend": "tf"}
    (result,) = hvd_spark.run(
        _keywords, args=(1, 2), kwargs=user_kwargs, num_proc=2, env={"HVD_SPARK_LOGIC": "on"}
    )
    assert result == ((1, 2), user_kwargs, "on")
    assert jobs == [{"num_proc": 2, "backend": "mpi", "return_all": True}]


def test_backward_passes_must_be_a_positive_int():
    assert _aggregate.check_passes(3) == 3
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ringtrain.ConfigError, match="backward_passes_per_step"):
            _aggregate.check_passes(bad)


# ------------------------------------------------------------------ learning-rate callbacks (fake model)


class _Variable:
    def __init__(self, value):
        self.value = float(value)

    def assign(self, value):
        self.value = float(value)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.value, dtype=dtype)


class _Optimizer:
    def __init__(self, lr, momentum=None):
        self.learning_rate = _Variable(lr)
        if momentum is not None:
            self.momentum = momentum


class _Model:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _drive(callback, epochs, steps, record):
    callback.on_train_begin()
    seen = []
    for epoch in range(epochs):
        callback.on_epoch_begin(epoch)
        for batch in range(steps):
            callback.on_batch_begin(batch)
            seen.append(record())
            callback.on_batch_end(batch)
        logs = {}
        callback.on_epoch_end(epoch, logs)
        seen.append(("end", logs["lr"]))
    return seen


def _callback(cls, model, *args, **kwargs):
    callback = cls(*args, **kwargs)
    callback.model = model
    callback.params = {"steps": 4}
    return callback


def test_schedule_with_a_constant_multiplier_decays_each_epoch_from_start_epoch():
    optimizer = _Optimizer(1.0)
    callback = _callback(
        _callbacks.LearningRateScheduleMixin, _Model(optimizer), 0.8, 0.5, start_epoch=1, end_epoch=3
    )
    seen = _drive(callback, epochs=4, steps=2, record=lambda: optimizer.learning_rate.value)
    lrs = [s for s in seen if not isinstance(s, tuple)]
    assert lrs == pytest.approx(
        [1.0, 1.0, 0.8, 0.8, 0.4, 0.4, 0.4, 0.4]
    )  # unchanged before start, kept after end


def test_warmup_ramps_from_lr_over_size_to_lr(monkeypatch):
    monkeypatch.setenv("SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    optimizer = _Optimizer(0.1)
    callback = _callback(_callbacks.LearningRateWarmupMixin, _Model(optimizer), 0.4, warmup_epochs=2)
    seen = _drive(callback, epochs=3, steps=4, record=lambda: optimizer.learning_rate.value)
    lrs = [s for s in seen if not isinstance(s, tuple)]
    expected = [0.4 / 4 * ((e + (b + 1) / 4) * 3 / 2 + 1) for e in range(2) for b in range(4)]
    assert lrs[:8] == pytest.approx(expected)
    assert lrs[7] == pytest.approx(0.4) and lrs[8:] == pytest.approx([0.4] * 4)
    assert [s[1] for s in seen if isinstance(s, tuple)] == pytest.approx([0.25, 0.4, 0.4])


def test_momentum_correction_scales_a_variable_momentum_for_one_batch():
    optimizer = _Optimizer(1.0, momentum=_Variable(0.9))
    callback = _callback(_callbacks.LearningRateScheduleMixin, _Model(optimizer), 2.0, 1.0)
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    callback.on_batch_begin(0)
    assert optimizer.momentum.value == pytest.approx(1.8)
    callback.on_batch_end(0)
    assert optimizer.momentum.value == pytest.approx(0.9)


def test_a_plain_number_momentum_is_left_alone_with_one_warning(caplog):
    optimizer = _Optimizer(1.0, momentum=0.9)
    callback = _callback(_callbacks.LearningRateScheduleMixin, _Model(optimizer), 2.0, 0.5)
    _drive(callback, epochs=3, steps=1, record=lambda: None)
    assert optimizer.momentum == 0.9
    assert sum("momentum correction skipped" in r.message for r in caplog.records) == 1


def test_schedule_needs_a_plain_learning_rate_and_initial_lr():
    optimizer = _Optimizer(1.0)
    optimizer.learning_rate = lambda step: 0.1  # a LearningRateSchedule
    callback = _callback(_callbacks.LearningRateScheduleMixin, _Model(optimizer), 1.0, 0.5)
    callback.on_epoch_begin(0)
    with pytest.raises(ringtrain.ConfigError, match="LearningRateSchedule"):
        callback.on_batch_begin(0)
    with pytest.raises(ringtrain.ConfigError, match="initial_lr is required"):
        _callbacks.LearningRateScheduleMixin(None, 0.5)


def test_steps_per_epoch_comes_from_fit_parameters_or_an_error():
    callback = _callback(
        _callbacks.LearningRateScheduleMixin, _Model(_Optimizer(1.0)), 1.0, 0.5, staircase=False
    )
    callback.params = {"samples": 100, "batch_size": 8}
    callback.on_train_begin()
    assert callback.steps_per_epoch == 12
    callback = _callback(
        _callbacks.LearningRateScheduleMixin, _Model(_Optimizer(1.0)), 1.0, 0.5, staircase=False
    )
    callback.params = {}
    with pytest.raises(ringtrain.ConfigError, match="steps_per_epoch"):
        callback.on_train_begin()


def test_init_outside_an_mpi_job_says_how_to_start_one():
    import subprocess
    import sys

    code = (
        "import ringtrain, ringtrain.horovod._common as c\n"
        "try:\n    c.init()\nexcept ringtrain.BackendError as e:\n    print('ERR', e)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "ERR ringtrain.horovod needs the job's MPI world" in done.stdout, done.stdout + done.stderr
    assert "--backend mpi" in done.stdout and "SIZE=2 but the MPI world has 1 process" in done.stdout
