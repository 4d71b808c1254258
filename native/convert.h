// Element conversions shared by the fused-buffer kernels (fusion.cpp) and the
// shared-memory allreduce (shm.cpp).
//
// Scalar functions are the reference: they match numpy / ml_dtypes bit for bit
// (see fusion.cpp's header comment). The array functions compute the same bits
// and use AVX2/F16C when the CPU has them (checked once at run time; the build
// itself targets the baseline ISA, so the module loads on any x86-64), falling
// back to the scalar loops on other CPUs. Blocks holding a NaN take the scalar
// path, because the hardware quiets signalling NaNs where numpy keeps the bits.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ringtrain {

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

// ------------------------------------------------------------ array functions
// n elements each; src and dst may be the same array (never partly overlapping).
// "scaled" variants multiply in float32 by `scale` (a scale of exactly 1 is not
// applied, so NaN payloads pass unchanged, as numpy's cast alone would).

// float32 -> 16-bit float, x * scale rounded once.
void f32_to_f16_n(const float* s, uint16_t* d, size_t n, float scale);
void f32_to_bf16_n(const float* s, uint16_t* d, size_t n, float scale);
// 16-bit float -> float32, exact widening, then * scale.
void f16_to_f32_n(const uint16_t* s, float* d, size_t n, float scale);
void bf16_to_f32_n(const uint16_t* s, float* d, size_t n, float scale);
// 16-bit float -> 16-bit float: widen, * scale in float32, round once.
void f16_scale_n(const uint16_t* s, uint16_t* d, size_t n, float scale);
void bf16_scale_n(const uint16_t* s, uint16_t* d, size_t n, float scale);
// d = a + b in 16-bit floats, computed in float32 and rounded once (numpy's float16
// add, ml_dtypes' bfloat16 add); d may be a or b.
void f16_add_n(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n);
void bf16_add_n(const uint16_t* a, const uint16_t* b, uint16_t* d, size_t n);

// Which path the array functions take: "avx2+f16c" or "scalar".
const char* simd_path();
// Tests force the scalar path (false) to compare both; true restores the CPU's best.
void set_simd(bool enabled);

}  // namespace ringtrain
