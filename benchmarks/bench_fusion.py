"""Fused-buffer throughput on a ResNet-50 gradient set.

Usage: ``python -m benchmarks.bench_fusion [--json out.json] [--repeat N]``

Every row moves the same bytes: a pack copies B bytes into the bucket and an
unpack copies B bytes out, so one pack+unpack moves 2B bytes; the memcpy row is
``np.copyto`` of B bytes done twice. GB/s = 2B / best time (10^9 bytes).
Compressed rows count float32 bytes, so they are comparable with the rest. The
``[scalar]`` row runs the native fp16 conversions with AVX2/F16C switched off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from benchmarks.shapes import resnet50_gradient_shapes
from ringtrain import fusion


def once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_cases(arrays: list[np.ndarray], scale: float) -> list[tuple[str, Callable[[], object]]]:
    total = sum(a.size for a in arrays)
    shapes = [a.shape for a in arrays]
    offsets = np.cumsum([a.size for a in arrays])[:-1]
    flat_src = np.concatenate([a.ravel() for a in arrays])
    flat_dst = np.empty_like(flat_src)
    bucket = np.empty(total, np.float32)
    outs = [np.empty_like(a) for a in arrays]
    half = np.empty(total, np.float16)  # the compressed bucket, reused like `bucket`
    brain = np.empty(total, fusion.wire_dtype(np.float32, "bf16"))

    def memcpy() -> None:
        np.copyto(bucket, flat_src)
        np.copyto(flat_dst, bucket)

    cases: list[tuple[str, Callable[[], object]]] = [("memcpy: np.copyto of B bytes, twice", memcpy)]

    impls = [fusion.get_implementation("numpy")]
    if fusion.native_available():
        impls.insert(0, fusion.get_implementation("native"))
    for impl in impls:

        def reuse(impl=impl, s=1.0) -> None:
            buf = impl.pack(arrays, out=bucket)
            impl.unpack(buf, arrays, scale=s, out=outs)

        def fresh(impl=impl) -> None:
            impl.unpack(impl.pack(arrays), arrays, scale=scale)

        def compressed(impl=impl, how="fp16") -> None:
            buf = impl.pack(arrays, out=half if how == "fp16" else brain, compress=how)
            impl.unpack(buf, arrays, scale=scale, compress=how, out=outs)

        cases += [
            (f"{impl.name}: pack+unpack, out= reused, scale=1", reuse),
            (f"{impl.name}: pack+unpack, out= reused, scale={scale:g}", lambda f=reuse: f(s=scale)),
            (f"{impl.name}: pack+unpack, fresh arrays, scale={scale:g}", fresh),
            (f"{impl.name}: fp16 pack+unpack, out= reused, scale={scale:g}", compressed),
            (
                f"{impl.name}: bf16 pack+unpack, out= reused, scale={scale:g}",
                lambda f=compressed: f(how="bf16"),
            ),
        ]
        if impl.name == "native":

            def scalar_fp16(f=compressed) -> None:
                fusion._native.set_simd(False)
                try:
                    f()
                finally:
                    fusion._native.set_simd(True)

            cases.append((f"native: fp16 pack+unpack, out= reused, scale={scale:g} [scalar]", scalar_fp16))

    def concat_split_copy() -> None:
        buf = np.concatenate([a.ravel() for a in arrays])
        [p.reshape(s).copy() for p, s in zip(np.split(buf, offsets), shapes, strict=True)]

    def concat_split_scale() -> None:
        buf = np.concatenate([a.ravel() for a in arrays])
        [(p * np.float32(scale)).reshape(s) for p, s in zip(np.split(buf, offsets), shapes, strict=True)]

    def concat_out_split_views() -> None:
        np.concatenate([a.ravel() for a in arrays], out=bucket)
        [p.reshape(s) for p, s in zip(np.split(bucket, offsets), shapes, strict=True)]

    # What the MPI path still packs: tensors under 1 MiB (larger ones reduce unpacked).
    small = [a for a in arrays if a.nbytes < (1 << 20)]
    small_outs = [np.empty_like(a) for a in small]
    for impl in impls:

        def small_only(impl=impl) -> None:
            buf = impl.pack(small, out=bucket)
            impl.unpack(buf, small, scale=scale, out=small_outs)

        cases.append((f"{impl.name}: the {len(small)} tensors < 1 MiB only, scale={scale:g} (*)", small_only))

    cases += [
        ("numpy concatenate + split, copies, scale=1", concat_split_copy),
        (f"numpy concatenate + split, scale={scale:g}", concat_split_scale),
        ("numpy concatenate(out=) + split views (unpack copies nothing)", concat_out_split_views),
    ]
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--repeat", type=int, default=10, help="rounds, each timing every case once; the best counts (10)"
    )
    parser.add_argument("--scale", type=float, default=0.5, help="averaging scale, 1/size (0.5)")
    args = parser.parse_args(argv)

    shapes = resnet50_gradient_shapes()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    nbytes = sum(a.nbytes for a in arrays)
    moved = 2 * nbytes

    thread_configs: list[tuple[str, tuple[int, int] | None]] = [("", None)]
    native = getattr(fusion, "_native", None)
    if native is not None:
        default = native.get_threading()  # from RINGTRAIN_FUSION_THREADS, 1 unless set
        more = max(2, min(4, os.cpu_count() or 1))
        thread_configs = [(f" [threads<={default[0]}]", default)]
        if default[0] != more:
            thread_configs.append((f" [threads<={more}]", (more, default[1])))

    # Every case runs once per round, rounds repeated: load from elsewhere hits all alike.
    cases: list[tuple[str, tuple[int, int] | None, Callable[[], object]]] = []
    seen: set[str] = set()
    for suffix, config in thread_configs:
        for name, fn in build_cases(arrays, args.scale):
            label = name + (suffix if name.startswith("native") else "")
            if label not in seen:
                seen.add(label)
                cases.append((label, config, fn))

    def timed(config: tuple[int, int] | None, fn: Callable[[], object]) -> float:
        if config is not None:
            native.set_threading(*config)
        return once(fn)

    for _, config, fn in cases:  # warm-up: page in buffers, load code
        timed(config, fn)
    best = {label: math.inf for label, _, _ in cases}
    for _ in range(args.repeat):
        for label, config, fn in cases:
            best[label] = min(best[label], timed(config, fn))
    if native is not None:
        native.set_threading(*thread_configs[0][1])
    rows = [{"case": label, "best_s": t, "gb_per_s": moved / t / 1e9} for label, t in best.items()]

    memcpy = rows[0]["gb_per_s"]
    small_bytes = sum(a.nbytes for a in arrays if a.nbytes < (1 << 20))
    for row in rows:
        if row["case"].startswith(("native: the", "numpy: the")):  # (*) rows move fewer bytes
            row["gb_per_s"] *= small_bytes / nbytes
        row["vs_memcpy"] = row["gb_per_s"] / memcpy

    print(
        f"(*) rows move 2 x {small_bytes / 1e6:.1f} MB; their GB/s counts those bytes\n"
        f"ResNet-50 gradients: {len(shapes)} float32 tensors, {nbytes / 1e6:.1f} MB (B); "
        f"each row moves 2B = {moved / 1e6:.1f} MB; best of {args.repeat} interleaved rounds; "
        f"fusion.IMPLEMENTATION={fusion.IMPLEMENTATION}; {os.cpu_count()} CPUs"
    )
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  {'best ms':>9}  {'GB/s':>7}  {'vs memcpy':>9}")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['best_s'] * 1e3:9.2f}  {r['gb_per_s']:7.2f}  {r['vs_memcpy']:8.0%}")

    if args.json:
        report = {
            "benchmark": "fusion pack+unpack, ResNet-50 gradient set",
            "tensors": len(shapes),
            "bytes_B": nbytes,
            "bytes_moved_per_row": moved,
            "repeat": args.repeat,
            "scale": args.scale,
            "implementation": fusion.IMPLEMENTATION,
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
