"""Parameter counts of the benchmark CNNs, built with Keras 3 on CPU (no training)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

keras = pytest.importorskip("keras")

from benchmarks import cnn  # noqa: E402
from benchmarks.models import build  # noqa: E402


@pytest.mark.parametrize(("name", "params"), [("vgg16", 138_357_544), ("vgg19", 143_667_240)])
def test_vgg_canonical_count_at_224(name: str, params: int) -> None:
    keras.backend.clear_session()
    assert build(name, 224, 1000, keras).count_params() == params


def test_inception_v1_count() -> None:
    model = build("inception1", 224, 1000, keras)
    # GoogLeNet without auxiliary heads: ~7M (the paper's Table 1 layers, with biases).
    assert 6_600_000 <= model.count_params() <= 7_000_000
    # Global average pooling: the count does not depend on image size.
    assert build("inception1", 64, 1000, keras).count_params() == model.count_params()


def test_inception_v1_aux_heads() -> None:
    model = build("inception1", 224, 1000, keras, aux=True)
    assert len(model.outputs) == 3
    with pytest.raises(ValueError, match="auxiliary head"):
        build("inception1", 64, 1000, keras, aux=True)


def test_vgg_small_images_adapt_or_keep_the_head() -> None:
    # 64 px: the last pool is 2x2x512, so fc1 has 2048 inputs instead of 25088.
    small = build("vgg16", 64, 1000, keras).count_params()
    assert small == 138_357_544 - (25088 - 2048) * 4096
    assert build("vgg16", 64, 1000, keras, fixed_head=True).count_params() == 138_357_544


def test_small_models_run_forward() -> None:
    import numpy as np

    for name in ("inception1", "vgg16"):
        out = build(name, 32, 10, keras)(np.zeros((2, 32, 32, 3), np.float32))
        assert tuple(out.shape) == (2, 10)


def test_unknown_model_and_bad_depth() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build("resnet", 224, 1000, keras)
    with pytest.raises(ValueError, match="at least|>= 32"):
        build("vgg16", 16, 10, keras)


def test_check_record_rejects_missing_and_non_positive() -> None:
    good = dict.fromkeys(cnn.REQUIRED_KEYS, 1)
    good.update(
        allreduce_share=0.5, model="inception1", backend="mpi", platform="x", tf_version="2", date="d"
    )
    cnn.check_record(good)
    with pytest.raises(ValueError, match="lacks"):
        cnn.check_record({k: v for k, v in good.items() if k != "images_per_sec"})
    with pytest.raises(ValueError, match="non-positive"):
        cnn.check_record({**good, "images_per_sec": 0})
    with pytest.raises(ValueError, match="without a reason"):
        cnn.check_record({**good, "allreduce_share": None})


def test_efficiency_uses_the_n1_baseline() -> None:
    from benchmarks.sweep import efficiencies

    rows = efficiencies(
        [
            {"model": "m", "backend": "mpi", "np": 1, "images_per_sec": 10.0},
            {"model": "m", "backend": "mpi", "np": 2, "images_per_sec": 18.0},
        ]
    )
    assert [r["efficiency"] for r in rows] == [1.0, 0.9]


def test_efficiency_over_repeats_pairs_each_repeat_with_its_own_baseline() -> None:
    from benchmarks.sweep import efficiencies

    def rec(n: int, ips: float, sweep: str, repeat: int) -> dict:
        return {
            "model": "m",
            "backend": "mpi",
            "np": n,
            "images_per_sec": ips,
            "sweep_id": sweep,
            "repeat": repeat,
        }

    old = [rec(1, 1.0, "a", 0), rec(2, 1.0, "a", 0)]  # an earlier sweep: ignored
    new = [rec(1, 10.0, "b", 0), rec(2, 18.0, "b", 0), rec(1, 20.0, "b", 1), rec(2, 30.0, "b", 1)]
    new += [rec(1, 10.0, "b", 2), rec(2, 19.0, "b", 2)]
    rows = efficiencies(old + new)
    two = rows[1]
    assert two["repeats"] == 3 and two["images_per_sec"] == 19.0
    assert two["efficiency"] == pytest.approx(0.9)  # median of 0.9, 0.75, 0.95
    assert (two["efficiency_min"], two["efficiency_max"]) == pytest.approx((0.75, 0.95))
