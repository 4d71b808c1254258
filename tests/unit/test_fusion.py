"""Fused buffers: pack/unpack on both implementations, bucket planning and configuration."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ringtrain import fusion
from ringtrain.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
INTS = [np.dtype(np.int32), np.dtype(np.int64)]
DTYPES = FLOATS + INTS
NATIVE_MISSING = (
    "native extension ringtrain.fusion._native is not built "
    f"({fusion._NATIVE_IMPORT_ERROR}); build it with `pip install -e .` or "
    "`python setup.py build_ext --inplace`"
)

IMPLS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "native",
        id="native",
        marks=pytest.mark.skipif(not fusion.native_available(), reason=NATIVE_MISSING),
    ),
]
both_available = pytest.mark.skipif(not fusion.native_available(), reason=NATIVE_MISSING)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(params=IMPLS)
def impl(request) -> fusion.FusedBuffers:
    return fusion.get_implementation(request.param)


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bits, so NaNs and signed zeros compare exactly."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def strided_view(rng: np.random.Generator, base: np.ndarray, how: int) -> np.ndarray:
    """A non-contiguous view of a bigger array holding the same kind of data."""
    if base.ndim >= 2 and how == 1:
        return base.T
    if how == 2:
        big = random_array(rng, (base.size * 2 + 1,), base.dtype)
        return big[::2][: base.size].reshape(base.shape)
    return base


shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)


@st.composite
def tensor_sets(draw, dtype=None):
    """A list of arrays of one dtype: random shapes (zero-size too), some strided or transposed."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = []
    for shape in draw(st.lists(shapes, min_size=0, max_size=6)):
        a = random_array(rng, shape, dtype)
        out.append(strided_view(rng, a, draw(st.integers(0, 2))))
    return dtype, out


# ------------------------------------------------------------------ round trip


@given(data=tensor_sets())
@SETTINGS
@pytest.mark.parametrize("name", ["numpy", pytest.param("native", marks=both_available)])
def test_round_trip_is_exact(name, data):
    impl = fusion.get_implementation(name)
    dtype, arrays = data
    buf = impl.pack(arrays)
    assert buf.ndim == 1 and buf.flags.c_contiguous
    assert buf.dtype == (dtype if arrays else np.float32)  # an empty bucket has no dtype of its own
    assert buf.size == sum(a.size for a in arrays)
    if arrays:
        np.testing.assert_array_equal(bits(buf), bits(np.concatenate([a.ravel() for a in arrays])))
    back = impl.unpack(buf, arrays)
    assert len(back) == len(arrays)
    for got, want in zip(back, arrays, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(bits(got), bits(want))


@given(data=tensor_sets(), size=st.integers(1, 16))
@SETTINGS
@pytest.mark.parametrize("name", ["numpy", pytest.param("native", marks=both_available)])
def test_scale_matches_numpy(name, data, size):
    impl = fusion.get_implementation(name)
    dtype, arrays = data
    scale = 1.0 / size
    back = impl.unpack(impl.pack(arrays), arrays, scale=scale)
    for got, a in zip(back, arrays, strict=True):
        if dtype.kind == "i":
            want = np.floor_divide(a, size)
        elif dtype == np.float64:
            want = a * np.float64(scale)
        else:  # float32 directly; float16/bfloat16 through float32, rounded once
            want = (a.astype(np.float32) * np.float32(scale)).astype(dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(bits(got), bits(want))


@both_available
@given(data=tensor_sets(), scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 3, 1 / 7, 1 / 64]))
@SETTINGS
def test_native_equals_numpy_bit_for_bit(data, scale):
    dtype, arrays = data
    native, twin = fusion.get_implementation("native"), fusion.get_implementation("numpy")
    buf_n, buf_t = native.pack(arrays), twin.pack(arrays)
    np.testing.assert_array_equal(bits(buf_n), bits(buf_t))
    for got, want in zip(
        native.unpack(buf_n, arrays, scale=scale), twin.unpack(buf_t, arrays, scale=scale), strict=True
    ):
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("compress", ["fp16", "bf16"])
@given(data=tensor_sets(dtype=np.dtype(np.float32)), size=st.integers(1, 8))
@SETTINGS
def test_compression_round_trip(compress, data, size):
    _, arrays = data
    twin = fusion.get_implementation("numpy")
    impls = [twin] + ([fusion.get_implementation("native")] if fusion.native_available() else [])
    results = []
    for impl in impls:
        buf = impl.pack(arrays, compress=compress)
        assert buf.dtype == (np.float16 if compress == "fp16" else BF16)
        back = impl.unpack(buf, arrays, scale=1.0 / size, compress=compress)
        results.append((buf, back))
        rtol = 2**-11 if compress == "fp16" else 2**-8
        for got, a in zip(back, arrays, strict=True):
            assert got.dtype == np.float32 and got.shape == a.shape
            # Values here are ~N(0, 100); fp16 overflows above 65504, which these never reach.
            np.testing.assert_allclose(got, a / size, rtol=rtol * 1.01, atol=1e-6)
    for buf, back in results[1:]:  # native == twin, bit for bit
        np.testing.assert_array_equal(bits(buf), bits(results[0][0]))
        for got, want in zip(back, results[0][1], strict=True):
            np.testing.assert_array_equal(bits(got), bits(want))


