"""Equal steps: how many rows each rank reads per epoch, so every rank takes the same steps.

Pure logic (numpy only). The rule: with ``batch_size`` B and each rank holding
``counts[r]`` rows, every rank takes ``S = max(counts) // B`` steps per epoch, that is
``S * B`` rows. A rank holding more than that leaves out fewer than B of its rows this
epoch; a rank holding fewer repeats some of its own rows (wrap-around) to fill its
steps. So one epoch covers every row but fewer than ``size * B``, and no rank waits in
a collective for a peer that has run out of batches. With shuffling, which rows are
left out or repeated changes from epoch to epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError


def split_rows(total: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``total`` rows into ``parts`` contiguous ranges whose sizes differ by at most one."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    bounds = [total * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def steps_per_epoch(counts: Sequence[int], batch_size: int, dataset: str = "train") -> int:
    """Steps every rank takes per epoch over ``dataset``; ``counts`` holds each rank's rows.

    Raises DataError, naming the rank, when ``batch_size`` exceeds some rank's rows.
    """
    batch_size = check_batch_size(batch_size)
    if not counts:
        raise DataError(f"dataset {dataset!r} has no ranks")
    smallest = min(range(len(counts)), key=lambda r: (counts[r], r))
    if counts[smallest] == 0:
        raise DataError(
            f"rank {smallest} holds no rows of dataset {dataset!r} ({sum(counts)} rows over "
            f"{len(counts)} ranks); give it more rows or run fewer workers"
        )
    if batch_size > counts[smallest]:
        raise DataError(
            f"batch_size={batch_size} is larger than rank {smallest}'s share of dataset {dataset!r} "
            f"({counts[smallest]} rows; {sum(counts)} rows over {len(counts)} ranks); use a "
            f"batch_size of at most {counts[smallest]}, or fewer workers"
        )
    return max(counts) // batch_size


def epoch_order(
    num_rows: int,
    rows_per_epoch: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int,
    epoch: int,
    block_rows: int = 1,
    window_blocks: int = 0,
) -> np.ndarray:
    """The ``rows_per_epoch`` row indices (into this rank's ``num_rows``) one epoch reads, in order.

    Without shuffling, rows are read in storage order, so the same rows are left out (or
    repeated) every epoch. With it, each (seed, rank, epoch) gives its own order: with
    ``window_blocks`` 0, or a window covering every row, a uniform permutation; otherwise
    a block shuffle (see :func:`block_shuffle`). Indices take 4 bytes a row while they fit
    in int32.
    """
    if num_rows < 1:
        raise ValueError("num_rows must be >= 1")
    dtype = np.int32 if num_rows <= np.iinfo(np.int32).max else np.int64
    if not shuffle:
        order = np.arange(num_rows, dtype=dtype)
    else:
        rng = np.random.default_rng([seed, rank, epoch])
        if window_blocks < 1 or block_rows * window_blocks >= num_rows:
            order = rng.permutation(np.arange(num_rows, dtype=dtype))
        else:
            order = block_shuffle(num_rows, block_rows, window_blocks, rng, dtype)
    if rows_per_epoch <= num_rows:
        return order[:rows_per_epoch]
    # Wrap around: repeat this rank's own rows, starting again from the epoch's first.
    return np.resize(order, rows_per_epoch)


def block_shuffle(
    num_rows: int, block_rows: int, window_blocks: int, rng: np.random.Generator, dtype=np.int64
) -> np.ndarray:
    """A permutation of ``num_rows`` that reads storage in runs of ``block_rows`` rows.

    The blocks are visited in a random order; each window of ``window_blocks`` visited
    blocks has its rows shuffled together. Every batch thus mixes rows from up to
    ``window_blocks`` places spread over the whole shard, while a window's reads stay
    within a few contiguous blocks, which a disk (and the kernel's read-ahead) serves
    sequentially when the shard is larger than memory.
    """
    blocks = -(-num_rows // block_rows)
    visit = rng.permutation(blocks)
    within = np.arange(block_rows, dtype=dtype)
    order = np.empty(num_rows, dtype=dtype)
    filled = 0
    for first in range(0, blocks, window_blocks):
        rows = (visit[first : first + window_blocks, None].astype(dtype) * block_rows + within).ravel()
        rows = rows[rows < num_rows]  # the last block may be short
        rng.shuffle(rows)
        order[filled : filled + len(rows)] = rows
        filled += len(rows)
    return order
