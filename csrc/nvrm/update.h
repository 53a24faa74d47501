// The per-element update of docs/noise.md §7 and the launch-table row it reads
// (nvrm_ext/backends/tables.py is the authority on the layout mirrored here).
#pragma once

#include <string.h>

#include "noise.h"

namespace nvrm {

// int_table columns
constexpr int kIntParam = 0, kIntGrad = 1, kIntState0 = 2, kIntState1 = 3, kIntState2 = 4,
              kIntNumel = 5, kIntKey = 6, kIntOldStep = 7, kIntNewStep = 8, kIntFlags = 9,
              kIntOffset = 10, kIntComp = 11, kIntLive = 12, kIntNumIters = 13,
              kIntColumns = 14;
// block_table columns: the table row (tensor) of a block, the global index of its first element
constexpr int kBlockRow = 0, kBlockStart = 1, kBlockColumns = 2;
// float_table columns
constexpr int kFloatLr = 0, kFloatWeightDecay = 1, kFloatMomentum = 2, kFloatMomentumCoef = 3,
              kFloatBeta2 = 4, kFloatBeta2Coef = 5, kFloatEps = 6, kFloatStepSize = 7,
              kFloatSqrtBc2 = 8, kFloatDecay = 9, kFloatOldScale = 10, kFloatNewScale = 11,
              kFloatColumns = 12;
// I_FLAGS bits
constexpr int kFlagOldTypeShift = 0, kFlagNewTypeShift = 2;
constexpr int64_t kNoiseTypeMask = 3;  // a noise type field's width
constexpr int64_t kFlagWeightDecay = 1 << 4, kFlagMomentum = 1 << 5, kFlagMomentumInit = 1 << 6,
                  kFlagNesterov = 1 << 7, kFlagAmsgrad = 1 << 8, kFlagDecoupled = 1 << 9,
                  kFlagKeepNoise = 1 << 10;
// live counter columns (capturable mode: float64 [T, kLiveColumns] on the device)
constexpr int kLiveStep = 0, kLiveNoiseStep = 1, kLiveNoiseType = 2, kLiveNoiseScale = 3,
              kLiveFresh = 4, kLiveColumns = 5;
// operations
enum Op : int { kOpSgd = 0, kOpAdam = 1, kOpNoise = 2 };
// storage dtype codes of the C entry points (nvrm_ext/backends/tables.py STORAGE_CODES)
enum StorageCode : int {
  kStorageFloat32 = 0,
  kStorageFloat16 = 1,
  kStorageBFloat16 = 2,
  kStorageFloat64 = 3
};
NVRM_HD int storage_bytes(int code) {
  return code == kStorageFloat64 ? 8 : code == kStorageFloat32 ? 4 : 2;
}

// One tensor's row of the launch tables, decoded once per block.
struct Row {
  int64_t param, grad, state0, state1, state2;  // addresses; 0 when absent
  int64_t comp;  // float16/bfloat16 parameters: the compensation buffer (see split_store); else 0
  int64_t live;  // capturable mode: this row's live counters (resolve_live / commit_live); else 0
  int64_t numel, offset;                        // offset: global index of element 0
  uint32_t key, old_step, new_step;
  int old_type, new_type;
  bool weight_decay, momentum, momentum_init, nesterov, amsgrad, decoupled;
  float lr, weight_decay_value, momentum_value, momentum_coef, beta2, beta2_coef, eps, step_size,
      sqrt_bc2, decay, old_scale, new_scale;
};

// base^exponent in float64 by binary exponentiation: only multiplications, each rounded once, so
// every implementation gets the same bits (nvrm_ext/backends/tables.py power()).
NVRM_HD double power(double base, uint32_t exponent) {
  double result = 1.0;
  double x = base;
  for (int bit = 0; bit < 32; ++bit) {
    if ((exponent >> bit) & 1u) result = result * x;
    x = x * x;
  }
  return result;
}

NVRM_HD uint32_t new_step_after(int64_t step, int64_t num_iters) {
  return step % num_iters == 0 ? 0u : static_cast<uint32_t>(step);
}

// Capturable mode: the step-dependent part of a row from its live counters (docs/noise.md §7;
// the host form is nvrm_ext/backends/tables.py resolve_rows).
NVRM_HD void resolve_live(Row& row, int op, const int64_t* ints) {
  const double* live = reinterpret_cast<const double*>(row.live);
  const int64_t t = static_cast<int64_t>(live[kLiveStep]) + 1;
  row.new_step = new_step_after(t, ints[kIntNumIters]);
  row.old_step = static_cast<uint32_t>(static_cast<int64_t>(live[kLiveNoiseStep]));
  row.old_type = static_cast<int>(live[kLiveNoiseType]);
  row.old_scale = static_cast<float>(live[kLiveNoiseScale]);
  row.momentum_init = live[kLiveFresh] != 0.0;
  if (op == kOpAdam) {
    const double lr = row.lr;
    const uint32_t exponent = static_cast<uint32_t>(t);
    row.step_size = static_cast<float>(lr / (1.0 - power(row.momentum_value, exponent)));
    row.sqrt_bc2 = static_cast<float>(sqrt(1.0 - power(row.beta2, exponent)));
    row.decay = static_cast<float>(1.0 - lr * static_cast<double>(row.weight_decay_value));
  }
}

// Capturable mode: advance one row's live counters past the step just run (tables.py
// commit_rows). Runs after every block of the launch has resolved the row.
NVRM_HD void commit_live(const int64_t* ints, const float* floats) {
  double* live = reinterpret_cast<double*>(ints[kIntLive]);
  if (live == nullptr) return;
  const int64_t flags = ints[kIntFlags];
  const int64_t t = static_cast<int64_t>(live[kLiveStep]) + 1;
  live[kLiveStep] = static_cast<double>(t);
  live[kLiveNoiseStep] =
      (flags & kFlagKeepNoise) ? 0.0 : static_cast<double>(new_step_after(t, ints[kIntNumIters]));
  live[kLiveNoiseType] = static_cast<double>((flags >> kFlagNewTypeShift) & kNoiseTypeMask);
  live[kLiveNoiseScale] = static_cast<double>(floats[kFloatNewScale]);
  live[kLiveFresh] = 0.0;
}

// Weight records (nvrm_ext/optim/records.py): up to kSampleSize elements spread evenly over a row's
// parameter -- element j * (numel / count) for j < count = min(numel, kSampleSize) -- copied
// after a launch into slot j of the row's kSampleSize slots, so that the host can tell a rewrite
// of the weights from a copy of the same values without reading the tensors one by one.
constexpr int kSampleSize = 8;

NVRM_HD void copy_sample(const int64_t* ints, int64_t j, int element_bytes, unsigned char* out) {
  const int64_t numel = ints[kIntNumel];
  const int64_t count = numel < kSampleSize ? numel : kSampleSize;
  if (j >= count) return;
  const unsigned char* element =
      reinterpret_cast<const unsigned char*>(ints[kIntParam]) + j * (numel / count) * element_bytes;
  if (element_bytes == 8) {
    memcpy(out, element, 8);  // one load and store each: the sizes are constants
  } else if (element_bytes == 4) {
    memcpy(out, element, 4);
  } else {
    memcpy(out, element, 2);
  }
}

NVRM_HD Row decode_row(const int64_t* ints, const float* floats, int op) {
  const int64_t flags = ints[kIntFlags];
  Row row;
  row.param = ints[kIntParam];
  row.grad = ints[kIntGrad];
  row.state0 = ints[kIntState0];
  row.state1 = ints[kIntState1];
  row.state2 = ints[kIntState2];
  row.comp = ints[kIntComp];
  row.numel = ints[kIntNumel];
  row.offset = ints[kIntOffset];
  row.key = static_cast<uint32_t>(ints[kIntKey]);
  row.old_step = static_cast<uint32_t>(ints[kIntOldStep]);
  row.new_step = static_cast<uint32_t>(ints[kIntNewStep]);
  row.old_type = static_cast<int>((flags >> kFlagOldTypeShift) & kNoiseTypeMask);
  row.new_type = static_cast<int>((flags >> kFlagNewTypeShift) & kNoiseTypeMask);
  row.weight_decay = (flags & kFlagWeightDecay) != 0;
  row.momentum = (flags & kFlagMomentum) != 0;
  row.momentum_init = (flags & kFlagMomentumInit) != 0;
  row.nesterov = (flags & kFlagNesterov) != 0;
  row.amsgrad = (flags & kFlagAmsgrad) != 0;
  row.decoupled = (flags & kFlagDecoupled) != 0;
  row.lr = floats[kFloatLr];
  row.weight_decay_value = floats[kFloatWeightDecay];
  row.momentum_value = floats[kFloatMomentum];
  row.momentum_coef = floats[kFloatMomentumCoef];
  row.beta2 = floats[kFloatBeta2];
  row.beta2_coef = floats[kFloatBeta2Coef];
  row.eps = floats[kFloatEps];
  row.step_size = floats[kFloatStepSize];
  row.sqrt_bc2 = floats[kFloatSqrtBc2];
  row.decay = floats[kFloatDecay];
  row.old_scale = floats[kFloatOldScale];
  row.new_scale = floats[kFloatNewScale];
  row.live = ints[kIntLive];
  if (row.live != 0) resolve_live(row, op, ints);
  return row;
}

NVRM_HD float div32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The update's arithmetic type is the parameter's: float32 for float32 and 16-bit parameters,
// float64 for float64 ones (as torch.optim computes them). Division and square root correctly
// rounded in both.
NVRM_HD float divide_rn(float a, float b) { return div32(a, b); }
NVRM_HD double divide_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
NVRM_HD float sqrt_rn(float x) { return sqrt32(x); }
NVRM_HD double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return __builtin_sqrt(x);
#endif
}

