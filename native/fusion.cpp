// Native kernels of ringtrain's fused buffers: module ringtrain.fusion._native.
//
// The Python face (ringtrain/fusion/__init__.py) validates every argument and
// hands this module only C-contiguous arrays of the right sizes and dtypes; the
// checks here are a second line of defence against memory errors, not the API.
//
// Results must be bit-identical to the numpy twin (ringtrain/fusion/_numpy.py):
//   * float32 -> float16 follows numpy's npy_floatbits_to_halfbits (round to
//     nearest even, subnormals kept, NaN payload truncated but kept non-zero);
//   * float32 -> bfloat16 follows ml_dtypes (round to nearest even, NaN becomes
//     sign | 0x7fc0);
//   * float16/bfloat16 -> float32 are exact widenings;
//   * scaling multiplies in float32 (float64 for float64 buffers) and rounds
//     once back to the element type;
//   * integers are averaged by floor division (rounding toward -inf).
// The conversions (convert.cpp) use AVX2/F16C where the CPU has them. The copy
// loops run with the GIL released and, above a size threshold, on a few
// std::threads. The shared-memory allreduce lives in shm.cpp.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "arrays.h"
#include "kernels.h"
#include "shm.h"

namespace py = pybind11;
using namespace ringtrain;

namespace {

// ------------------------------------------------------------------ scheduler

// Threads are used only when every thread gets at least this many bytes of
// output; below it, starting threads costs more than the copy saves. The
// default is one thread: on the 2-core machine this was measured on, one core
// already reaches memcpy bandwidth for float32 buckets, and a second thread
// changed the ResNet-50 pack+unpack time by -5%..+10% from run to run while
// taking a core from the training process. ringtrain.fusion raises the cap
// from RINGTRAIN_FUSION_THREADS where more memory channels make it pay.
size_t g_min_bytes_per_thread = size_t(4) << 20;
unsigned g_max_threads = 1;

unsigned thread_count(size_t total_dst_bytes) {
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const unsigned cap = std::min(hw, g_max_threads);
    if (cap <= 1 || g_min_bytes_per_thread == 0) {
        return std::max(1u, cap);
    }
    const size_t by_size = total_dst_bytes / g_min_bytes_per_thread;
    return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>(cap, by_size)));
}

// Runs the kernel over [begin, end), then fences its non-temporal stores.
void run_fenced(const std::vector<Segment>& segs, Kernel kernel, const Params& p, size_t src_unit,
                size_t dst_unit, size_t begin, size_t end) {
    run_range(segs, kernel, p, src_unit, dst_unit, begin, end);
    stream_fence();
}

void run_segments(const std::vector<Segment>& segs, Kernel kernel, const Params& p, size_t src_unit,
                  size_t dst_unit, size_t total) {
    if (total == 0) {
        return;
    }
    if (total * dst_unit >= kStreamBytes) {  // far beyond the cache: skip it
        if (kernel == k_bytes) kernel = k_bytes_stream;
        if (kernel == k_scale_f32) kernel = k_scale_f32_stream;
    }
    py::gil_scoped_release release;
    const unsigned n = thread_count(total * dst_unit);
    if (n <= 1) {
        run_fenced(segs, kernel, p, src_unit, dst_unit, 0, total);
        return;
    }
    // Equal element ranges, rounded to 64 elements so threads do not share
    // cache lines at their borders.
    std::vector<size_t> bounds(n + 1);
    for (unsigned t = 0; t <= n; ++t) {
        size_t b = total / n * t;
        b -= b % 64;
        bounds[t] = std::min(b, total);
    }
    bounds[n] = total;
    std::vector<std::thread> workers;
    workers.reserve(n - 1);
    for (unsigned t = 1; t < n; ++t) {
        workers.emplace_back(run_fenced, std::cref(segs), kernel, std::cref(p), src_unit, dst_unit, bounds[t],
                             bounds[t + 1]);
    }
    run_fenced(segs, kernel, p, src_unit, dst_unit, bounds[0], bounds[1]);
    for (auto& w : workers) {
        w.join();
    }
}

// ------------------------------------------------------------------- bindings

// Element kinds named by the Python face; "raw" means any dtype copied as bytes.
size_t kind_size(const std::string& kind) {
    if (kind == "f2" || kind == "bf16") return 2;
    if (kind == "f4" || kind == "i4") return 4;
    if (kind == "f8" || kind == "i8") return 8;
    if (kind == "raw") return 1;
    throw std::invalid_argument("unknown element kind '" + kind + "'");
}

void pack(const std::vector<py::array>& srcs, py::array dst, const std::string& compress) {
    Kernel kernel = k_bytes;
    size_t src_unit = 1;
    size_t dst_unit = 1;
    if (compress == "fp16" || compress == "bf16") {
        kernel = compress == "fp16" ? k_f32_to_f16 : k_f32_to_bf16;
        src_unit = 4;
        dst_unit = 2;
    } else if (!compress.empty()) {
        throw std::invalid_argument("unknown compression '" + compress + "'");
    }
    char* out = writable_data(dst, "pack destination");
    const size_t capacity = static_cast<size_t>(dst.nbytes()) / dst_unit;

    std::vector<Segment> segs;
    segs.reserve(srcs.size());
    size_t total = 0;
    for (const auto& a : srcs) {
        const char* in = contiguous_data(a, "pack source");
        if (src_unit != 1 && static_cast<size_t>(a.itemsize()) != src_unit) {
            throw std::invalid_argument("compressed pack needs float32 sources");
        }
        const size_t count = static_cast<size_t>(a.nbytes()) / src_unit;
        if (total + count > capacity) {
            throw std::invalid_argument("pack destination is too small");
        }
        if (count) {
            segs.push_back(Segment{in, out + total * dst_unit, count, total});
        }
        total += count;
    }
    run_segments(segs, kernel, Params{}, src_unit, dst_unit, total);
}

