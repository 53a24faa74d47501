// Philox4x32-10 (Salmon et al., SC'11; the Random123 / curand / Triton generator).
// docs/noise.md §2: one call per quad of 4 consecutive elements.
#pragma once

#include <stdint.h>

// Element math is written once and compiled by both the host compiler (CPU launcher) and
// nvcc (CUDA launcher).
#if defined(__CUDACC__)
#define NVRM_HD __host__ __device__ __forceinline__
#else
#define NVRM_HD inline __attribute__((always_inline))
#endif

namespace nvrm {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t x[4];
};

// The 64-bit product written as a widening multiply: GCC vectorizes it (vpmuludq) and nvcc
// turns it into mul.lo / mul.hi.
NVRM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

NVRM_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The words of quad j (elements 4j .. 4j+3) of parameter `key` at `step`:
// counter (lo32(j), hi32(j), key, step), Philox key (lo32(seed), hi32(seed)).
NVRM_HD PhiloxWords quad_words(uint64_t seed, uint32_t key, uint32_t step, uint64_t quad) {
  return philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), key, step,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace nvrm
