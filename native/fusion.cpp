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
// The copy loops run with the GIL released and, above a size threshold, on a few
// std::threads.

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

namespace py = pybind11;

namespace {

// ---------------------------------------------------------------- conversions

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// float32 -> float16 bits, the same algorithm numpy uses for astype(float16).
inline uint16_t f32_to_f16(float value) {
    const uint32_t f = float_bits(value);
    const uint16_t h_sgn = static_cast<uint16_t>((f & 0x80000000u) >> 16);
    uint32_t f_exp = f & 0x7f800000u;
    uint32_t f_sig;

    if (f_exp >= 0x47800000u) {  // overflow, inf or NaN
        if (f_exp == 0x7f800000u) {
            f_sig = f & 0x007fffffu;
            if (f_sig != 0) {  // NaN: keep the top payload bits, never turn into inf
                uint16_t ret = static_cast<uint16_t>(0x7c00u + (f_sig >> 13));
                if (ret == 0x7c00u) {
                    ++ret;
                }
                return static_cast<uint16_t>(h_sgn + ret);
            }
        }
        return static_cast<uint16_t>(h_sgn + 0x7c00u);
    }
    if (f_exp <= 0x38000000u) {  // subnormal half or zero
        if (f_exp < 0x33000000u) {
            return h_sgn;
        }
        f_exp >>= 23;
        f_sig = 0x00800000u + (f & 0x007fffffu);
        f_sig >>= (113 - f_exp);
        // Ties to even: the shift may have dropped up to 11 low bits, so look
        // at them in the original word as well.
        if (((f_sig & 0x00003fffu) != 0x00001000u) || (f & 0x000007ffu)) {
            f_sig += 0x00001000u;
        }
        return static_cast<uint16_t>(h_sgn + (f_sig >> 13));
    }
    const uint32_t h_exp = (f_exp - 0x38000000u) >> 13;
    f_sig = f & 0x007fffffu;
    if ((f_sig & 0x00003fffu) != 0x00001000u) {
        f_sig += 0x00001000u;
    }
    // A carry out of the significand bumps the exponent, possibly to inf.
    return static_cast<uint16_t>(h_sgn + (f_sig >> 13) + h_exp);
}

// float16 bits -> float32, exact (numpy's npy_halfbits_to_floatbits).
inline float f16_to_f32(uint16_t h) {
    const uint32_t f_sgn = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint16_t h_exp = h & 0x7c00u;
    if (h_exp == 0x0000u) {
        uint16_t h_sig = h & 0x03ffu;
        if (h_sig == 0) {
            return bits_float(f_sgn);
        }
        // Subnormal: normalise the significand.
        h_sig <<= 1;
        uint32_t shift = 0;
        while ((h_sig & 0x0400u) == 0) {
            h_sig <<= 1;
            ++shift;
        }
        const uint32_t f_exp = (127 - 15 - shift) << 23;
        const uint32_t f_sig = static_cast<uint32_t>(h_sig & 0x03ffu) << 13;
        return bits_float(f_sgn + f_exp + f_sig);
    }
    if (h_exp == 0x7c00u) {  // inf or NaN, payload kept
        return bits_float(f_sgn + 0x7f800000u + (static_cast<uint32_t>(h & 0x03ffu) << 13));
    }
    return bits_float(f_sgn + ((static_cast<uint32_t>(h & 0x7fffu) + 0x1c000u) << 13));
}

// float32 -> bfloat16 bits, round to nearest even (as ml_dtypes does).
inline uint16_t f32_to_bf16(float value) {
    const uint32_t f = float_bits(value);
    if ((f & 0x7fffffffu) > 0x7f800000u) {  // NaN
        return static_cast<uint16_t>((f & 0x80000000u) ? 0xffc0u : 0x7fc0u);
    }
    const uint32_t lsb = (f >> 16) & 1u;
    return static_cast<uint16_t>((f + 0x7fffu + lsb) >> 16);
}

inline float bf16_to_f32(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

template <typename T>
inline T floor_div(T a, T n) {  // n > 0
    T q = a / n;
    if ((a % n) < 0) {
        --q;
    }
    return q;
}

// -------------------------------------------------------------------- kernels
// Each kernel converts `count` elements from src to dst; the dispatch below
// chooses one per call so the inner loops stay branch-free and vectorisable.

struct Params {
    float scale32 = 1.0f;
    double scale64 = 1.0;
    int64_t divisor = 1;
};

using Kernel = void (*)(const char* src, char* dst, size_t count, const Params& p);

void k_bytes(const char* src, char* dst, size_t count, const Params&) { std::memcpy(dst, src, count); }

void k_scale_f32(const char* src, char* dst, size_t count, const Params& p) {
    const float* s = reinterpret_cast<const float*>(src);
    float* d = reinterpret_cast<float*>(dst);
    const float k = p.scale32;
    for (size_t i = 0; i < count; ++i) {
        d[i] = s[i] * k;
    }
}

void k_scale_f64(const char* src, char* dst, size_t count, const Params& p) {
    const double* s = reinterpret_cast<const double*>(src);
    double* d = reinterpret_cast<double*>(dst);
    const double k = p.scale64;
    for (size_t i = 0; i < count; ++i) {
        d[i] = s[i] * k;
    }
}

void k_scale_f16(const char* src, char* dst, size_t count, const Params& p) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (size_t i = 0; i < count; ++i) {
        d[i] = f32_to_f16(f16_to_f32(s[i]) * p.scale32);
    }
}

void k_scale_bf16(const char* src, char* dst, size_t count, const Params& p) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (size_t i = 0; i < count; ++i) {
        d[i] = f32_to_bf16(bf16_to_f32(s[i]) * p.scale32);
    }
}