# A wide sweep of float32 bit patterns: subnormals, overflow, ties, NaN payloads, infinities.
def special_floats() -> np.ndarray:
    rng = np.random.default_rng(7)
    patterns = [
        rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000 - 64, 0x38800000 + 64, 97, dtype=np.uint32),  # fp16 subnormal range
        np.arange(0x477FE000 - 64, 0x47800000 + 64, dtype=np.uint32),  # fp16 overflow edge
        np.array(
            [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7F801FFF],
            dtype=np.uint32,
        ),
        (np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000,  # exact bf16 ties
        (np.arange(1 << 16, dtype=np.uint32) << 13) | 0x1000,  # exact fp16 ties
    ]
    return np.concatenate(patterns).view(np.float32)


@pytest.fixture(params=["simd", "scalar"])
def conversion_path(request):
    """Run a test on the native AVX2/F16C conversions (where the CPU has them) and on the scalar ones."""
    native = fusion._native
    if native is None:
        pytest.skip(NATIVE_MISSING)
    native.set_simd(request.param == "simd")
    try:
        yield native.simd_path()
    finally:
        native.set_simd(True)


def test_scalar_path_can_be_forced(conversion_path, request):
    if request.node.callspec.params["conversion_path"] == "scalar":
        assert conversion_path == "scalar"
    else:
        assert conversion_path in ("avx2+f16c", "scalar")  # scalar on CPUs without AVX2/F16C


@both_available
@pytest.mark.parametrize("compress", ["fp16", "bf16"])
@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 3])
def test_compression_matches_numpy_casts_on_special_values(compress, scale, conversion_path):
    x = special_floats()
    wire = np.float16 if compress == "fp16" else BF16
    with np.errstate(all="ignore"):
        want_buf = x.astype(wire)
        want = want_buf.astype(np.float32)
        if scale != 1.0:
            want = want * np.float32(scale)
    for name in ("native", "numpy"):
        impl = fusion.get_implementation(name)
        with np.errstate(all="ignore"):
            buf = impl.pack([x], compress=compress)
            (back,) = impl.unpack(buf, [x], scale=scale, compress=compress)
        np.testing.assert_array_equal(bits(buf), bits(want_buf), err_msg=name)
        np.testing.assert_array_equal(bits(back), bits(want), err_msg=name)


@both_available
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_half_scaling_matches_on_every_bit_pattern(dtype, conversion_path):
    x = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    with np.errstate(all="ignore"):
        want = (x.astype(np.float32) * np.float32(1 / 3)).astype(dtype)
        for name in ("native", "numpy"):
            (got,) = fusion.get_implementation(name).unpack(x.copy(), [x], scale=1 / 3)
            np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)


@both_available
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_half_add_matches_numpy_on_every_bit_pattern(dtype, conversion_path):
    # The compressed sum of the shared-memory allreduce: numpy's float16 add (ml_dtypes'
    # bfloat16 add), rounded once. Every pattern meets 4 partners, NaNs and infinities included.
    # When both addends are NaN, IEEE 754 leaves open which one propagates (ml_dtypes and
    # numpy choose differently), so there the result need only be a NaN.
    a = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    kind = "f2" if dtype == np.float16 else "bf16"
    for shift in (1, 255, 12345, 32768):
        b = np.roll(a, shift)
        out = np.empty_like(a)
        fusion._native.half_add(a, b, out, kind)
        with np.errstate(all="ignore"):
            want = a + b
        both = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
        assert both.sum() < 4096 and np.isnan(out[both].astype(np.float32)).all()
        np.testing.assert_array_equal(bits(out)[~both], bits(want)[~both])


