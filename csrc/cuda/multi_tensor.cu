// CUDA launcher: one kernel launch per optimizer step, in the style of a chunked
// multi-tensor apply. Each thread block takes one block_table row (grid-striding if there are
// more rows than the grid holds): block_size consecutive global elements of one tensor, one
// Philox quad per thread and iteration.
//
// This file only indexes, loads and stores; the element math is csrc/nvrm/{philox,noise,update}.h.
// Compiled with --fmad=false so that nothing is contracted beyond the explicit fmas there.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <string>

#include "../nvrm/update.h"

namespace nvrm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// At least 4 resident blocks per SM: at most 64 registers per thread, 50% occupancy. float64
// parameters: 2 (128 registers), as their Adam update spills at 64.
constexpr int kMinBlocksPerSm = 4;
template <typename T>
constexpr int kMinBlocksPerSmOf = sizeof(T) == 8 ? 2 : kMinBlocksPerSm;

// Storage types: load converts to the update's arithmetic type (MathOf: float32, float64 for
// float64 parameters), store rounds once to nearest even.
template <typename T>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

__device__ __forceinline__ double load(double x) { return x; }
__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T store(typename MathOf<T>::type x);
template <>
__device__ __forceinline__ double store<double>(double x) { return x; }
template <>
__device__ __forceinline__ float store<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// float32 rounded to the nearest value of storage type T (as float32), for split_store.
template <typename T>
struct RoundTo {
  __device__ float operator()(float x) const { return load(store<T>(x)); }
};

// Four consecutive elements moved by one instruction (128-bit for float32, 64-bit for 16-bit
// types) or two (float64: 2 x 128-bit); only used where the row's pointers are aligned to it.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T lane[4];
};

// The alignment a quad access needs: the whole quad, at most 16 bytes (a 128-bit access).
template <typename T>
constexpr int64_t kQuadAlignment = sizeof(Quad<T>) < 16 ? sizeof(Quad<T>) : 16;

// The element values one update reads and writes, in the arithmetic type; param already
// includes the compensation of 16-bit parameters (param + comp).
template <typename Math>
struct Element {
  Math param, grad, state0, state1, state2;
};

// The state each op reads and writes; the rest is neither loaded nor stored.
template <int Op>
struct StateUse {
  bool load0, store0, use1, use2;
  __device__ explicit StateUse(const Row& row)
      : load0(Op == kOpAdam || (Op == kOpSgd && row.momentum && !row.momentum_init)),
        store0(Op == kOpAdam || (Op == kOpSgd && row.momentum)),
        use1(Op == kOpAdam),
        use2(Op == kOpAdam && row.amsgrad) {}
};

template <int Op, typename Math>
__device__ __forceinline__ void update(const Row& row, Element<Math>& e, Math delta, bool noisy) {
  if (Op == kOpSgd) {
    e.param = sgd_element<Math>(e.param, e.grad, e.state0, row,
                          SgdOptions{row.weight_decay, row.momentum, row.momentum_init, row.nesterov});
  } else if (Op == kOpAdam) {
    e.param = adam_element<Math>(e.param, e.grad, e.state0, e.state1, e.state2, row,
                           AdamOptions{row.amsgrad, row.decoupled});
  }
  if (noisy) e.param = add_noise(e.param, delta);
}

template <typename T>
__device__ __forceinline__ T* pointer(int64_t address) {
  return reinterpret_cast<T*>(address);
}

// The builtin vector type of one Quad<T>, for __ldcs / __stcs: explicit global-space accesses
// (ld.global.cs.v4 / .v2, 128-bit for float32), as a generic pointer cast from an int64 address
// would otherwise load through the generic space.
template <typename T>
struct QuadBits {
  using type = uint2;  // 16-bit storage types
};
template <>
struct QuadBits<float> {
  using type = float4;
};

template <typename T>
__device__ __forceinline__ Quad<T> load_quad(int64_t address) {
  const auto bits = __ldcs(pointer<const typename QuadBits<T>::type>(address));
  Quad<T> quad;
  memcpy(&quad, &bits, sizeof quad);
  return quad;
}

template <>
__device__ __forceinline__ Quad<double> load_quad<double>(int64_t address) {
  const double2 low = __ldcs(pointer<const double2>(address));
  const double2 high = __ldcs(pointer<const double2>(address + 16));
  return Quad<double>{{low.x, low.y, high.x, high.y}};
}

