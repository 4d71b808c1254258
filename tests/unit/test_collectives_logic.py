"""Pure logic of the collectives: signatures, mismatch messages, dtypes, context fallback. No MPI."""

from __future__ import annotations

import sys
import types

import ml_dtypes
import numpy as np
import pytest

from ringtrain import context
from ringtrain.backends import mpi as mpi_backend
from ringtrain.collectives import _control, _convert, _engine
from ringtrain.collectives._ops import Average, Max, Sum, op_name
from ringtrain.collectives._signature import (
    Call,
    decode_call,
    encode_call,
    mismatch_message,
    signature,
    spec_of,
)
from ringtrain.errors import BackendError, ConfigError, RingtrainError


def call(*specs, what="allreduce", op="Average", **kw):
    return Call(what, op, tuple(specs), **kw)


def test_signature_is_stable_int64_and_sensitive():
    a = call(((4,), "float32"))
    assert signature(a) == signature(call(((4,), "float32")))
    assert 0 <= signature(a) < 2**63
    assert signature(a) != signature(call(((3,), "float32")))
    assert signature(a) != signature(call(((4,), "float64")))
    assert signature(a) != signature(call(((4,), "float32"), op="Sum"))
    assert signature(a) != signature(call(((4,), "float32"), ((1,), "int32")))


def test_allgather_signature_ignores_first_dimension_only():
    one = call(((2, 3), "int32"), what="allgather", free_first_dim=True)
    assert signature(one) == signature(call(((5, 3), "int32"), what="allgather", free_first_dim=True))
    assert signature(one) != signature(call(((2, 4), "int32"), what="allgather", free_first_dim=True))


def test_message_names_ranks_shapes_and_dtypes():
    msg = mismatch_message([call(((4,), "float32")), call(((3,), "float32"))], me=1)
    assert msg.startswith("allreduce: rank 1 has shape (3,) float32 but rank 0 has (4,) float32")
    assert "raised on rank 1" in msg


@pytest.mark.parametrize(
    ("other", "text"),
    [
        (call(((4,), "float32"), op="Sum"), "rank 1 uses op Sum but rank 0 uses Average"),
        (call(((4,), "float32"), ((1,), "int32")), "rank 1 passes 2 tensors but rank 0 passes 1"),
        (call(((4,), "float32"), root=1), "root_rank=1"),
        (call(((4,), "float32"), what="broadcast"), "rank 1 called broadcast but rank 0 called allreduce"),
    ],
)
def test_message_for_each_kind_of_difference(other, text):
    assert text in mismatch_message([call(((4,), "float32")), other], me=0)


def test_grouped_message_names_the_tensor_and_every_differing_rank():
    ref = call(((2,), "float32"), ((3,), "int64"), what="grouped_allreduce")
    bad = call(((2,), "float32"), ((3,), "int32"), what="grouped_allreduce")
    msg = mismatch_message([ref, ref, bad, bad], me=3)
    assert "tensor 1: rank 2 has shape (3,) int32 but rank 0 has (3,) int64" in msg
    assert "rank 3 has" in msg and "rank 1" not in msg


def test_message_is_capped_for_many_ranks():
    ref, bad = call(((2,), "float32")), call(((1,), "float32"))
    msg = mismatch_message([ref] + [bad] * 10, me=0, limit=4)
    assert "6 more rank(s) differ" in msg


# (another rank's call, whether it decodes to an equal Call: values that are not JSON data
# come back as stand-ins that print alike)
_DESCRIPTIONS = [
    (call(((4,), "float32")), True),
    (call(((2, 3), "int32"), what="allgather", op="-", free_first_dim=True), True),
    (call(((4,), "float32"), what="broadcast", op="-", root=np.int64(1)), True),
    (call(((4,), "float32"), what="broadcast", op="-", root="one"), True),
    (call(((4,), "float32"), what="broadcast", op="-", root=1.5), True),
    (call(((4,), "float32"), compression="fp16", op="invalid:'sum'"), True),
    (call(what="join", op="-"), True),
    (call(((), "bfloat16"), what="allreduce(ünïcode)"), True),
    (call(((4,), "float32"), what="broadcast", op="-", root=(0, 1)), False),
    (call(((4,), "float32"), compression=object()), False),
]