@both_available
@pytest.mark.parametrize("compress", ["fp16", "bf16"])
def test_widening_matches_numpy_on_every_bit_pattern(compress, conversion_path):
    wire = np.float16 if compress == "fp16" else BF16
    h = np.arange(1 << 16, dtype=np.uint16).view(wire)
    like = [np.empty(h.size, np.float32)]
    native, twin = fusion.get_implementation("native"), fusion.get_implementation("numpy")
    for scale in (1.0, 0.25):
        (got,) = native.unpack(h.copy(), like, scale=scale, compress=compress)
        with np.errstate(invalid="ignore"):  # signalling NaNs
            (want,) = twin.unpack(h.copy(), like, scale=scale, compress=compress)
        np.testing.assert_array_equal(bits(got), bits(want))


def test_scale_in_place(impl, monkeypatch):
    monkeypatch.setattr(fusion, "_selected", impl)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert fusion.scale_in_place(x, 0.5) is x
    np.testing.assert_array_equal(x, np.arange(8, dtype=np.float32).reshape(2, 4) * np.float32(0.5))
    i = np.array([-3, 3, 7], np.int64)
    fusion.scale_in_place(i, 1 / 2)
    np.testing.assert_array_equal(i, [-2, 1, 3])  # floor division, as unpack
    with pytest.raises(ConfigError, match="C-contiguous"):
        fusion.scale_in_place(np.ones((3, 3), np.float32).T, 0.5)


# ------------------------------------------------------------ buffers and out=


def test_pack_into_reused_out_buffer(impl):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)
    out = np.full(20, -1, np.float32)
    view = impl.pack([a, b], out=out)
    assert np.shares_memory(view, out) and view.size == 9
    np.testing.assert_array_equal(out[:9], [0, 1, 2, 3, 4, 5, 1, 1, 1])
    assert (out[9:] == -1).all()


def test_unpack_into_out_arrays_including_strided(impl):
    arrays = [np.arange(12, dtype=np.float64).reshape(3, 4), np.arange(5, dtype=np.float64)]
    buf = impl.pack(arrays)
    base = np.zeros((4, 3))
    outs = [base.T, np.zeros(5)]  # the first is a non-contiguous target
    res = impl.unpack(buf, arrays, scale=0.5, out=outs)
    assert res[0] is outs[0] and res[1] is outs[1]
    np.testing.assert_array_equal(base.T, arrays[0] * 0.5)
    np.testing.assert_array_equal(outs[1], arrays[1] * 0.5)


@pytest.fixture
def four_threads():
    """Let the native kernels split large copies over up to 4 threads for one test."""
    native = fusion._native
    if native is None:
        yield
        return
    saved = native.get_threading()
    native.set_threading(4, 1 << 20)
    try:
        yield
    finally:
        native.set_threading(*saved)


def test_large_buffers_use_the_threaded_path(impl, four_threads):
    # 48 MiB of float32 crosses the native thread threshold; results must not change.
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (5_000_001, 3, 7_582_909)]
    buf = impl.pack(arrays)
    back = impl.unpack(buf, arrays, scale=0.25)
    for got, a in zip(back, arrays, strict=True):
        np.testing.assert_array_equal(got, a * np.float32(0.25))
    half = impl.pack(arrays, compress="bf16")
    np.testing.assert_array_equal(bits(half), bits(np.concatenate(arrays).astype(BF16)))


def test_other_dtypes_copy_as_bytes(impl):
    arrays = [np.array([True, False, True]), np.array([[False]])]
    back = impl.unpack(impl.pack(arrays), arrays)
    for got, a in zip(back, arrays, strict=True):
        np.testing.assert_array_equal(got, a)
    with pytest.raises(ConfigError, match="cannot scale bool"):
        impl.unpack(impl.pack(arrays), arrays, scale=0.5)


def test_compression_leaves_non_float32_alone(impl):
    arrays = [np.arange(4, dtype=np.int64)]
    buf = impl.pack(arrays, compress="fp16")
    assert buf.dtype == np.int64
    np.testing.assert_array_equal(impl.unpack(buf, arrays, scale=0.5, compress="fp16")[0], [0, 0, 1, 1])


