// CPU launcher: runs a range of block_table rows on the calling thread. Which thread runs which
// rows, the GradScaler skip and the counter commit are csrc/api.cpp's (nvrm_cpu_launch).
//
// This file only indexes, loads and stores; the element math is csrc/nvrm/{philox,noise,update}.h.
// It is compiled twice (see setup.py): once for baseline x86-64 and once with AVX2+FMA+F16C, each
// defining NVRM_CPU_LAUNCH to its own name; api.cpp picks one at run time. fma is exact and
// nothing is contracted (-ffp-contract=off), so both give the same bits.
//
// Per chunk of a block, the noise is staged in small stack buffers: the Philox words of its
// quads (8 quads per AVX2 vector, see philox.h), then their transforms (a loop over quads), then
// the update runs as a plain loop over elements. Each loop is specialized on the row's op,
// flags and noise types by templates, so its body is branch-free and GCC vectorizes it.
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#include "../nvrm/update.h"

#ifndef NVRM_CPU_LAUNCH
#error "NVRM_CPU_LAUNCH must name this variant's entry point"
#endif

namespace nvrm {
namespace cpu {
namespace {

// Elements whose noise is staged at once: 4 KiB of float32 (8 of float64), stays in L1 between
// the two loops.
constexpr int64_t kChunk = 1024;

// Storage types: load converts to the update's arithmetic type Math (float32, float64 for
// float64 parameters), store rounds once to nearest even.
struct Float32 {
  using Stored = float;
  using Math = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

struct Float64 {
  using Stored = double;
  using Math = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};

struct Float16 {
  using Stored = _Float16;
  using Math = float;
  static float load(_Float16 x) { return static_cast<float>(x); }
  static _Float16 store(float x) { return static_cast<_Float16>(x); }
};

struct BFloat16 {
  using Stored = uint16_t;
  using Math = float;
  static float load(uint16_t x) { return bits_float(static_cast<uint32_t>(x) << 16); }
  static uint16_t store(float x) {
    const uint32_t bits = float_bits(x);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(x != x ? 0x7fc0u : rounded);  // keep NaN a quiet NaN
  }
};

template <typename Storage>
typename Storage::Stored* address(int64_t a) {
  return reinterpret_cast<typename Storage::Stored*>(a);
}

template <class F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <class F>
void with_noise_type(int type, F&& f) {
  if (type == kGaussian) {
    f(std::integral_constant<int, kGaussian>{});
  } else if (type == kLaplace) {
    f(std::integral_constant<int, kLaplace>{});
  } else {
    f(std::integral_constant<int, kUniform>{});
  }
}

// The Philox words of quads first_quad .. first_quad + quads - 1, lane-major (words[lane][q]),
// so that the transform loop below reads each lane contiguously.
void philox_words(uint32_t (*words)[kChunk / 4], uint64_t seed, uint32_t key, uint32_t step,
                  uint64_t first_quad, int64_t quads) {
#if defined(__AVX2__)
  // 8 quads per vector; up to 7 quads past the end are computed and ignored (words has room).
  static_assert((kChunk / 4) % 8 == 0, "chunks must hold whole vectors of quads");
  for (int64_t q = 0; q < quads; q += 8) {
    WordsX8 c0, c1;
    for (int i = 0; i < 8; ++i) {
      const uint64_t quad = first_quad + q + i;
      c0[i] = static_cast<uint32_t>(quad);
      c1[i] = static_cast<uint32_t>(quad >> 32);
    }
    WordsX8 c2 = WordsX8{} + key, c3 = WordsX8{} + step;
    philox_rounds(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    memcpy(&words[0][q], &c0, sizeof c0);
    memcpy(&words[1][q], &c1, sizeof c1);
    memcpy(&words[2][q], &c2, sizeof c2);
    memcpy(&words[3][q], &c3, sizeof c3);
  }
#else
  for (int64_t q = 0; q < quads; ++q) {
    const PhiloxWords w = quad_words(seed, key, step, first_quad + q);
    NVRM_UNROLL
    for (int lane = 0; lane < 4; ++lane) words[lane][q] = w.x[lane];
  }
#endif
}

// delta[4q + lane] = noise of the quad whose Philox words are column `column` + q of `words`
// (Subtract: delta - noise), q < quads.
template <int Type, bool Subtract, typename Delta>
void transform_words(Delta* __restrict delta, const uint32_t (*words)[kChunk / 4], int64_t column,
                     float scale, int64_t quads) {
  for (int64_t q = 0; q < quads; ++q) {
    const int64_t c = column + q;
    Delta noise[4];
    noise_from_words<Type>(PhiloxWords{{words[0][c], words[1][c], words[2][c], words[3][c]}},
                           scale, noise);
    NVRM_UNROLL
    for (int lane = 0; lane < 4; ++lane) {
      Delta& d = delta[4 * q + lane];
      d = Subtract ? noise_delta(d, noise[lane]) : noise[lane];
    }
  }
}

// delta[4q + lane] = noise of quad first_quad + q (Subtract: delta - noise), q < quads.
template <int Type, bool Subtract, typename Delta>
void stage_noise(Delta* __restrict delta, uint64_t seed, uint32_t key, uint32_t step, float scale,
                 uint64_t first_quad, int64_t quads) {
  alignas(32) uint32_t words[4][kChunk / 4];
  philox_words(words, seed, key, step, first_quad, quads);
  transform_words<Type, Subtract>(delta, words, 0, scale, quads);
}

#if defined(__AVX2__)
// A small tensor (at most 4 quads) regenerating its old noise and drawing its new noise: the words
// of both draws in one vector of 8 quads -- new_step's in columns 0..3, old_step's in 4..7 --
// instead of two vectors each mostly computing quads past the end.
template <typename Delta>
void stage_small_noise_delta(Delta* delta, const Row& row, uint64_t seed, uint64_t first_quad,
                             int64_t quads) {
  alignas(32) uint32_t words[4][kChunk / 4];
  WordsX8 c0, c1, c3;
  for (int i = 0; i < 8; ++i) {
    const uint64_t quad = first_quad + (i & 3);
    c0[i] = static_cast<uint32_t>(quad);
    c1[i] = static_cast<uint32_t>(quad >> 32);
    c3[i] = i < 4 ? row.new_step : row.old_step;
  }
  WordsX8 c2 = WordsX8{} + row.key;
  philox_rounds(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  memcpy(&words[0][0], &c0, sizeof c0);
  memcpy(&words[1][0], &c1, sizeof c1);
  memcpy(&words[2][0], &c2, sizeof c2);
  memcpy(&words[3][0], &c3, sizeof c3);
  with_noise_type(row.new_type, [&](auto type) {
    transform_words<decltype(type)::value, false>(delta, words, 0, row.new_scale, quads);
  });
  with_noise_type(row.old_type, [&](auto type) {
    transform_words<decltype(type)::value, true>(delta, words, 4, row.old_scale, quads);
  });
}
#endif

// Fills delta[0 .. 4*quads) with n_new - n_old for the quads starting at first_quad.
template <typename Delta>
void stage_noise_delta(Delta* delta, const Row& row, uint64_t seed, uint64_t first_quad,
                       int64_t quads) {
#if defined(__AVX2__)
  if (quads <= 4 && row.new_step != 0 && row.old_step != 0) {
    stage_small_noise_delta(delta, row, seed, first_quad, quads);
    return;
  }
#endif
  if (row.new_step != 0) {
    with_noise_type(row.new_type, [&](auto type) {
      stage_noise<decltype(type)::value, false>(delta, seed, row.key, row.new_step, row.new_scale,
                                                first_quad, quads);
    });
  } else {
    std::fill(delta, delta + 4 * quads, Delta(0));
  }
  if (row.old_step != 0) {
    with_noise_type(row.old_type, [&](auto type) {
      stage_noise<decltype(type)::value, true>(delta, seed, row.key, row.old_step, row.old_scale,
                                               first_quad, quads);
    });
  }
}

// The parameter in its arithmetic type: param + comp for compensated (float16/bfloat16) ones.
template <typename S, bool Compensated>
typename S::Math load_param(const typename S::Stored* param, const typename S::Stored* comp,
                            int64_t i) {
  return Compensated ? S::load(param[i]) + S::load(comp[i]) : S::load(param[i]);
}

template <typename S, bool Compensated>
void store_param(typename S::Math x, typename S::Stored* param, typename S::Stored* comp,
                 int64_t i) {
  if (Compensated) {
    float p, c;
    split_store(x, [](float v) { return S::load(S::store(v)); }, p, c);
    param[i] = S::store(p);  // exact: p and c already are storage values
    comp[i] = S::store(c);
  } else {
    param[i] = S::store(x);
  }
}

// The element loops over local indices [lo, hi); delta[0] belongs to element lo.
template <typename S, bool Compensated, bool Noisy, bool WeightDecay, bool Momentum,
          bool MomentumInit, bool Nesterov>
void sgd_range(const Row& shared_row, int64_t lo, int64_t hi,
               const typename S::Math* __restrict delta) {
  const Row row = shared_row;  // a local copy: provably not aliased by the stores below
  const SgdOptions options{WeightDecay, Momentum, MomentumInit, Nesterov};
  auto* __restrict param = address<S>(row.param);
  auto* __restrict comp = address<S>(row.comp);
  const auto* __restrict grad = address<S>(row.grad);
  auto* __restrict buffer = address<S>(row.state0);
  for (int64_t i = lo; i < hi; ++i) {
    using Math = typename S::Math;
    Math buf = (Momentum && !MomentumInit) ? S::load(buffer[i]) : Math(0);
    Math p = sgd_element<Math>(load_param<S, Compensated>(param, comp, i), S::load(grad[i]), buf,
                               row, options);
    if (Noisy) p = add_noise(p, delta[i - lo]);
    store_param<S, Compensated>(p, param, comp, i);
    if (Momentum) buffer[i] = S::store(buf);
  }
}

template <typename S, bool Compensated, bool Noisy, bool Amsgrad, bool Decoupled>
void adam_range(const Row& shared_row, int64_t lo, int64_t hi,
                const typename S::Math* __restrict delta) {
  const Row row = shared_row;
  const AdamOptions options{Amsgrad, Decoupled};
  auto* __restrict param = address<S>(row.param);
  auto* __restrict comp = address<S>(row.comp);
  const auto* __restrict grad = address<S>(row.grad);
  auto* __restrict exp_avg = address<S>(row.state0);
  auto* __restrict exp_avg_sq = address<S>(row.state1);
  auto* __restrict max_exp_avg_sq = address<S>(row.state2);
  for (int64_t i = lo; i < hi; ++i) {
    using Math = typename S::Math;
    Math m = S::load(exp_avg[i]);
    Math v = S::load(exp_avg_sq[i]);
    Math v_max = Amsgrad ? S::load(max_exp_avg_sq[i]) : Math(0);
    Math p = adam_element<Math>(load_param<S, Compensated>(param, comp, i), S::load(grad[i]), m, v,
                                v_max, row, options);
    if (Noisy) p = add_noise(p, delta[i - lo]);
    store_param<S, Compensated>(p, param, comp, i);
    exp_avg[i] = S::store(m);
    exp_avg_sq[i] = S::store(v);
    if (Amsgrad) max_exp_avg_sq[i] = S::store(v_max);
  }
}

template <typename S, bool Compensated>
void noise_range(const Row& shared_row, int64_t lo, int64_t hi,
                 const typename S::Math* __restrict delta) {
  auto* __restrict param = address<S>(shared_row.param);
  auto* __restrict comp = address<S>(shared_row.comp);
  for (int64_t i = lo; i < hi; ++i) {
    store_param<S, Compensated>(add_noise(load_param<S, Compensated>(param, comp, i), delta[i - lo]),
                                param, comp, i);
  }
}

// The element loop of one row, specialized on its op and flags: a callable (lo, hi, delta).
template <typename S, bool Compensated, bool Noisy, class F>
void with_update_compensated(int op, const Row& row, F&& f) {
  if (op == kOpSgd) {
    with_bool(row.weight_decay, [&](auto wd) {
      with_bool(row.momentum, [&](auto momentum) {
        with_bool(row.momentum_init, [&](auto init) {
          with_bool(row.nesterov, [&](auto nesterov) {
            f([&](int64_t lo, int64_t hi, const typename S::Math* delta) {
              sgd_range<S, Compensated, Noisy, decltype(wd)::value, decltype(momentum)::value,
                        decltype(init)::value, decltype(nesterov)::value>(row, lo, hi, delta);
            });
          });
        });
      });
    });
  } else if (op == kOpAdam) {
    with_bool(row.amsgrad, [&](auto amsgrad) {
      with_bool(row.decoupled, [&](auto decoupled) {
        f([&](int64_t lo, int64_t hi, const typename S::Math* delta) {
          adam_range<S, Compensated, Noisy, decltype(amsgrad)::value, decltype(decoupled)::value>(row, lo, hi,
                                                                                    delta);
        });
      });
    });
  } else if (Noisy) {
    f([&](int64_t lo, int64_t hi, const typename S::Math* delta) {
      noise_range<S, Compensated>(row, lo, hi, delta);
    });
  }
}

// ... and on whether the parameter is compensated, which only 16-bit storage can be.
template <typename S, bool Noisy, class F>
void with_update(int op, const Row& row, F&& f) {
  constexpr bool kWide = sizeof(typename S::Stored) > 2;  // float32 and float64: no compensation
  with_bool(!kWide && row.comp != 0, [&](auto compensated) {
    with_update_compensated<S, decltype(compensated)::value && !kWide, Noisy>(op, row, f);
  });
}

// GradScaler's fused protocol: grad = grad / scale, rounded to the gradient's dtype and written
// back (as torch's fused optimizers leave it), before the update reads it.
template <typename S>
void unscale_gradient(const Row& row, int64_t lo, int64_t hi, const float* grad_scale) {
  if (grad_scale == nullptr) return;
  const typename S::Math scale = *grad_scale;
  auto* __restrict grad = address<S>(row.grad);
  for (int64_t i = lo; i < hi; ++i) grad[i] = S::store(S::load(grad[i]) / scale);
}

// One block_table row: global elements [block_start, block_start + block_size) of `row`.
template <typename S>
void run_block(int op, const Row& row, int64_t block_start, int64_t block_size, uint64_t seed,
               const float* grad_scale) {
  const int64_t begin = std::max(block_start, row.offset);
  const int64_t end = std::min(block_start + block_size, row.offset + row.numel);
  if (op == kOpNoise) grad_scale = nullptr;
  if (row.new_step == 0 && row.old_step == 0) {
    unscale_gradient<S>(row, begin - row.offset, end - row.offset, grad_scale);
    with_update<S, false>(op, row, [&](auto update) {
      update(begin - row.offset, end - row.offset, nullptr);
    });
    return;
  }
  alignas(64) typename S::Math delta[kChunk];  // the noise change, in the update's arithmetic type
  with_update<S, true>(op, row, [&](auto update) {
    // Chunks start on quad boundaries (block_start is a multiple of 4), so every Philox quad
    // lies inside one chunk.
    for (int64_t chunk = block_start; chunk < end; chunk += kChunk) {
      const int64_t chunk_end = std::min(chunk + kChunk, end);
      const int64_t first = std::max(chunk, begin);
      stage_noise_delta(delta, row, seed, static_cast<uint64_t>(chunk) >> 2,
                        (chunk_end - chunk + 3) >> 2);
      unscale_gradient<S>(row, first - row.offset, chunk_end - row.offset, grad_scale);
      update(first - row.offset, chunk_end - row.offset, delta + (first - chunk));
    }
  });
}

template <typename S>
void run(int op, const int64_t* ints, const float* floats, const int64_t* blocks, int64_t first,
         int64_t last, int64_t block_size, uint64_t seed, const float* grad_scale) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t table_row = blocks[kBlockColumns * b + kBlockRow];
    const Row row =
        decode_row(ints + table_row * kIntColumns, floats + table_row * kFloatColumns, op);
    run_block<S>(op, row, blocks[kBlockColumns * b + kBlockStart], block_size, seed, grad_scale);
  }
}

}  // namespace

// block_table rows [first, last), on the calling thread. Arguments are validated by api.cpp.
void NVRM_CPU_LAUNCH(int op, int dtype_code, const int64_t* ints, const float* floats,
                     const int64_t* blocks, int64_t first, int64_t last, int64_t block_size,
                     uint64_t seed, const float* grad_scale) {
  if (dtype_code == kStorageFloat32) {
    run<Float32>(op, ints, floats, blocks, first, last, block_size, seed, grad_scale);
  } else if (dtype_code == kStorageFloat64) {
    run<Float64>(op, ints, floats, blocks, first, last, block_size, seed, grad_scale);
  } else if (dtype_code == kStorageFloat16) {
    run<Float16>(op, ints, floats, blocks, first, last, block_size, seed, grad_scale);
  } else {
    run<BFloat16>(op, ints, floats, blocks, first, last, block_size, seed, grad_scale);
  }
}

}  // namespace cpu
}  // namespace nvrm