@pytest.mark.parametrize(("other", "equal"), _DESCRIPTIONS)
def test_descriptions_cross_ranks_as_json_and_give_the_same_message(other, equal):
    ref = call(((4,), "float32"))
    decoded = decode_call(encode_call(other))
    assert mismatch_message([ref, decoded], me=1) == mismatch_message([ref, other], me=1)
    assert (decoded == other) is equal
    assert repr(decoded.root) == repr(other.root) or isinstance(other.root, np.integer)
    assert repr(decoded.compression) == repr(other.compression)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80abc",
        b"{}",
        b"[1, 2]",
        b'["a", "b", [[[1.5], "f4"]], null, false, null]',
        b'["a", "b", [], {"x": 1}, false, null]',
    ],
)
def test_a_malformed_description_is_a_value_error_never_unpickled(data):
    with pytest.raises(ValueError, match="not a collective description|unexpected value"):
        decode_call(data)


class _FakeComm:
    """Rank ``me`` of a world whose ranks send ``messages``: buffer calls only (no MPI)."""

    def __init__(self, messages, me):
        self.messages, self.me = messages, me

    def Get_size(self):
        return len(self.messages)

    def Get_rank(self):
        return self.me

    def Allgather(self, send, recv):
        assert send.tolist() == [len(self.messages[self.me])]
        recv[:] = [len(m) for m in self.messages]

    def Allgatherv(self, send, recv):
        buf, counts, displs, _ = recv
        assert bytes(send[0]) == self.messages[self.me]
        for data, n, at in zip(self.messages, counts, displs, strict=True):
            buf[at : at + n] = np.frombuffer(data, np.uint8)


def test_control_messages_are_gathered_by_length_and_offset(monkeypatch):
    monkeypatch.setattr(_control, "mpi_module", lambda: types.SimpleNamespace(BYTE="BYTE"))
    messages = [b"[1]", b'"zwei"', b"null", b'{"d": [4]}']
    comm = _FakeComm(messages, me=2)
    assert _control.allgather_bytes(comm, messages[2]) == messages
    assert _control.allgather_json(comm, None, "test") == [[1], "zwei", None, {"d": [4]}]
    comm.messages = [b"[1]", b"\x80("]
    comm.me = 0
    with pytest.raises(BackendError, match="rank 1 sent a malformed test"):
        _control.allgather_json(comm, [1], "test")


def test_spec_of_names_bfloat16():
    assert spec_of(np.zeros((2, 1), ml_dtypes.bfloat16)) == ((2, 1), "bfloat16")


def test_op_names_for_signature():
    assert (op_name(Average), op_name(Sum), op_name(Max)) == ("Average", "Sum", "Max")
    assert op_name("sum").startswith("invalid:")


def test_to_numpy_passes_numpy_through_and_rejects_other_objects():
    a = np.arange(3)
    got, kind = _convert.to_numpy(a, "allreduce")
    assert got is a and kind == _convert.NUMPY
    assert _convert.to_numpy(np.float32(2), "x")[0].shape == ()
    with pytest.raises(ConfigError, match="takes numpy arrays or TensorFlow tensors"):
        _convert.to_numpy(object(), "allreduce")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int32", "int64"])
def test_reducible_dtypes(dtype):
    _convert.check_reducible(dtype, "allreduce")


def test_unreducible_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reduce bool tensors"):
        _convert.check_reducible("bool", "allreduce")


def test_pool_reuses_buffers_and_grows():
    pool = _engine._Pool()
    first = pool.get("pack", np.dtype(np.float32), 10)
    again = pool.get("pack", np.dtype(np.float32), 8)
    assert np.shares_memory(first, again) and again.size == 8
    bigger = pool.get("pack", np.dtype(np.float32), 20)
    assert bigger.size == 20 and not np.shares_memory(first, bigger)
    assert not np.shares_memory(bigger, pool.get("widen", np.dtype(np.float32), 20))


# ------------------------------------------------------------ context fallback