template <typename T>
void k_floor_div(const char* src, char* dst, size_t count, const Params& p) {
    const T* s = reinterpret_cast<const T*>(src);
    T* d = reinterpret_cast<T*>(dst);
    const T n = static_cast<T>(p.divisor);
    for (size_t i = 0; i < count; ++i) {
        d[i] = floor_div<T>(s[i], n);
    }
}

void k_f32_to_f16(const char* src, char* dst, size_t count, const Params&) {
    const float* s = reinterpret_cast<const float*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (size_t i = 0; i < count; ++i) {
        d[i] = f32_to_f16(s[i]);
    }
}

void k_f32_to_bf16(const char* src, char* dst, size_t count, const Params&) {
    const float* s = reinterpret_cast<const float*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (size_t i = 0; i < count; ++i) {
        d[i] = f32_to_bf16(s[i]);
    }
}

void k_f16_to_f32(const char* src, char* dst, size_t count, const Params& p) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    float* d = reinterpret_cast<float*>(dst);
    for (size_t i = 0; i < count; ++i) {
        d[i] = f16_to_f32(s[i]);
    }
    (void)p;
}

void k_f16_to_f32_scaled(const char* src, char* dst, size_t count, const Params& p) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    float* d = reinterpret_cast<float*>(dst);
    const float k = p.scale32;
    for (size_t i = 0; i < count; ++i) {
        d[i] = f16_to_f32(s[i]) * k;
    }
}

void k_bf16_to_f32(const char* src, char* dst, size_t count, const Params&) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    float* d = reinterpret_cast<float*>(dst);
    for (size_t i = 0; i < count; ++i) {
        d[i] = bf16_to_f32(s[i]);
    }
}

void k_bf16_to_f32_scaled(const char* src, char* dst, size_t count, const Params& p) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    float* d = reinterpret_cast<float*>(dst);
    const float k = p.scale32;
    for (size_t i = 0; i < count; ++i) {
        d[i] = bf16_to_f32(s[i]) * k;
    }
}

// ------------------------------------------------------------------ scheduler

// One tensor's slice of the fused buffer, in elements of the kernel's unit.
struct Segment {
    const char* src;
    char* dst;
    size_t count;
    size_t start;  // first element of this segment in the fused buffer
};

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

// Runs the kernel over elements [begin, end) of the fused buffer.
void run_range(const std::vector<Segment>& segs, Kernel kernel, const Params& p, size_t src_unit,
               size_t dst_unit, size_t begin, size_t end) {
    // First segment that ends after `begin`.
    auto it = std::upper_bound(segs.begin(), segs.end(), begin,
                               [](size_t value, const Segment& s) { return value < s.start + s.count; });
    for (; it != segs.end() && it->start < end; ++it) {
        const size_t lo = std::max(begin, it->start);
        const size_t hi = std::min(end, it->start + it->count);
        if (hi <= lo) {
            continue;
        }
        const size_t off = lo - it->start;
        kernel(it->src + off * src_unit, it->dst + off * dst_unit, hi - lo, p);
    }
}

void run_segments(const std::vector<Segment>& segs, Kernel kernel, const Params& p, size_t src_unit,
                  size_t dst_unit, size_t total) {
    if (total == 0) {
        return;
    }
    py::gil_scoped_release release;
    const unsigned n = thread_count(total * dst_unit);
    if (n <= 1) {
        run_range(segs, kernel, p, src_unit, dst_unit, 0, total);
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
        workers.emplace_back(run_range, std::cref(segs), kernel, std::cref(p), src_unit, dst_unit, bounds[t],
                             bounds[t + 1]);
    }
    run_range(segs, kernel, p, src_unit, dst_unit, bounds[0], bounds[1]);
    for (auto& w : workers) {
        w.join();
    }
}

// ------------------------------------------------------------------- bindings

const char* contiguous_data(const py::array& a, const char* what) {
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string(what) + " must be C-contiguous");
    }
    return static_cast<const char*>(a.data());
}

char* writable_data(py::array& a, const char* what) {
    contiguous_data(a, what);
    if (!a.writeable()) {
        throw std::invalid_argument(std::string(what) + " must be writable");
    }
    return static_cast<char*>(a.mutable_data());
}

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
        kernel = unit ? (h ? k_f16_to_f32 : k_bf16_to_f32) : (h ? k_f16_to_f32_scaled : k_bf16_to_f32_scaled);
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
}
