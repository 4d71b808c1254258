"""The data path's pure logic: equal steps, row placement, Spark's hash, layouts, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringtrain.data import _placement, _steps
from ringtrain.data._columns import ColumnInfo
from ringtrain.data.spill import DataLayout, Piece, SpillSummary, build_layout
from ringtrain.errors import ConfigError, DataError, RingtrainError

counts_lists = st.lists(st.integers(1, 5000), min_size=1, max_size=12)


# ------------------------------------------------------------------ equal steps


@settings(deadline=None)  # a shared machine's timing says nothing here
@given(total=st.integers(0, 10**6), parts=st.integers(1, 64))
def test_split_rows_is_contiguous_and_even(total, parts):
    ranges = _steps.split_rows(total, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


@settings(deadline=None)  # a shared machine's timing says nothing here
@given(counts=counts_lists, data=st.data())
def test_every_rank_reads_steps_times_batch_and_the_remainder_is_below_size_times_batch(counts, data):
    batch = data.draw(st.integers(1, min(counts)))
    steps = _steps.steps_per_epoch(counts, batch)
    rows = steps * batch
    assert steps >= 1
    # Every rank leaves out fewer than one batch of its own rows...
    left_out = [max(0, n - rows) for n in counts]
    assert all(x < batch for x in left_out)
    # ...so one epoch misses fewer than size x batch rows across ranks.
    assert sum(left_out) < len(counts) * batch
    # No rank could take one more full step from its own rows alone.
    assert max(counts) < rows + batch


@settings(deadline=None)  # a shared machine's timing says nothing here
@given(counts=counts_lists, data=st.data())
def test_a_batch_larger_than_the_smallest_share_names_that_rank(counts, data):
    batch = data.draw(st.integers(min(counts) + 1, min(counts) + 1000))
    smallest = counts.index(min(counts))
    says = rf"larger than rank {smallest}'s share of dataset 'train' \({min(counts)} rows"
    with pytest.raises(DataError, match=says):
        _steps.steps_per_epoch(counts, batch)


def test_a_rank_with_no_rows_is_named():
    with pytest.raises(DataError, match=r"rank 2 holds no rows of dataset 'val' \(7 rows over 3 ranks\)"):
        _steps.steps_per_epoch([4, 3, 0], 1, "val")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True, None])
def test_batch_size_must_be_a_positive_int(bad):
    with pytest.raises(DataError, match="batch_size must be a positive int"):
        _steps.steps_per_epoch([10, 10], bad)


@settings(max_examples=200, deadline=None)
@given(
    num_rows=st.integers(1, 3000),
    extra=st.integers(-3000, 3000),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    rank=st.integers(0, 64),
    epoch=st.integers(0, 100),
    block_rows=st.integers(1, 50),
    window_blocks=st.integers(0, 6),
)
def test_epoch_order_reads_each_row_once_then_wraps_around(
    num_rows, extra, shuffle, seed, rank, epoch, block_rows, window_blocks
):
    rows = max(1, num_rows + extra)
    order = _steps.epoch_order(
        num_rows,
        rows,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        epoch=epoch,
        block_rows=block_rows,
        window_blocks=window_blocks,
    )
    assert len(order) == rows
    assert order.min() >= 0 and order.max() < num_rows
    counts = np.bincount(order, minlength=num_rows)
    if rows <= num_rows:
        assert counts.max() == 1
    else:
        # Wrapped: every row at least once, none more than one time beyond any other.
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    if not shuffle:
        assert np.array_equal(order[: min(rows, num_rows)], np.arange(min(rows, num_rows)))


@settings(max_examples=200, deadline=None)
@given(
    num_rows=st.integers(1, 5000),
    block_rows=st.integers(1, 64),
    window_blocks=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)
def test_block_shuffle_is_a_permutation_whose_windows_hold_whole_blocks(
    num_rows, block_rows, window_blocks, seed
):
    order = _steps.block_shuffle(num_rows, block_rows, window_blocks, np.random.default_rng(seed))
    assert sorted(order) == list(range(num_rows))
    sizes = {b: min(block_rows, num_rows - b * block_rows) for b in range(-(-num_rows // block_rows))}
    # Walk the order window by window: each is whole blocks, window_blocks of them (fewer at the end).
    position, left = 0, len(sizes)
    while position < num_rows:
        want, seen = min(window_blocks, left), {}
        end = position
        while not (len(seen) == want and all(seen[b] == sizes[b] for b in seen)):
            block = int(order[end]) // block_rows
            seen[block] = seen.get(block, 0) + 1
            end += 1
            assert len(seen) <= want, "a window mixes more blocks than it should"
        position, left = end, left - want


def test_block_shuffle_mixes_blocks_from_across_the_shard():
    order = _steps.epoch_order(
        100_000, 100_000, shuffle=True, seed=1, rank=0, epoch=0, block_rows=100, window_blocks=32
    )
    first_batch = np.sort(order[:256])
    spread = len(set((first_batch // 100).tolist()))
    assert spread > 16  # rows from many blocks, not a run of neighbours
    assert first_batch.max() - first_batch.min() > 50_000  # blocks from far apart
    # A window as large as the shard is a uniform permutation.
    whole = _steps.epoch_order(
        1000, 1000, shuffle=True, seed=1, rank=0, epoch=0, block_rows=10, window_blocks=100
    )
    assert np.array_equal(whole, np.random.default_rng([1, 0, 0]).permutation(1000))


def test_epoch_order_is_reproducible_and_changes_with_epoch_and_rank():
    def order(**kw):
        args = dict(shuffle=True, seed=3, rank=0, epoch=0) | kw
        return _steps.epoch_order(1000, 1000, **args)

    assert np.array_equal(order(), order())
    assert not np.array_equal(order(), order(epoch=1))
    assert not np.array_equal(order(), order(rank=1))
    assert not np.array_equal(order(), order(seed=4))


# ------------------------------------------------------------------ placement


def test_spark_hash_matches_values_spark_computed():
    # Spark 4.3's SELECT hash(CAST(k AS INT)) for these k, taken from a local session;
    # the Spark tests compare against a live session as well.
    spark_says = {
        0: 933211791,
        1: -559580957,
        -1: -1604776387,
        42: 29417773,
        7: 1079293707,
        2**31 - 1: 133916647,
        -(2**31): 723455942,
        123456789: -598405280,
    }
    assert {k: _placement.spark_hash_int(k) for k in spark_says} == spark_says


@settings(deadline=None)  # a shared machine's timing says nothing here
@given(n=st.integers(1, 300))
def test_every_partition_gets_its_own_smallest_key(n):
    keys = _placement.keys_for_partitions(n)
    assert [_placement.partition_of_key(k, n) for k in keys] == list(range(n))
    for target, key in enumerate(keys):
        assert all(_placement.partition_of_key(k, n) != target for k in range(key))


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.integers(0, 500), min_size=1, max_size=20),
    targets=st.integers(1, 17),
    start=st.integers(0, 100),
)
def test_round_robin_slices_cover_each_batch_and_stay_within_one_row(batches, targets, start):
    totals = [0] * targets
    rotation = start % targets
    for n in batches:
        slices, rotation = _placement.round_robin_slices(n, targets, rotation)
        position = 0
        for target, a, b in slices:
            assert a == position and b > a
            totals[target] += b - a
            position = b
        assert position == n
    assert max(totals) - min(totals) <= 1
    assert sum(totals) == sum(batches)


@settings(max_examples=100, deadline=None)
@given(
    partitions=st.lists(st.integers(0, 2000), min_size=1, max_size=12),
    tasks=st.integers(1, 6),
    workers=st.integers(1, 3),
    data=st.data(),
)
def test_skewed_partitions_end_in_equal_steps_covering_all_but_the_remainder(
    partitions, tasks, workers, data
):
    """The whole plan, end to end on ids: deal rows from any partitioning, lay them out, read one epoch."""
    task_ids: list[list[int]] = [[] for _ in range(tasks)]
    first = 0
    for source, n in enumerate(partitions):
        rows = np.arange(first, first + n)
        first += n
        slices, _ = _placement.round_robin_slices(n, tasks, source % tasks)
        for target, a, b in slices:
            task_ids[target].extend(rows[a:b])
    total = sum(partitions)
    size = tasks * workers
    columns = (ColumnInfo("id", "scalar", "int64"),)
    summaries = [SpillSummary(t, {"train": Piece(len(ids), columns)}) for t, ids in enumerate(task_ids)]
    if total == 0:
        with pytest.raises(DataError, match="dataset 'train' is empty"):
            build_layout(summaries, [workers] * tasks)
        return
    layout = build_layout(summaries, [workers] * tasks)
    counts = layout.counts("train")
    if min(counts) == 0:
        with pytest.raises(DataError, match="holds no rows"):
            _steps.steps_per_epoch(counts, 1)
        return
    batch = data.draw(st.integers(1, min(counts)))
    steps = _steps.steps_per_epoch(counts, batch)
    seen = []
    for rank_rows in layout.ranks:
        start, stop = rank_rows.ranges["train"]
        ids = np.asarray(task_ids[rank_rows.partition][start:stop])
        order = _steps.epoch_order(
            len(ids), steps * batch, shuffle=True, seed=0, rank=rank_rows.rank, epoch=0
        )
        assert len(order) == steps * batch
        seen.append(ids[order])
    missed = total - len(np.unique(np.concatenate(seen)))
    assert 0 <= missed < size * batch


# ------------------------------------------------------------------ layouts


def _summary(partition, rows, width=3, name="train"):
    cols = (ColumnInfo("x", "vector", "float32", width), ColumnInfo("y", "scalar", "int64"))
    return SpillSummary(partition, {name: Piece(rows, cols if rows else ())})


def test_layout_orders_ranks_by_partition_and_splits_tasks_between_workers():
    layout = build_layout([_summary(1, 5), _summary(0, 4)], [2, 2])
    assert [(r.rank, r.partition, r.ranges["train"]) for r in layout.ranks] == [
        (0, 0, (0, 2)),
        (1, 0, (2, 4)),
        (2, 1, (0, 2)),
        (3, 1, (2, 5)),
    ]
    assert layout.counts("train") == [2, 2, 2, 3]
    again = DataLayout.from_json(layout.to_json())
    assert again == layout
    assert SpillSummary.from_json(_summary(3, 9).to_json()) == _summary(3, 9)


def test_a_task_with_no_rows_takes_the_columns_of_the_others():
    layout = build_layout([_summary(0, 0), _summary(1, 6)], [1, 1])
    assert [c.name for c in layout.columns["train"]] == ["x", "y"]
    assert layout.counts("train") == [0, 6]


def test_an_empty_dataset_is_an_error():
    with pytest.raises(DataError, match="dataset 'train' is empty: its DataFrame has no rows"):
        build_layout([_summary(0, 0), _summary(1, 0)], [1, 1])


def test_array_lengths_that_differ_between_tasks_are_named():
    says = r"column 'x' of dataset 'train' holds arrays of different lengths \(3 on task 0, 4 on task 1\)"
    with pytest.raises(DataError, match=says):
        build_layout([_summary(0, 5, width=3), _summary(1, 5, width=4)], [1, 1])


def test_errors_pickle_and_derive_from_config_error():
    import pickle

    err = pickle.loads(pickle.dumps(DataError("column 'x' ...")))
    assert isinstance(err, DataError) and isinstance(err, ConfigError) and isinstance(err, RingtrainError)
    assert str(err) == "column 'x' ..."