template <typename T>
__device__ __forceinline__ void store_quad(int64_t address, const Quad<T>& quad) {
  typename QuadBits<T>::type bits;
  memcpy(&bits, &quad, sizeof bits);
  __stcs(pointer<typename QuadBits<T>::type>(address), bits);
}

template <>
__device__ __forceinline__ void store_quad<double>(int64_t address, const Quad<double>& quad) {
  __stcs(pointer<double2>(address), make_double2(quad.lane[0], quad.lane[1]));
  __stcs(pointer<double2>(address + 16), make_double2(quad.lane[2], quad.lane[3]));
}

// Whether element `base` (and so every 4th element after it) of each pointer the op touches is
// aligned for Quad<T> loads.
template <int Op, typename T>
__device__ bool quads_aligned(const Row& row, const StateUse<Op>& use, int64_t base) {
  const int64_t shift = base * static_cast<int64_t>(sizeof(T));
  int64_t addresses = row.param + shift;
  if (row.comp != 0) addresses |= row.comp + shift;
  if (Op != kOpNoise) addresses |= row.grad + shift;
  if (use.load0 || use.store0) addresses |= row.state0 + shift;
  if (use.use1) addresses |= row.state1 + shift;
  if (use.use2) addresses |= row.state2 + shift;
  return addresses % kQuadAlignment<T> == 0;
}

// GradScaler's fused protocol: the gradient divided by the scale, rounded to its dtype (and
// written back by the caller, as torch's fused optimizers leave it).
template <typename T>
__device__ __forceinline__ T unscaled(T g, const float* grad_scale) {
  using Math = typename MathOf<T>::type;
  return store<T>(divide_rn(load(g), static_cast<Math>(*grad_scale)));
}

// The GradScaler protocol on the quad of elements first .. first+3 (those in the tensor),
// written back before the update reads them again (from L1/L2): done inside the update, the
// extra division per element would need more than 64 registers.
template <typename T>
__device__ __forceinline__ void unscale_quad(const Row& row, bool whole, int64_t first,
                                             const float* grad_scale) {
  if (whole) {
    const int64_t at = first * static_cast<int64_t>(sizeof(T));
    Quad<T> g = load_quad<T>(row.grad + at);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) g.lane[lane] = unscaled(g.lane[lane], grad_scale);
    store_quad<T>(row.grad + at, g);
    return;
  }
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = first + lane;
    if (i >= 0 && i < row.numel) pointer<T>(row.grad)[i] = unscaled(pointer<T>(row.grad)[i], grad_scale);
  }
}