// The options of one row's update. The CPU launcher passes compile-time constants (so every
// `if` below folds away inside its vectorized loops); CUDA passes the row's values, which are
// uniform across a thread block.
struct SgdOptions {
  bool weight_decay, momentum, momentum_init, nesterov;
};

struct AdamOptions {
  bool amsgrad, decoupled;
};

// SGD (§7) on one element in Real (float or double); returns the new parameter before noise,
// updates `buffer` in place. With momentum_init the loaded buffer is not read. The row's
// hyperparameters are float32 table values, widened exactly for float64 parameters.
template <typename Real>
NVRM_HD Real sgd_element(Real p, Real g, Real& buffer, const Row& row, SgdOptions options) {
  const Real momentum = static_cast<Real>(row.momentum_value);
  const Real momentum_coef = static_cast<Real>(row.momentum_coef);
  Real d = g;
  if (options.weight_decay) d = g + static_cast<Real>(row.weight_decay_value) * p;
  if (options.momentum) {
    buffer = options.momentum_init ? d : momentum * buffer + momentum_coef * d;
    d = options.nesterov ? d + momentum * buffer : buffer;
  }
  return p - static_cast<Real>(row.lr) * d;
}

// Adam (§7) on one element in Real; returns the new parameter before noise, updates the moments
// in place (`max_exp_avg_sq` only with amsgrad).
template <typename Real>
NVRM_HD Real adam_element(Real p, Real g, Real& exp_avg, Real& exp_avg_sq, Real& max_exp_avg_sq,
                          const Row& row, AdamOptions options) {
  const Real beta1 = static_cast<Real>(row.momentum_value);
  const Real beta1_coef = static_cast<Real>(row.momentum_coef);
  const Real beta2 = static_cast<Real>(row.beta2);
  const Real beta2_coef = static_cast<Real>(row.beta2_coef);
  if (options.decoupled) {
    p = p * static_cast<Real>(row.decay);
  } else {
    g = g + static_cast<Real>(row.weight_decay_value) * p;
  }
  exp_avg = beta1 * exp_avg + beta1_coef * g;
  exp_avg_sq = beta2 * exp_avg_sq + (beta2_coef * g) * g;
  Real second_moment = exp_avg_sq;
  if (options.amsgrad) {
    // NaN-propagating maximum, as torch.maximum.
    const bool keep = max_exp_avg_sq > exp_avg_sq || max_exp_avg_sq != max_exp_avg_sq;
    max_exp_avg_sq = keep ? max_exp_avg_sq : exp_avg_sq;
    second_moment = max_exp_avg_sq;
  }
  const Real denom = divide_rn(sqrt_rn(second_moment), static_cast<Real>(row.sqrt_bc2)) +
                     static_cast<Real>(row.eps);
  return p - static_cast<Real>(row.step_size) * divide_rn(exp_avg, denom);
}

// Compensated low-precision parameters (docs/noise.md §7): the weight is param + comp, both in
// the storage type, so adding and removing noise does not round the clean weight away. Storing
// x keeps in comp what rounding x to the storage type dropped. `Round` rounds a float32 to the
// nearest storage value and returns it as float32.
template <class Round>
NVRM_HD void split_store(float x, Round round, float& param, float& comp) {
  param = round(x);
  comp = round(x - param);
}

// The noise change of one element: the new noise minus the regenerated old one (either is 0
// when its step is 0), added to the updated parameter; all in the parameter's arithmetic type
// (float64 for float64 parameters, where the difference of two float32 draws is exact).
template <typename Real>
NVRM_HD Real noise_delta(Real new_noise, Real old_noise) { return new_noise - old_noise; }

template <typename Real>
NVRM_HD Real add_noise(Real p, Real delta) { return p + delta; }

}  // namespace nvrm
