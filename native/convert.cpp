// Array conversions of convert.h: a scalar reference and an AVX2/F16C path chosen at run time.
//
// The module is compiled for the baseline ISA (no -march), so only the functions
// marked RT_AVX2 use AVX2/F16C instructions, and they run only after the CPU was
// seen to support them. Both paths give identical bits; tests compare them on
// every 16-bit pattern and a wide sweep of float32 patterns.

#include "convert.h"

#include <atomic>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RT_HAVE_X86_SIMD 1
#include <immintrin.h>
#define RT_AVX2 __attribute__((target("avx2,f16c")))
#else
#define RT_HAVE_X86_SIMD 0
#endif

namespace ringtrain {
namespace {

// ------------------------------------------------------------------ scalar

void f32_to_f16_scalar(const float* s, uint16_t* d, size_t n, float scale) {
    if (scale == 1.0f) {
        for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(s[i]);
    } else {
        for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(s[i] * scale);
    }
}

void f32_to_bf16_scalar(const float* s, uint16_t* d, size_t n, float scale) {
    if (scale == 1.0f) {
        for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
    } else {
        for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i] * scale);
    }
}

void f16_to_f32_scalar(const uint16_t* s, float* d, size_t n, float scale) {
    if (scale == 1.0f) {
        for (size_t i = 0; i < n; ++i) d[i] = f16_to_f32(s[i]);
    } else {
        for (size_t i = 0; i < n; ++i) d[i] = f16_to_f32(s[i]) * scale;
    }
}

void bf16_to_f32_scalar(const uint16_t* s, float* d, size_t n, float scale) {
    if (scale == 1.0f) {
        for (size_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
    } else {
        for (size_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]) * scale;
    }
}

void f16_scale_scalar(const uint16_t* s, uint16_t* d, size_t n, float scale) {
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(f16_to_f32(s[i]) * scale);
}

void bf16_scale_scalar(const uint16_t* s, uint16_t* d, size_t n, float scale) {
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(bf16_to_f32(s[i]) * scale);
}

void f16_add_scalar(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n) {
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(f16_to_f32(a[i]) + f16_to_f32(b[i]));
}

void bf16_add_scalar(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n) {
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

// ------------------------------------------------------------------- AVX2

#if RT_HAVE_X86_SIMD

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// Lanes of 8 halves that are NaN: the hardware would quiet them, numpy does not.
RT_AVX2 inline bool any_f16_nan(__m128i h) {
    const __m128i mag = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
    return _mm_movemask_epi8(_mm_cmpgt_epi16(mag, _mm_set1_epi16(0x7c00))) != 0;
}

RT_AVX2 inline bool any_f32_nan(__m256 x) {
    return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0;
}

RT_AVX2 void f32_to_f16_avx2(const float* s, uint16_t* d, size_t n, float scale) {
    const bool scaled = scale != 1.0f;
    const __m256 k = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(s + i);
        if (any_f32_nan(x)) {
            f32_to_f16_scalar(s + i, d + i, 8, scale);
            continue;
        }
        if (scaled) x = _mm256_mul_ps(x, k);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(x, kRound));
    }
    f32_to_f16_scalar(s + i, d + i, n - i, scale);
}

RT_AVX2 void f16_to_f32_avx2(const uint16_t* s, float* d, size_t n, float scale) {
    const bool scaled = scale != 1.0f;
    const __m256 k = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        if (any_f16_nan(h)) {
            f16_to_f32_scalar(s + i, d + i, 8, scale);
            continue;
        }
        __m256 x = _mm256_cvtph_ps(h);
        if (scaled) x = _mm256_mul_ps(x, k);
        _mm256_storeu_ps(d + i, x);
    }
    f16_to_f32_scalar(s + i, d + i, n - i, scale);
}

RT_AVX2 void f16_scale_avx2(const uint16_t* s, uint16_t* d, size_t n, float scale) {
    const __m256 k = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        if (any_f16_nan(h)) {
            f16_scale_scalar(s + i, d + i, 8, scale);
            continue;
        }
        const __m256 x = _mm256_mul_ps(_mm256_cvtph_ps(h), k);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(x, kRound));
    }
    f16_scale_scalar(s + i, d + i, n - i, scale);
}

RT_AVX2 void f16_add_avx2(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i ha = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
        const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
        if (any_f16_nan(ha) || any_f16_nan(hb)) {
            f16_add_scalar(a + i, b + i, d + i, 8);
            continue;
        }
        const __m256 x = _mm256_add_ps(_mm256_cvtph_ps(ha), _mm256_cvtph_ps(hb));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(x, kRound));
    }
    f16_add_scalar(a + i, b + i, d + i, n - i);
}