// Op: kOpSgd / kOpAdam / kOpNoise; T: storage type; Unscale: the GradScaler protocol (a
// separate instantiation, so the common step carries no per-element test for it).
template <int Op, typename T, bool Unscale>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSmOf<T>)
    multi_tensor_kernel(const int64_t* __restrict__ ints, const float* __restrict__ floats,
                        const int64_t* __restrict__ blocks, int64_t num_blocks, int64_t block_size,
                        const PhiloxRoundKeys keys, const float* __restrict__ grad_scale,
                        const float* __restrict__ found_inf) {
  // Aligned quads are loaded before the noise math, which hides their latency, where the loaded
  // values fit in 64 registers beside it (float32 SGD, the noise op); else after it: Adam's
  // moments, the 16-bit conversions and the GradScaler's division spill there (ptxas -v).
  constexpr bool kEarlyLoads = Op == kOpNoise || (Op == kOpSgd && sizeof(T) == 4 && !Unscale);
  using Math = typename MathOf<T>::type;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: nothing is written
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t table_row = blocks[kBlockColumns * b + kBlockRow];
    const int64_t block_start = blocks[kBlockColumns * b + kBlockStart];
    const Row row =
        decode_row(ints + table_row * kIntColumns, floats + table_row * kFloatColumns, Op);
    const StateUse<Op> use(row);
    const bool noisy = row.new_step != 0 || row.old_step != 0;
    const bool compensated = sizeof(T) == 2 && row.comp != 0;  // 16-bit parameters only
    // Local index of the block's first element; negative where the tensor starts mid-quad.
    const int64_t base = block_start - row.offset;
    const bool aligned = quads_aligned<Op, T>(row, use, base);

    for (int64_t q = threadIdx.x; 4 * q < block_size; q += blockDim.x) {
      const int64_t first = base + 4 * q;  // local index of lane 0
      if (first >= row.numel) break;
      const bool whole = aligned && first >= 0 && first + 4 <= row.numel;
      const int64_t at = first * static_cast<int64_t>(sizeof(T));  // byte offset of lane 0
      if (Unscale) unscale_quad<T>(row, whole, first, grad_scale);
      Quad<T> p, c, g, s0, s1, s2;
      const auto load_quads = [&] {
        p = load_quad<T>(row.param + at);
        if (compensated) c = load_quad<T>(row.comp + at);
        if (Op != kOpNoise) g = load_quad<T>(row.grad + at);
        if (use.load0) s0 = load_quad<T>(row.state0 + at);
        if (use.use1) s1 = load_quad<T>(row.state1 + at);
        if (use.use2) s2 = load_quad<T>(row.state2 + at);
      };
      if (kEarlyLoads && whole) load_quads();

      Math delta[4] = {0, 0, 0, 0};  // the noise change, in the update's arithmetic type
      if (noisy) {
        const uint64_t quad = static_cast<uint64_t>(block_start >> 2) + q;
        Math new_noise[4] = {0, 0, 0, 0};
        Math old_noise[4] = {0, 0, 0, 0};
        if (row.new_step != 0) {
          noise_quad(row.new_type, keys, row.key, row.new_step, row.new_scale, quad, new_noise);
        }
        if (row.old_step != 0) {
          noise_quad(row.old_type, keys, row.key, row.old_step, row.old_scale, quad, old_noise);
        }
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) delta[lane] = noise_delta(new_noise[lane], old_noise[lane]);
      }

      if (whole) {
        if (!kEarlyLoads) load_quads();
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
          Element<Math> e{compensated ? load(p.lane[lane]) + load(c.lane[lane]) : load(p.lane[lane]),
                          Op != kOpNoise ? load(g.lane[lane]) : Math(0),
                          use.load0 ? load(s0.lane[lane]) : Math(0),
                          use.use1 ? load(s1.lane[lane]) : Math(0),
                          use.use2 ? load(s2.lane[lane]) : Math(0)};
          update<Op>(row, e, delta[lane], noisy);
          if (compensated) {
            float stored, rest;
            split_store(e.param, RoundTo<T>{}, stored, rest);
            p.lane[lane] = store<T>(stored);
            c.lane[lane] = store<T>(rest);
          } else {
            p.lane[lane] = store<T>(e.param);
          }
          s0.lane[lane] = store<T>(e.state0);
          s1.lane[lane] = store<T>(e.state1);
          s2.lane[lane] = store<T>(e.state2);
        }
        store_quad<T>(row.param + at, p);
        if (compensated) store_quad<T>(row.comp + at, c);
        if (use.store0) store_quad<T>(row.state0 + at, s0);
        if (use.use1) store_quad<T>(row.state1 + at, s1);
        if (use.use2) store_quad<T>(row.state2 + at, s2);
      } else {
        // Unaligned rows and the partial quads at a tensor's ends: element by element.
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t i = first + lane;
          if (i < 0 || i >= row.numel) continue;
          T* param = pointer<T>(row.param) + i;
          T* comp = compensated ? pointer<T>(row.comp) + i : nullptr;
          Element<Math> e{compensated ? load(*param) + load(*comp) : load(*param),
                          Op != kOpNoise ? load(pointer<const T>(row.grad)[i]) : Math(0),
                          use.load0 ? load(pointer<const T>(row.state0)[i]) : Math(0),
                          use.use1 ? load(pointer<const T>(row.state1)[i]) : Math(0),
                          use.use2 ? load(pointer<const T>(row.state2)[i]) : Math(0)};
          update<Op>(row, e, delta[lane], noisy);
          if (compensated) {
            float stored, rest;
            split_store(e.param, RoundTo<T>{}, stored, rest);
            *param = store<T>(stored);
            *comp = store<T>(rest);
          } else {
            *param = store<T>(e.param);
          }
          if (use.store0) pointer<T>(row.state0)[i] = store<T>(e.state0);
          if (use.use1) pointer<T>(row.state1)[i] = store<T>(e.state1);
          if (use.use2) pointer<T>(row.state2)[i] = store<T>(e.state2);
        }
      }
    }
  }
}