def test_empty_inputs(impl):
    assert impl.pack([]).size == 0
    assert impl.unpack(np.empty(0, np.float32), []) == []


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda f: f.pack([np.ones(2, np.float32), np.ones(2, np.float64)]), "share a dtype"),
        (lambda f: f.pack([np.ones(2, np.float32)], compress="int8"), "compress='int8'"),
        (lambda f: f.pack([np.ones(3, np.float32)], out=np.empty(2, np.float32)), "at least 3"),
        (lambda f: f.pack([np.ones(3, np.float32)], out=np.empty(3, np.float64)), "dtype float64"),
        (lambda f: f.pack([np.ones(3, np.float32)], out=np.empty(6, np.float32)[::2]), "C-contiguous"),
        (lambda f: f.unpack(np.ones(4, np.float32), [np.ones(3, np.float32)]), "exactly 3"),
        (lambda f: f.unpack(np.ones(3, np.float32), [np.ones(3, np.float32)], compress="fp16"), "float16"),
        (lambda f: f.unpack(np.ones(3, np.int32), [np.ones(3, np.int32)], scale=0.3), "1/n"),
        (lambda f: f.unpack(np.ones(3, np.int32), [np.ones(3, np.int32)], scale=2.0), "1/n"),
        (lambda f: f.unpack(np.ones(3, np.float32), [np.ones(3, np.float32)], out=[np.ones(2)]), r"out\[0\]"),
        (lambda f: f.unpack(np.ones(3, np.float32), [np.ones(3, np.float32)], out=[]), "out has 0"),
    ],
)
def test_bad_arguments_raise_config_error(impl, call, match):
    with pytest.raises(ConfigError, match=match):
        call(impl)


def test_read_only_out_is_rejected(impl):
    target = np.zeros(3, np.float32)
    target.flags.writeable = False
    with pytest.raises(ConfigError, match="read-only"):
        impl.unpack(np.ones(3, np.float32), [target], out=[target])


# --------------------------------------------------------------------- planning


@given(
    entries=st.lists(
        st.tuples(st.sampled_from(["float32", "float16", "int64"]), st.integers(0, 1000)), max_size=40
    ),
    threshold=st.integers(0, 3000),
)
@settings(max_examples=200, deadline=None)
def test_plan_buckets_properties(entries, threshold):
    buckets = fusion.plan_buckets(entries, threshold)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(entries)))  # every tensor exactly once
    assert [b[0] for b in buckets] == sorted(b[0] for b in buckets)  # ordered by first index
    for b in buckets:
        assert b == sorted(b)  # order preserved inside a bucket
        assert len({entries[i][0] for i in b}) == 1  # one dtype per bucket
        size = sum(entries[i][1] for i in b)
        assert size <= threshold or len(b) == 1  # threshold respected unless one tensor is too big
    # Per dtype, buckets are consecutive runs of that dtype's tensors, filled greedily.
    for dtype in {d for d, _ in entries}:
        mine = [b for b in buckets if entries[b[0]][0] == dtype]
        order = [i for b in mine for i in b]
        assert order == [i for i, (d, _) in enumerate(entries) if d == dtype]
        for prev, nxt in zip(mine, mine[1:], strict=False):
            assert sum(entries[i][1] for i in prev) + entries[nxt[0]][1] > threshold