void unpack(py::array src, const std::vector<py::array>& dsts, const std::string& kind,
            const std::string& compress, double scale, int64_t divisor) {
    Params p;
    p.scale32 = static_cast<float>(scale);
    p.scale64 = scale;
    p.divisor = divisor;
    if (divisor < 1) {
        throw std::invalid_argument("divisor must be >= 1");
    }
    const bool unit = scale == 1.0 && divisor == 1;

    Kernel kernel = k_bytes;
    size_t src_unit = 1;
    size_t dst_unit = 1;
    if (compress == "fp16" || compress == "bf16") {
        const bool h = compress == "fp16";
        kernel = h ? k_f16_to_f32 : k_bf16_to_f32;  // widen, then * scale unless it is 1
        src_unit = 2;
        dst_unit = 4;
    } else if (!compress.empty()) {
        throw std::invalid_argument("unknown compression '" + compress + "'");
    } else if (!unit) {
        src_unit = dst_unit = kind_size(kind);
        if (kind == "f4") kernel = k_scale_f32;
        else if (kind == "f8") kernel = k_scale_f64;
        else if (kind == "f2") kernel = k_scale_f16;
        else if (kind == "bf16") kernel = k_scale_bf16;
        else if (kind == "i4") kernel = k_floor_div<int32_t>;
        else if (kind == "i8") kernel = k_floor_div<int64_t>;
        else throw std::invalid_argument("cannot scale elements of kind '" + kind + "'");
        if ((kind == "i4" || kind == "i8") && scale != 1.0) {
            throw std::invalid_argument("integer buffers are averaged with divisor, not scale");
        }
        if (kind[0] == 'f' || kind == "bf16") {
            if (divisor != 1) throw std::invalid_argument("float buffers are scaled with scale, not divisor");
        }
    }
    const char* in = contiguous_data(src, "unpack source");
    const size_t available = static_cast<size_t>(src.nbytes()) / src_unit;

    std::vector<Segment> segs;
    segs.reserve(dsts.size());
    size_t total = 0;
    for (auto a : dsts) {
        char* out = writable_data(a, "unpack destination");
        if (dst_unit != 1 && static_cast<size_t>(a.itemsize()) != dst_unit) {
            throw std::invalid_argument("unpack destination has the wrong itemsize");
        }
        const size_t count = static_cast<size_t>(a.nbytes()) / dst_unit;
        if (total + count > available) {
            throw std::invalid_argument("unpack source is too small");
        }
        if (count) {
            segs.push_back(Segment{in + total * src_unit, out, count, total});
        }
        total += count;
    }
    run_segments(segs, kernel, p, src_unit, dst_unit, total);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native kernels of ringtrain's fused buffers (use ringtrain.fusion, not this module).";
    m.def("pack", &pack, py::arg("srcs"), py::arg("dst"), py::arg("compress") = "",
          "Copy C-contiguous arrays back to back into dst; compress '' | 'fp16' | 'bf16'.");
    m.def("unpack", &unpack, py::arg("src"), py::arg("dsts"), py::arg("kind"), py::arg("compress") = "",
          py::arg("scale") = 1.0, py::arg("divisor") = 1,
          "Split src into the C-contiguous dsts, scaling floats or floor-dividing integers.");
    m.def(
        "set_threading",
        [](unsigned max_threads, size_t min_bytes_per_thread) {
            g_max_threads = std::max(1u, max_threads);
            g_min_bytes_per_thread = min_bytes_per_thread;
        },
        py::arg("max_threads"), py::arg("min_bytes_per_thread"),
        "Tune the copy threads: at most max_threads, each with at least min_bytes_per_thread of output.");
    m.def("get_threading", []() { return py::make_tuple(g_max_threads, g_min_bytes_per_thread); },
          "Return (max_threads, min_bytes_per_thread).");
    m.def("simd_path", &simd_path, "The conversion path in use: 'avx2+f16c' or 'scalar'.");
    m.def("set_simd", &set_simd, py::arg("enabled"),
          "False forces the scalar conversions (tests compare both); True restores the CPU's best.");
    m.def(
        "half_add",
        [](py::array a, py::array b, py::array out, const std::string& kind) {
            const size_t n = static_cast<size_t>(out.size());
            if (a.size() != out.size() || b.size() != out.size() || a.itemsize() != 2 || b.itemsize() != 2 ||
                out.itemsize() != 2) {
                throw std::invalid_argument("half_add needs three 16-bit arrays of one size");
            }
            const auto* x = reinterpret_cast<const uint16_t*>(contiguous_data(a, "a"));
            const auto* y = reinterpret_cast<const uint16_t*>(contiguous_data(b, "b"));
            auto* z = reinterpret_cast<uint16_t*>(writable_data(out, "out"));
            if (kind == "f2") {
                f16_add_n(x, y, z, n);
            } else if (kind == "bf16") {
                bf16_add_n(x, y, z, n);
            } else {
                throw std::invalid_argument("half_add kind must be 'f2' or 'bf16'");
            }
        },
        py::arg("a"), py::arg("b"), py::arg("out"), py::arg("kind"),
        "out = a + b for float16 ('f2') or bfloat16 ('bf16') bits, rounded once: the compressed sum.");
    register_shm(m);
}
