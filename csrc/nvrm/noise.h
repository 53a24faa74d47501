// The noise kernels of docs/noise.md §3-§6, in float32, bit-exact across CPU, CUDA and Triton:
// every fma is explicit, nothing else may be contracted (host: -ffp-contract=off, nvcc:
// --fmad=false), sqrt is correctly rounded.
#pragma once

#include <math.h>
#include <string.h>

#include "philox.h"

namespace nvrm {

enum NoiseType : int { kGaussian = 0, kLaplace = 1, kUniform = 2 };

NVRM_HD float fma32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

NVRM_HD float sqrt32(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

NVRM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

NVRM_HD float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// §3: the 24 high bits, forced odd, times 2^-24. Converted through int32 (the value is below
// 2^24, so exact) because x86 has no vector uint32 -> float conversion.
NVRM_HD float uniform_from_bits(uint32_t x) {
  return static_cast<float>(static_cast<int32_t>((x >> 8) | 1u)) * 0x1p-24f;
}

// §6 log_f32: Cephes logf for normal x > 0.
NVRM_HD float log_f32(float x) {
  const uint32_t bits = float_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126);
  float m = bits_float((bits & 0x807fffffu) | 0x3f000000u);  // m in [0.5, 1)
  // Branch-free so that the CPU loop vectorizes; the selects are exact.
  const bool below_sqrt_half = m < 0x1.6a09e6p-1f;
  e = below_sqrt_half ? e - 1.0f : e;
  m = below_sqrt_half ? (m + m) - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 0x1.204376p-4f;
  p = fma32(p, m, -0x1.d7a370p-4f);
  p = fma32(p, m, 0x1.de4a34p-4f);
  p = fma32(p, m, -0x1.fcba9ep-4f);
  p = fma32(p, m, 0x1.23d37ep-3f);
  p = fma32(p, m, -0x1.555ca0p-3f);
  p = fma32(p, m, 0x1.999d58p-3f);
  p = fma32(p, m, -0x1.fffff8p-3f);
  p = fma32(p, m, 0x1.555554p-2f);
  float y = (p * m) * z;
  y = fma32(e, -0x1.bd0106p-13f, y);
  y = fma32(-0.5f, z, y);
  float r = m + y;
  r = fma32(e, 0x1.630000p-1f, r);
  return r;
}

struct SinCos {
  float sin;
  float cos;
};

// §6 sincos_2pi_f32: sin and cos of 2*pi*u for u in (0, 1), range-reduced exactly in u.
NVRM_HD SinCos sincos_2pi_f32(float u) {
  const float t = 4.0f * u;
  // floor(t + 0.5) for t + 0.5 > 0 is the truncation (no libm floor, vectorizes).
  const int32_t quadrant = static_cast<int32_t>(t + 0.5f);
  const float r = t - static_cast<float>(quadrant);
  const float r2 = r * r;
  float s = fma32(fma32(fma32(fma32(0x1.507834p-13f, r2, -0x1.32d2ccp-8f), r2, 0x1.466bc6p-4f), r2,
                        -0x1.4abbcep-1f),
                  r2, 0x1.921fb6p+0f);
  s = r * s;
  const float c = fma32(
      fma32(fma32(fma32(fma32(-0x1.a6d1f2p-16f, r2, 0x1.e1f506p-11f), r2, -0x1.55d3c8p-6f), r2,
                  0x1.03c1f0p-2f),
            r2, -0x1.3bd3ccp+0f),
      r2, 1.0f);
  // Quadrants 0..3: (s, c), (c, -s), (-s, -c), (-c, s). Negation is the sign bit flipped, set
  // from the quadrant's bits without a compare (sin: quadrants 2, 3; cos: quadrants 1, 2).
  const bool swap = (quadrant & 1) != 0;
  const uint32_t sin_sign = static_cast<uint32_t>(quadrant & 2) << 30;
  const uint32_t cos_sign = static_cast<uint32_t>((quadrant + 1) & 2) << 30;
  const float sin_abs = swap ? c : s;
  const float cos_abs = swap ? s : c;
  return SinCos{bits_float(float_bits(sin_abs) ^ sin_sign), bits_float(float_bits(cos_abs) ^ cos_sign)};
}

// Unit-scale noise z of the four lanes of one Philox call (§4, §6).
template <int Type>
NVRM_HD void unit_noise(const PhiloxWords& words, float z[4]) {
  float u[4];
  NVRM_UNROLL
  for (int lane = 0; lane < 4; ++lane) u[lane] = uniform_from_bits(words.x[lane]);
  if (Type == kGaussian) {
    NVRM_UNROLL
    for (int pair = 0; pair < 4; pair += 2) {
      const float radius = sqrt32(-2.0f * log_f32(u[pair]));
      const SinCos angle = sincos_2pi_f32(u[pair + 1]);
      z[pair] = radius * angle.cos;
      z[pair + 1] = radius * angle.sin;
    }
  } else if (Type == kLaplace) {
    NVRM_UNROLL
  for (int lane = 0; lane < 4; ++lane) {
      const float complement = 1.0f - u[lane];
      const float w = 2.0f * (u[lane] < complement ? u[lane] : complement);
      const float l = log_f32(w);
      z[lane] = u[lane] < 0.5f ? l : -l;
    }
  } else {
    NVRM_UNROLL
  for (int lane = 0; lane < 4; ++lane) z[lane] = 2.0f * u[lane] - 1.0f;
  }
}

// §5: the noise of the four lanes of one Philox call, one float32 multiplication by the scale,
// as Real: float32, or widened exactly to float64 for float64 parameters (§7).
template <int Type, typename Real>
NVRM_HD void noise_from_words(const PhiloxWords& words, float scale, Real noise[4]) {
  float z[4];
  unit_noise<Type>(words, z);
  NVRM_UNROLL
  for (int lane = 0; lane < 4; ++lane) noise[lane] = static_cast<Real>(scale * z[lane]);
}

// The noise of elements 4*quad .. 4*quad+3 of parameter `key` at `step`; keys: the seed's
// PhiloxKey or PhiloxRoundKeys. step must be nonzero: step 0 means "no noise".
template <int Type, class Keys, typename Real>
NVRM_HD void noise_quad(const Keys& keys, uint32_t key, uint32_t step, float scale, uint64_t quad,
                        Real noise[4]) {
  noise_from_words<Type>(quad_words(keys, key, step, quad), scale, noise);
}

// Same, with the type chosen at run time (uniform across a CUDA block, so no divergence).
template <class Keys, typename Real>
NVRM_HD void noise_quad(int type, const Keys& keys, uint32_t key, uint32_t step, float scale,
                        uint64_t quad, Real noise[4]) {
  if (type == kGaussian) {
    noise_quad<kGaussian>(keys, key, step, scale, quad, noise);
  } else if (type == kLaplace) {
    noise_quad<kLaplace>(keys, key, step, scale, quad, noise);
  } else {
    noise_quad<kUniform>(keys, key, step, scale, quad, noise);
  }
}

}  // namespace nvrm