def test_plan_buckets_examples():
    assert fusion.plan_buckets([], 100) == []
    assert fusion.plan_buckets([(np.float32, 60), (np.float32, 60), (np.float32, 200)], 100) == [
        [0],
        [1],
        [2],
    ]
    assert fusion.plan_buckets([(np.float32, 50), (np.float32, 50), (np.float32, 1)], 100) == [[0, 1], [2]]
    assert fusion.plan_buckets([(np.float32, 4)] * 3, 0) == [[0], [1], [2]]
    arrays = [np.ones(3, np.float32), np.ones(2, BF16), np.ones(1, np.float32)]
    assert fusion.plan_buckets([(a.dtype, a.nbytes) for a in arrays], 1 << 20) == [[0, 2], [1]]
    assert fusion.plan_buckets([("bfloat16", 2), (BF16, 2)], 10) == [[0, 1]]
    with pytest.raises(ConfigError, match=">= 0"):
        fusion.plan_buckets([(np.float32, 4)], -1)
    with pytest.raises(ConfigError, match="negative size"):
        fusion.plan_buckets([(np.float32, -4)], 10)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, fusion.DEFAULT_FUSION_THRESHOLD),
        ("", fusion.DEFAULT_FUSION_THRESHOLD),
        ("0", 0),
        ("1048576", 1 << 20),
        ("64M", 64 << 20),
        ("64mib", 64 << 20),
        ("512K", 512 << 10),
        ("1G", 1 << 30),
        (" 2 GB ", 2 << 30),
    ],
)
def test_fusion_threshold(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RINGTRAIN_FUSION_THRESHOLD", raising=False)
    else:
        monkeypatch.setenv("RINGTRAIN_FUSION_THRESHOLD", value)
    assert fusion.fusion_threshold() == expected


@pytest.mark.parametrize("value", ["-1", "12.5", "lots", "64X", "1e6", "0x100"])
def test_bad_fusion_threshold_raises_config_error(monkeypatch, value):
    monkeypatch.setenv("RINGTRAIN_FUSION_THRESHOLD", value)
    with pytest.raises(ConfigError, match="RINGTRAIN_FUSION_THRESHOLD"):
        fusion.fusion_threshold()


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("", 1), ("1", 1), ("4", 4)])
def test_fusion_threads(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RINGTRAIN_FUSION_THREADS", raising=False)
    else:
        monkeypatch.setenv("RINGTRAIN_FUSION_THREADS", value)
    assert fusion.fusion_threads() == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_fusion_threads_raises_config_error(monkeypatch, value):
    monkeypatch.setenv("RINGTRAIN_FUSION_THREADS", value)
    with pytest.raises(ConfigError, match="RINGTRAIN_FUSION_THREADS"):
        fusion.fusion_threads()


def test_impl_env_selection(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_FUSION_IMPL", "numpy")
    assert fusion.select_implementation().name == "numpy"
    monkeypatch.setenv("RINGTRAIN_FUSION_IMPL", "AUTO")
    assert fusion.select_implementation().name == ("native" if fusion.native_available() else "numpy")
    monkeypatch.setenv("RINGTRAIN_FUSION_IMPL", "fast")
    with pytest.raises(ConfigError, match="RINGTRAIN_FUSION_IMPL='fast'"):
        fusion.select_implementation()


def test_native_forced_but_missing_raises(monkeypatch):
    monkeypatch.setattr(fusion, "_native", None)
    monkeypatch.setattr(fusion, "_NATIVE_IMPORT_ERROR", "ImportError: simulated")
    with pytest.raises(ConfigError, match="not built"):
        fusion.select_implementation("native")


def test_auto_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(fusion, "_native", None)
    monkeypatch.setattr(fusion, "_NATIVE_IMPORT_ERROR", "ImportError: simulated")
    with caplog.at_level("WARNING", logger="ringtrain.fusion"):
        assert fusion.select_implementation("auto").name == "numpy"
    messages = [r.getMessage() for r in caplog.records if r.name == "ringtrain.fusion"]
    assert len(messages) == 1 and "pip install -e ." in messages[0]


def test_bad_environment_does_not_break_import(monkeypatch):
    import subprocess
    import sys

    env = dict(os.environ, RINGTRAIN_FUSION_IMPL="fast", RINGTRAIN_FUSION_THRESHOLD="lots")
    code = (
        "import ringtrain, ringtrain.fusion as f, ringtrain.collectives\n"
        "try:\n    f.IMPLEMENTATION\nexcept ringtrain.ConfigError as e:\n    print('CONFIG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "CONFIG RINGTRAIN_FUSION_IMPL='fast' is not valid" in out.stdout


def test_implementation_matches_environment():
    forced = os.environ.get("RINGTRAIN_FUSION_IMPL", "auto").strip().lower() or "auto"
    expected = forced if forced != "auto" else ("native" if fusion.native_available() else "numpy")
    assert expected == fusion.IMPLEMENTATION


def test_native_required_by_ci():
    """CI sets RINGTRAIN_REQUIRE_NATIVE=1 so a silently missing extension fails the build."""
    if os.environ.get("RINGTRAIN_REQUIRE_NATIVE", "") not in ("", "0"):
        assert fusion.native_available(), NATIVE_MISSING
