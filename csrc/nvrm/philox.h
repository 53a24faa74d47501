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

// Fixed-trip loops must be fully unrolled: GCC only vectorizes the CPU's quad loop across
// iterations when its body is straight-line code.
#if defined(__CUDA_ARCH__)
#define NVRM_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define NVRM_UNROLL  // nvcc's host pass: the element math never runs on the host there
#else
#define NVRM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace nvrm {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t x[4];
};

// hi:lo = a * b. On the GPU, the native mul.hi. On the host, the high word is assembled from
// 16-bit halves with 32-bit multiplies only, plain 32-bit lane operations that GCC vectorizes
// without the unpack/repack shuffles of a 64-bit product (measured 25% faster with AVX2).
NVRM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
#else
  const uint32_t a_lo = a & 0xffffu, a_hi = a >> 16, b_lo = b & 0xffffu, b_hi = b >> 16;
  const uint32_t middle = a_hi * b_lo + ((a_lo * b_lo) >> 16);  // < 2^32: no carry lost
  const uint32_t middle2 = a_lo * b_hi + (middle & 0xffffu);      // < 2^32
  hi = a_hi * b_hi + (middle >> 16) + (middle2 >> 16);
#endif
  lo = a * b;
}

#if !defined(__CUDACC__) && defined(__AVX2__)
// The CPU's AVX2 build runs the rounds on the counters of 8 quads at once. GCC cannot vectorize
// a 32x32->64 multiply without unpacking to 64-bit lanes and back (most of Philox's time);
// vpmuludq on the even and the odd lanes gives the high words with one blend.
typedef uint32_t WordsX8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) void mulhilo32(uint32_t a, WordsX8 b, WordsX8& hi,
                                                     WordsX8& lo) {
  typedef int Int32x8 __attribute__((vector_size(32)));
  typedef uint64_t Uint64x4 __attribute__((vector_size(32)));
  const WordsX8 a_vec = WordsX8{} + a;
  const WordsX8 even = reinterpret_cast<WordsX8>(__builtin_ia32_pmuludq256(
      reinterpret_cast<Int32x8>(a_vec), reinterpret_cast<Int32x8>(b)));
  const WordsX8 odd = reinterpret_cast<WordsX8>(__builtin_ia32_pmuludq256(
      reinterpret_cast<Int32x8>(a_vec),
      reinterpret_cast<Int32x8>(reinterpret_cast<Uint64x4>(b) >> 32)));
  hi = __builtin_shuffle(even, odd, WordsX8{1, 9, 3, 11, 5, 13, 7, 15});
  lo = b * a;
}
#endif

// The key of round r of one Philox call: (k0 + r*W0, k1 + r*W1) mod 2^32, here computed from
// (k0, k1); PhiloxRoundKeys holds the same values precomputed.
struct PhiloxKey {
  uint32_t k0, k1;
  NVRM_HD uint32_t round0(int round) const { return k0 + static_cast<uint32_t>(round) * kPhiloxW0; }
  NVRM_HD uint32_t round1(int round) const { return k1 + static_cast<uint32_t>(round) * kPhiloxW1; }
};

// The round keys of a seed, computed once per launch: a CUDA kernel parameter, so every round's
// key is a constant-bank operand of the xor instead of two additions per Philox call.
struct PhiloxRoundKeys {
  uint32_t k0[10], k1[10];
  NVRM_HD uint32_t round0(int round) const { return k0[round]; }
  NVRM_HD uint32_t round1(int round) const { return k1[round]; }
};

NVRM_HD PhiloxKey seed_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

inline PhiloxRoundKeys round_keys(uint64_t seed) {
  const PhiloxKey key = seed_key(seed);
  PhiloxRoundKeys keys;
  for (int round = 0; round < 10; ++round) {
    keys.k0[round] = key.round0(round);
    keys.k1[round] = key.round1(round);
  }
  return keys;
}

// Ten rounds on counter words c0..c3 (uint32_t, or the CPU's WordsX8 for 8 quads at once).
template <typename Word, class Keys>
NVRM_HD void philox_rounds(Word& c0, Word& c1, Word& c2, Word& c3, const Keys& keys) {
  NVRM_UNROLL
  for (int round = 0; round < 10; ++round) {
    Word hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ keys.round0(round);
    c2 = hi0 ^ c3 ^ keys.round1(round);
    c1 = lo1;
    c3 = lo0;
  }
}

template <typename Word>
NVRM_HD void philox_rounds(Word& c0, Word& c1, Word& c2, Word& c3, uint32_t k0, uint32_t k1) {
  philox_rounds(c0, c1, c2, c3, PhiloxKey{k0, k1});
}

template <class Keys>
NVRM_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  const Keys& keys) {
  philox_rounds(c0, c1, c2, c3, keys);
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The words of quad j (elements 4j .. 4j+3) of parameter `key` at `step`:
// counter (lo32(j), hi32(j), key, step), Philox key (lo32(seed), hi32(seed)).
// Keys: PhiloxKey or PhiloxRoundKeys of the seed.
template <class Keys>
NVRM_HD PhiloxWords quad_words(const Keys& keys, uint32_t key, uint32_t step, uint64_t quad) {
  return philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), key, step,
                       keys);
}

NVRM_HD PhiloxWords quad_words(uint64_t seed, uint32_t key, uint32_t step, uint64_t quad) {
  return quad_words(seed_key(seed), key, step, quad);
}

}  // namespace nvrm
