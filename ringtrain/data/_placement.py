"""Where rows go: which barrier task receives each row, and the shuffle keys that put it there.

Pure logic, free of Spark. ``DataFrame.repartition(n, col)`` sends a row to partition
``pmod(murmur3(col), n)``, Spark's 32-bit Murmur3 with seed 42 (the SQL ``hash``
function). :func:`keys_for_partitions` finds, for each partition, a small int key that
Spark's hash sends exactly there, so tagging a row with its target's key places it on
that target's task. The Spark tests check these hashes against Spark's own.
"""

from __future__ import annotations

SPARK_HASH_SEED = 42
_MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def spark_hash_int(value: int, seed: int = SPARK_HASH_SEED) -> int:
    """Spark's ``hash()`` of one IntegerType value: Murmur3 x86_32 of 4 bytes, signed."""
    k1 = (value & _MASK) * 0xCC9E2D51 & _MASK
    k1 = _rotl(k1, 15) * 0x1B873593 & _MASK
    h1 = _rotl((seed & _MASK) ^ k1, 13)
    h1 = (h1 * 5 + 0xE6546B64) & _MASK
    # Finalisation mix, with the input length (4 bytes).
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & _MASK
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & _MASK
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 & 0x80000000 else h1


def partition_of_key(key: int, num_partitions: int) -> int:
    """The partition ``repartition(num_partitions, key_column)`` gives an int ``key``."""
    return spark_hash_int(key) % num_partitions  # Python's % is already Spark's pmod


def keys_for_partitions(num_partitions: int) -> list[int]:
    """``keys[t]``: the smallest non-negative int key that hash partitioning sends to partition t."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    keys: list[int | None] = [None] * num_partitions
    missing = num_partitions
    key = 0
    while missing:
        target = partition_of_key(key, num_partitions)
        if keys[target] is None:
            keys[target] = key
            missing -= 1
        key += 1
    return keys  # type: ignore[return-value]


def round_robin_slices(
    num_rows: int, num_targets: int, rotation: int
) -> tuple[list[tuple[int, int, int]], int]:
    """Deal ``num_rows`` consecutive rows to ``num_targets`` targets as contiguous slices.

    Every target gets ``num_rows // num_targets`` rows; the ``num_rows % num_targets``
    extra ones go to the targets from ``rotation`` on, cyclically. Returns the non-empty
    ``(target, start, stop)`` slices and the rotation for the next call, so that over many
    calls every target's total stays within one row of every other's.
    """
    base, extra = divmod(num_rows, num_targets)
    slices = []
    start = 0
    for target in range(num_targets):
        size = base + (1 if (target - rotation) % num_targets < extra else 0)
        if size:
            slices.append((target, start, start + size))
            start += size
    return slices, (rotation + extra) % num_targets
