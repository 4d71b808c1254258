"""What one rank passes to a collective, a 64-bit signature of it, and the mismatch message.

Pure logic, no MPI: before each collective every rank allgathers the signature of its
call; when they differ the ranks exchange their :class:`Call` descriptions (as JSON,
:func:`encode_call`/:func:`decode_call`: the MPI world's members are not authenticated,
so a peer's bytes are parsed, never unpickled) and every rank raises the same message
built by :func:`mismatch_message`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

Spec = tuple[tuple[int, ...], str]  # (shape, dtype name)

_INT64_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Call:
    """One rank's side of a collective: its kind, op, root and tensors' (shape, dtype)."""

    what: str
    op: str
    specs: tuple[Spec, ...]
    root: int | None = None
    free_first_dim: bool = False  # allgather: the first dimension may differ across ranks
    compression: str | None = None  # allreduce: the wire format ("fp16", "bf16") of float32 buckets

    def comparable(self) -> tuple:
        specs = self.specs
        if self.free_first_dim:
            specs = tuple((shape[1:], dtype) for shape, dtype in specs)
        return (self.what, self.op, self.root, specs, self.compression)


_PLAIN = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Opaque:
    """A value of another type that a peer passed (e.g. an invalid ``root_rank``), kept as its
    ``repr`` and ``str`` so the mismatch message reads as it would have on that peer."""

    text_repr: str
    text_str: str

    def __repr__(self) -> str:
        return self.text_repr

    def __str__(self) -> str:
        return self.text_str


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        value = int(value)  # prints alike, and is a valid root_rank
    if type(value) in _PLAIN:
        return value
    if isinstance(value, Opaque):
        return {"repr": value.text_repr, "str": value.text_str}
    return {"repr": repr(value), "str": str(value)}


def _unplain(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) != {"repr", "str"} or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"unexpected value {value!r}")
        return Opaque(value["repr"], value["str"])
    if type(value) not in _PLAIN:
        raise ValueError(f"unexpected value {value!r}")
    return value


def encode_call(call: Call) -> bytes:
    """``call`` as JSON bytes (for :func:`decode_call` on another rank)."""
    specs = [[list(shape), dtype] for shape, dtype in call.specs]
    fields = [call.what, call.op, specs, _plain(call.root), call.free_first_dim, _plain(call.compression)]
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_call(data: bytes) -> Call:
    """The :class:`Call` another rank encoded; ValueError when ``data`` is not one."""
    try:
        what, op, raw_specs, root, free_first_dim, compression = json.loads(data)
        specs = tuple((tuple(shape), dtype) for shape, dtype in raw_specs)
    except (TypeError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not a collective description: {exc}") from None
    well_formed = (
        isinstance(what, str)
        and isinstance(op, str)
        and isinstance(free_first_dim, bool)
        and all(isinstance(dtype, str) and all(type(d) is int for d in shape) for shape, dtype in specs)
    )
    if not well_formed:
        raise ValueError("not a collective description: a field has the wrong type")
    return Call(what, op, specs, _unplain(root), free_first_dim, _unplain(compression))


def spec_of(array: np.ndarray) -> Spec:
    return (tuple(int(d) for d in array.shape), array.dtype.name)


def signature(call: Call) -> int:
    """A 64-bit hash (as a non-negative int64) of everything that must agree across ranks."""
    digest = hashlib.blake2b(repr(call.comparable()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _INT64_MASK


def _fmt(spec: Spec) -> str:
    shape, dtype = spec
    return f"{shape} {dtype}"


def _difference(call: Call, ref: Call, rank: int) -> str | None:
    """How ``call`` (from ``rank``) differs from ``ref`` (rank 0's), or None if it does not."""
    if call.comparable() == ref.comparable():
        return None
    if call.what != ref.what:
        return f"rank {rank} called {call.what} but rank 0 called {ref.what}"
    if call.op != ref.op:
        return f"rank {rank} uses op {call.op} but rank 0 uses {ref.op}"
    if call.root != ref.root:
        return f"rank {rank} uses root_rank={call.root} but rank 0 uses root_rank={ref.root}"
    if call.compression != ref.compression:
        return f"rank {rank} uses compression={call.compression!r} but rank 0 uses {ref.compression!r}"
    if len(call.specs) != len(ref.specs):
        return f"rank {rank} passes {len(call.specs)} tensors but rank 0 passes {len(ref.specs)}"
    single = len(call.specs) == 1
    for i, (mine, theirs) in enumerate(zip(call.specs, ref.specs, strict=True)):
        a, b = (mine, theirs)
        if call.free_first_dim:
            a, b = (mine[0][1:], mine[1]), (theirs[0][1:], theirs[1])
        if a != b:
            where = "" if single else f"tensor {i}: "
            return f"{where}rank {rank} has shape {_fmt(mine)} but rank 0 has {_fmt(theirs)}"
    return f"rank {rank} differs from rank 0"  # unreachable unless comparable() grows


def mismatch_message(calls: list[Call], me: int, limit: int = 4) -> str:
    """The error text for a collective whose arguments differ across ranks.

    ``calls[r]`` is rank r's :class:`Call`; ``me`` is the rank raising the error.

    >>> a = Call("allreduce", "Average", (((4,), "float32"),))
    >>> b = Call("allreduce", "Average", (((3,), "float32"),))
    >>> mismatch_message([a, b], me=0)[:62]
    'allreduce: rank 1 has shape (3,) float32 but rank 0 has (4,) '
    """
    ref = calls[0]
    diffs = [d for r, c in enumerate(calls) if r and (d := _difference(c, ref, r))]
    if not diffs:
        diffs = ["the ranks' signatures differ but their descriptions agree"]
    more = f"; and {len(diffs) - limit} more rank(s) differ" if len(diffs) > limit else ""
    need = (
        "equal dtypes and equal shapes after the first dimension"
        if ref.free_first_dim
        else "the same tensors (shapes and dtypes, in the same order), op, root and compression"
    )
    return (
        f"{ref.what}: " + "; ".join(diffs[:limit]) + more + f" (raised on rank {me}). "
        f"Every rank must pass {need}; check that all ranks run the same code path and data shapes."
    )