def _clear(monkeypatch):
    for name in (
        "RANK",
        "SIZE",
        "LOCAL_RANK",
        "LOCAL_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALRANKID",
        "MPI_LOCALNRANKS",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_outputs_are_reused_only_when_nobody_holds_them():
    cache = _engine._Outputs()
    specs = [((3,), np.dtype(np.float32)), ((2, 2), np.dtype(np.int64))]
    first = cache.get("k", specs)
    assert [a.shape for a in first] == [(3,), (2, 2)]
    kept = first[1]  # the caller still holds one result: a fresh set
    del first
    second = cache.get("k", specs)
    assert not any(a is kept for a in second)
    ids = [id(a) for a in second]
    del second  # dropped: the same arrays come back
    third = cache.get("k", specs)
    assert [id(a) for a in third] == ids and cache.reused == 1
    view = third[0][1:]  # a view holds its base: not reused either
    del third
    assert cache.get("k", specs)[0] is not view.base


def test_outputs_cache_is_bounded():
    cache = _engine._Outputs(limit=2, max_bytes=1000)
    small = [((10,), np.dtype(np.float32))]
    for key in "abc":
        cache.get(key, small)
    assert list(cache._cache) == ["b", "c"]
    cache.get("big", [((400,), np.dtype(np.float32))])  # 1600 bytes: alone over the budget
    assert list(cache._cache) == ["big"]


def test_overlap_buckets_follow_backprop_order():
    from ringtrain.collectives._tf import overlap_buckets

    assert overlap_buckets([], 10) == []
    assert overlap_buckets([4, 4, 8, 2], 8) == [[3], [2], [1, 0]]
    assert overlap_buckets([4, 4, 4], 0) == [[2], [1], [0]]
    assert overlap_buckets([30, 1, 1], 8) == [[2, 1], [0]]
    assert sorted(i for b in overlap_buckets([5] * 9, 12) for i in b) == list(range(9))


def test_context_falls_back_to_hydra_pmi_env(monkeypatch):
    _clear(monkeypatch)
    for k, v in {"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}.items():
        monkeypatch.setenv(k, v)
    assert (context.rank(), context.size(), context.local_rank(), context.local_size()) == (1, 3, 1, 2)


def test_context_prefers_ringtrain_env(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert context.rank() == 0
    with pytest.raises(RingtrainError):  # RANK set: never mix in MPI's numbering
        context.size()


def test_context_error_outside_any_job(monkeypatch):
    _clear(monkeypatch)
    with pytest.raises(RingtrainError, match="RANK is not set.*mpiexec"):
        context.rank()


# ------------------------------------------------------------ backend errors


def test_missing_mpi4py_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(mpi_backend, "_MPI", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` fail
    with pytest.raises(BackendError, match="pip install mpi4py mpich"):
        mpi_backend.mpi_module()


def test_world_size_disagreeing_with_size_env(monkeypatch):
    comm = types.SimpleNamespace(Get_size=lambda: 1, Get_rank=lambda: 0)
    fake = types.SimpleNamespace(COMM_WORLD=comm, Get_library_version=lambda: "fake")
    monkeypatch.setattr(mpi_backend, "_MPI", fake)
    monkeypatch.setattr(mpi_backend, "_WORLD", None)
    monkeypatch.setenv("SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(BackendError, match="SIZE=2 but the MPI world has 1 process"):
        mpi_backend.world()


class _PlainOptimizer:
    """Stands in for a tf-keras optimizer class (updates through apply_gradients)."""

    def __init__(self, learning_rate=0.1):
        self.learning_rate = learning_rate

    def get_config(self):
        return {"learning_rate": self.learning_rate}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def apply_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def test_distributing_a_distributed_optimizer_again_needs_the_same_settings():
    import ringtrain.keras as rk

    dist = rk.DistributedOptimizer(_PlainOptimizer(0.5), compression="fp16", backward_passes_per_step=2)
    assert type(dist) is not _PlainOptimizer and dist.learning_rate == 0.5
    same = rk.DistributedOptimizer(dist, compression="fp16", backward_passes_per_step=2)
    assert same is dist
    with pytest.raises(ConfigError, match=r"already distributed.*compression=None \(it has 'fp16'\)"):
        rk.DistributedOptimizer(dist, backward_passes_per_step=2)
    with pytest.raises(ConfigError, match=r"op=ringtrain.Sum \(it has ringtrain.Average\)"):
        rk.DistributedOptimizer(dist, op=Sum, compression="fp16", backward_passes_per_step=2)
    with pytest.raises(ConfigError, match="backward_passes_per_step=1 .*average_aggregated_gradients=True"):
        rk.DistributedOptimizer(dist, compression="fp16", average_aggregated_gradients=True)


def test_keras_module_imports_without_keras_and_validates():
    import ringtrain.keras as rk

    with pytest.raises(ConfigError, match="compression"):
        rk.DistributedOptimizer(object(), compression="int8")
    with pytest.raises(AttributeError):
        rk.NoSuchThing  # noqa: B018