// Capturable mode: advance the live counters of rows 0 .. commit_rows-1, after every block of the
// update kernel (stream order) has resolved them.
__global__ void commit_kernel(const int64_t* __restrict__ ints, const float* __restrict__ floats,
                              int64_t commit_rows, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < commit_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    commit_live(ints + r * kIntColumns, floats + r * kFloatColumns);
  }
}

// Weight records: the samples of rows 0 .. sample_rows-1 (update.h copy_sample), after the update.
__global__ void sample_kernel(const int64_t* __restrict__ ints, int64_t sample_rows, int element_bytes,
                              unsigned char* __restrict__ samples) {
  const int64_t slots = sample_rows * kSampleSize;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < slots;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    copy_sample(ints + (i / kSampleSize) * kIntColumns, i % kSampleSize, element_bytes,
                samples + i * element_bytes);
  }
}

// The launch arguments every kernel instantiation receives.
struct Launch {
  const int64_t* ints;
  const float* floats;
  const int64_t* blocks;
  int64_t num_blocks, block_size;
  PhiloxRoundKeys keys;
  const float* grad_scale;
  const float* found_inf;
  cudaStream_t stream;
};

template <int Op, typename T, bool Unscale>
cudaError_t launch_typed(const Launch& a) {
  if (a.num_blocks == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(a.num_blocks < 0x7fffffff ? a.num_blocks : 0x7fffffff);
  multi_tensor_kernel<Op, T, Unscale><<<grid, kThreads, 0, a.stream>>>(
      a.ints, a.floats, a.blocks, a.num_blocks, a.block_size, a.keys, a.grad_scale, a.found_inf);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_op(int op, const Launch& a) {
  const bool unscale = a.grad_scale != nullptr;
  if (op == kOpSgd) {
    return unscale ? launch_typed<kOpSgd, T, true>(a) : launch_typed<kOpSgd, T, false>(a);
  }
  if (op == kOpAdam) {
    return unscale ? launch_typed<kOpAdam, T, true>(a) : launch_typed<kOpAdam, T, false>(a);
  }
  return launch_typed<kOpNoise, T, false>(a);  // the noise op reads no gradient
}

}  // namespace

std::string launch(int op, int dtype_code, const int64_t* ints, const float* floats,
                   const int64_t* blocks, int64_t num_blocks, int64_t block_size, uint64_t seed,
                   int64_t commit_rows, const float* grad_scale, const float* found_inf,
                   int64_t sample_rows, void* samples, void* stream) {
  const Launch a{ints,      floats,    blocks,    num_blocks, block_size, round_keys(seed),
                 grad_scale, found_inf, static_cast<cudaStream_t>(stream)};
  // cudaGetLastError also returns (and clears) an error left by earlier work in this thread, or
  // a sticky one of the context: report that as what it is instead of blaming our launch.
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return std::string("not launched: an earlier CUDA error (not from nvrm_ext) was pending: ") +
           cudaGetErrorString(status);
  }
  if (dtype_code == kStorageFloat32) {
    status = launch_op<float>(op, a);
  } else if (dtype_code == kStorageFloat64) {
    status = launch_op<double>(op, a);
  } else if (dtype_code == kStorageFloat16) {
    status = launch_op<__half>(op, a);
  } else {
    status = launch_op<__nv_bfloat16>(op, a);
  }
  if (status == cudaSuccess && commit_rows > 0) {
    const int64_t wanted = (commit_rows + kThreads - 1) / kThreads;
    const unsigned grid = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
    commit_kernel<<<grid, kThreads, 0, a.stream>>>(ints, floats, commit_rows, found_inf);
    status = cudaGetLastError();
  }
  if (status == cudaSuccess && sample_rows > 0) {
    const int64_t wanted = (sample_rows * kSampleSize + kThreads - 1) / kThreads;
    const unsigned grid = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
    sample_kernel<<<grid, kThreads, 0, a.stream>>>(ints, sample_rows, storage_bytes(dtype_code),
                                                   static_cast<unsigned char*>(samples));
    status = cudaGetLastError();
  }
  if (status != cudaSuccess) {
    return std::string("kernel launch failed: ") + cudaGetErrorString(status);
  }
  return {};
}

std::string probe() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(status);
  }
  if (count == 0) return "no CUDA device is visible";
  return {};
}

}  // namespace cuda
}  // namespace nvrm
