"""Build the optional native extension of ringtrain's fused buffers.

Package metadata lives in setup.cfg. This file only declares the C++ extension
``ringtrain.fusion._native``. If it cannot be built (no compiler, no headers),
the install still succeeds and ringtrain uses its pure-numpy twin, which gives
the same results, more slowly.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "ringtrain.fusion._native"


def _pybind11_include() -> list[str]:
    try:
        import pybind11
    except ImportError:  # the build falls back to the numpy twin
        return []
    return [pybind11.get_include()]


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the native extension cannot be built."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any build failure degrades to the twin
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing, bad headers, ...
            self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        bar = "*" * 78
        print(
            f"\n{bar}\nWARNING: ringtrain could not build its native extension {NATIVE}:\n"
            f"  {type(exc).__name__}: {exc}\n"
            "ringtrain will work, using the slower pure-numpy fused buffers.\n"
            "To build it, install a C++17 compiler (e.g. g++ or clang++) and run\n"
            "  pip install -e .   (or: python setup.py build_ext --inplace)\n"
            f"{bar}\n",
            file=sys.stderr,
        )


def _compile_args() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/std:c++17"]
    # No -march: wheels must run on any CPU of the target architecture. AVX2/F16C code is
    # confined to functions with target attributes, chosen at run time (native/convert.cpp).
    # -ffp-contract=off keeps a*b+c from becoming an FMA, whose single rounding would
    # break bit-identity with the numpy twin.
    return ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-pthread", "-ffp-contract=off"]


def _link_args() -> list[str]:
    if sys.platform == "win32":
        return []
    # shm_open lives in librt before glibc 2.34.
    return ["-pthread", "-lrt"] if sys.platform.startswith("linux") else ["-pthread"]


setup(
    ext_modules=[
        Extension(
            NATIVE,
            sources=["native/fusion.cpp", "native/convert.cpp", "native/shm.cpp"],
            depends=["native/arrays.h", "native/convert.h", "native/kernels.h", "native/shm.h"],
            include_dirs=_pybind11_include(),
            language="c++",
            extra_compile_args=_compile_args(),
            extra_link_args=_link_args(),
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