// bfloat16 needs no F16C: widening is a shift, narrowing is integer rounding,
// and NaN lanes are patched with a blend, so no block falls back to scalar.
RT_AVX2 inline __m256 bf16x8_to_f32(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 float32 -> 8 bfloat16 in the low 16 bits of each 32-bit lane.
RT_AVX2 inline __m256i f32x8_to_bf16_lanes(__m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
    const __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x8000));
    const __m256i quiet = _mm256_or_si256(sign, _mm256_set1_epi32(0x7fc0));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

// Two vectors of 8 lanes -> 16 packed bfloat16 stored at d.
RT_AVX2 inline void store_bf16x16(uint16_t* d, __m256i lo, __m256i hi) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), packed);
}

RT_AVX2 void f32_to_bf16_avx2(const float* s, uint16_t* d, size_t n, float scale) {
    const bool scaled = scale != 1.0f;
    const __m256 k = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 x0 = _mm256_loadu_ps(s + i);
        __m256 x1 = _mm256_loadu_ps(s + i + 8);
        if (scaled) {
            x0 = _mm256_mul_ps(x0, k);
            x1 = _mm256_mul_ps(x1, k);
        }
        store_bf16x16(d + i, f32x8_to_bf16_lanes(x0), f32x8_to_bf16_lanes(x1));
    }
    f32_to_bf16_scalar(s + i, d + i, n - i, scale);
}

RT_AVX2 void bf16_to_f32_avx2(const uint16_t* s, float* d, size_t n, float scale) {
    const bool scaled = scale != 1.0f;
    const __m256 k = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = bf16x8_to_f32(s + i);
        if (scaled) x = _mm256_mul_ps(x, k);
        _mm256_storeu_ps(d + i, x);
    }
    bf16_to_f32_scalar(s + i, d + i, n - i, scale);
}

RT_AVX2 void bf16_scale_avx2(const uint16_t* s, uint16_t* d, size_t n, float scale) {
    const __m256 k = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 x0 = _mm256_mul_ps(bf16x8_to_f32(s + i), k);
        const __m256 x1 = _mm256_mul_ps(bf16x8_to_f32(s + i + 8), k);
        store_bf16x16(d + i, f32x8_to_bf16_lanes(x0), f32x8_to_bf16_lanes(x1));
    }
    bf16_scale_scalar(s + i, d + i, n - i, scale);
}

RT_AVX2 void bf16_add_avx2(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 x0 = _mm256_add_ps(bf16x8_to_f32(a + i), bf16x8_to_f32(b + i));
        const __m256 x1 = _mm256_add_ps(bf16x8_to_f32(a + i + 8), bf16x8_to_f32(b + i + 8));
        store_bf16x16(d + i, f32x8_to_bf16_lanes(x0), f32x8_to_bf16_lanes(x1));
    }
    bf16_add_scalar(a + i, b + i, d + i, n - i);
}

bool cpu_has_avx2_f16c() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

#else  // no x86 SIMD in this build: the scalar loops serve every CPU

bool cpu_has_avx2_f16c() { return false; }

#endif

const bool kCpuHasSimd = cpu_has_avx2_f16c();
std::atomic<bool> g_simd{kCpuHasSimd};

inline bool use_simd() { return g_simd.load(std::memory_order_relaxed); }

}  // namespace

#if RT_HAVE_X86_SIMD
#define RT_DISPATCH(name, ...)                 \
    do {                                       \
        if (use_simd()) {                      \
            name##_avx2(__VA_ARGS__);          \
        } else {                               \
            name##_scalar(__VA_ARGS__);        \
        }                                      \
    } while (0)
#else
#define RT_DISPATCH(name, ...) name##_scalar(__VA_ARGS__)
#endif

void f32_to_f16_n(const float* s, uint16_t* d, size_t n, float scale) { RT_DISPATCH(f32_to_f16, s, d, n, scale); }
void f32_to_bf16_n(const float* s, uint16_t* d, size_t n, float scale) {
    RT_DISPATCH(f32_to_bf16, s, d, n, scale);
}
void f16_to_f32_n(const uint16_t* s, float* d, size_t n, float scale) { RT_DISPATCH(f16_to_f32, s, d, n, scale); }
void bf16_to_f32_n(const uint16_t* s, float* d, size_t n, float scale) {
    RT_DISPATCH(bf16_to_f32, s, d, n, scale);
}
void f16_scale_n(const uint16_t* s, uint16_t* d, size_t n, float scale) { RT_DISPATCH(f16_scale, s, d, n, scale); }
void bf16_scale_n(const uint16_t* s, uint16_t* d, size_t n, float scale) {
    RT_DISPATCH(bf16_scale, s, d, n, scale);
}
void f16_add_n(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n) { RT_DISPATCH(f16_add, a, b, d, n); }
void bf16_add_n(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n) { RT_DISPATCH(bf16_add, a, b, d, n); }

const char* simd_path() { return use_simd() ? "avx2+f16c" : "scalar"; }

void set_simd(bool enabled) { g_simd.store(enabled && kCpuHasSimd, std::memory_order_relaxed); }

}  // namespace ringtrain
