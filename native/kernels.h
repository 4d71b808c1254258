// Copy kernels of the fused buffers, shared by pack/unpack (fusion.cpp) and the
// shared-memory allreduce (shm.cpp).
//
// A kernel converts `count` elements from src to dst. A Segment maps one tensor
// onto a range of elements of a fused buffer; run_range applies a kernel to the
// parts of the segments that fall in one range of the fused buffer.

#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "convert.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ringtrain {

// Buffers at least this large are written with non-temporal stores (below).
constexpr size_t kStreamBytes = size_t(16) << 20;

// Copies and scales with non-temporal stores: outputs far larger than the cache are
// written without first reading each line in, a third less memory traffic than cached
// stores. glibc's memcpy does this only for single copies of many MiB, not for the
// tensor-sized pieces of a fused buffer. Values are the same as the plain loops'.
// Callers issue stream_fence() before other threads or processes read the output.
inline void stream_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

inline void stream_copy(const char* src, char* dst, size_t bytes) {
#if defined(__SSE2__)
    if (bytes < 256 || src == dst) {
        if (src != dst) std::memcpy(dst, src, bytes);
        return;
    }
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
    std::memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= bytes; i += 64) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
        const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    std::memcpy(dst + i, src + i, bytes - i);
#else
    if (src != dst) std::memcpy(dst, src, bytes);
#endif
}

struct Params {
    float scale32 = 1.0f;
    double scale64 = 1.0;
    int64_t divisor = 1;
};

using Kernel = void (*)(const char* src, char* dst, size_t count, const Params& p);

template <typename T>
inline T floor_div(T a, T n) {  // n > 0
    T q = a / n;
    if ((a % n) < 0) {
        --q;
    }
    return q;
}

inline void k_bytes(const char* src, char* dst, size_t count, const Params&) {
    if (src != dst) std::memcpy(dst, src, count);
}

inline void k_bytes_stream(const char* src, char* dst, size_t count, const Params&) {
    stream_copy(src, dst, count);
}

inline void k_scale_f32(const char* src, char* dst, size_t count, const Params& p) {
    const float* s = reinterpret_cast<const float*>(src);
    float* d = reinterpret_cast<float*>(dst);
    const float k = p.scale32;
    for (size_t i = 0; i < count; ++i) {
        d[i] = s[i] * k;
    }
}

// x * scale into 16-byte aligned non-temporal stores (float32: dst is 4-byte aligned,
// so at most 3 leading elements go the plain way).
inline void k_scale_f32_stream(const char* src, char* dst, size_t count, const Params& p) {
#if defined(__SSE2__)
    const float* s = reinterpret_cast<const float*>(src);
    float* d = reinterpret_cast<float*>(dst);
    const float k = p.scale32;
    size_t i = 0;
    while (i < count && (reinterpret_cast<uintptr_t>(d + i) & 15)) {
        d[i] = s[i] * k;
        ++i;
    }
    const __m128 kk = _mm_set1_ps(k);
    for (; i + 8 <= count; i += 8) {
        const __m128 a = _mm_mul_ps(_mm_loadu_ps(s + i), kk);
        const __m128 b = _mm_mul_ps(_mm_loadu_ps(s + i + 4), kk);
        _mm_stream_ps(d + i, a);
        _mm_stream_ps(d + i + 4, b);
    }
    for (; i < count; ++i) d[i] = s[i] * k;
#else
    k_scale_f32(src, dst, count, p);
#endif
}

inline void k_scale_f64(const char* src, char* dst, size_t count, const Params& p) {
    const double* s = reinterpret_cast<const double*>(src);
    double* d = reinterpret_cast<double*>(dst);
    const double k = p.scale64;
    for (size_t i = 0; i < count; ++i) {
        d[i] = s[i] * k;
    }
}

inline void k_scale_f16(const char* src, char* dst, size_t count, const Params& p) {
    f16_scale_n(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), count, p.scale32);
}

inline void k_scale_bf16(const char* src, char* dst, size_t count, const Params& p) {
    bf16_scale_n(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), count, p.scale32);
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

// float32 -> 16-bit float (compressed pack; scaled narrowing for half tensors widened to float32).
inline void k_f32_to_f16(const char* src, char* dst, size_t count, const Params& p) {
    f32_to_f16_n(reinterpret_cast<const float*>(src), reinterpret_cast<uint16_t*>(dst), count, p.scale32);
}

inline void k_f32_to_bf16(const char* src, char* dst, size_t count, const Params& p) {
    f32_to_bf16_n(reinterpret_cast<const float*>(src), reinterpret_cast<uint16_t*>(dst), count, p.scale32);
}

// 16-bit float -> float32, exact, then * scale (1: not applied).
inline void k_f16_to_f32(const char* src, char* dst, size_t count, const Params& p) {
    f16_to_f32_n(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<float*>(dst), count, p.scale32);
}

inline void k_bf16_to_f32(const char* src, char* dst, size_t count, const Params& p) {
    bf16_to_f32_n(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<float*>(dst), count, p.scale32);
}

// One tensor's slice of the fused buffer, in elements of the kernel's unit.
struct Segment {
    const char* src;
    char* dst;
    size_t count;
    size_t start;  // first element of this segment in the fused buffer
};

// Runs the kernel over elements [begin, end) of the fused buffer.
inline void run_range(const std::vector<Segment>& segs, Kernel kernel, const Params& p, size_t src_unit,
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

}  // namespace ringtrain
