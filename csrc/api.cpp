// The C ABI of libnvrm_cpu.so and libnvrm_cuda.so (loaded with ctypes by
// nvrm_ext/backends/compiled.py): no torch C++ ABI, so one build serves every torch version.
//
// Compiled into each library; NVRM_API_CUDA selects the CUDA entry points.
#include <math.h>
#include <stdint.h>

#include <string>

#include "nvrm/update.h"

namespace {

// Bumped whenever an entry point's signature or the table layout changes.
constexpr int kAbiVersion = 5;

// Return codes of the entry points (nvrm_ext/backends/compiled.py): kRefused when the arguments
// or the tables are invalid -- nothing was read through a table address, nothing was written --
// kFailed when the launch itself failed (a CUDA error).
constexpr int kRefused = 2, kFailed = 1;

thread_local std::string last_error;

int fail(std::string message) {
  last_error = std::move(message);
  return kFailed;
}

int refuse(std::string message) {
  last_error = std::move(message);
  return kRefused;
}

// Checks shared by both launchers (the tables' contents are not read here: CUDA tables live in
// device memory); empty when the launch may proceed.
std::string invalid_arguments(int op, int dtype_code, const int64_t* ints, const float* floats,
                              int64_t num_rows, const int64_t* blocks, int64_t num_blocks,
                              int64_t block_size, int64_t commit_rows, int64_t sample_rows,
                              const void* samples) {
  if (op != nvrm::kOpSgd && op != nvrm::kOpAdam && op != nvrm::kOpNoise) {
    return "unknown op " + std::to_string(op);
  }
  if (dtype_code != nvrm::kStorageFloat32 && dtype_code != nvrm::kStorageFloat16 &&
      dtype_code != nvrm::kStorageBFloat16 && dtype_code != nvrm::kStorageFloat64) {
    return "unknown storage dtype code " + std::to_string(dtype_code);
  }
  if (block_size <= 0 || block_size % 4 != 0 || block_size > (int64_t{1} << 30)) {
    return "block size must be a positive multiple of 4 up to 2^30, got " +
           std::to_string(block_size);
  }
  if (num_rows < 0) return "negative number of table rows";
  if (num_blocks < 0) return "negative number of blocks";
  if (commit_rows < 0) return "negative number of rows to commit";
  if (sample_rows < 0) return "negative number of rows to sample";
  if (commit_rows > num_rows || sample_rows > num_rows) {
    return "rows to commit (" + std::to_string(commit_rows) + ") or sample (" +
           std::to_string(sample_rows) + ") exceed the table's " + std::to_string(num_rows) +
           " rows";
  }
  if (num_blocks > 0 && num_rows == 0) return "blocks given for a table of no rows";
  if (num_rows > 0 && (ints == nullptr || floats == nullptr)) return "null table pointer";
  if (num_blocks > 0 && blocks == nullptr) return "null block table pointer";
  if (sample_rows > 0 && samples == nullptr) return "null sample pointer";
  return {};
}

}  // namespace

#if defined(NVRM_API_CUDA)
namespace nvrm {
namespace cuda {
// multi_tensor.cu; returns an empty string on success, else the CUDA error.
std::string launch(int op, int dtype_code, const int64_t* ints, const float* floats,
                   const int64_t* blocks, int64_t num_blocks, int64_t block_size, uint64_t seed,
                   int64_t commit_rows, const float* grad_scale, const float* found_inf,
                   int64_t sample_rows, void* samples, void* stream);
std::string probe();
}  // namespace cuda
}  // namespace nvrm
#else
#include <algorithm>
#include <atomic>

#include "cpu/thread_pool.h"

namespace nvrm {
namespace cpu {
// multi_tensor.cpp: block_table rows [first, last) on the calling thread.
void launch_baseline(int, int, const int64_t*, const float*, const int64_t*, int64_t, int64_t,
                     int64_t, uint64_t, const float*);
void launch_avx2_fma(int, int, const int64_t*, const float*, const int64_t*, int64_t, int64_t,
                     int64_t, uint64_t, const float*);
}  // namespace cpu
}  // namespace nvrm

namespace {
using CpuLaunch = decltype(&nvrm::cpu::launch_baseline);

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

struct CpuVariant {
  const char* name;
  CpuLaunch launch;
};

CpuVariant best_cpu_variant() {
  if (cpu_has_avx2_fma()) return {"avx2_fma", nvrm::cpu::launch_avx2_fma};
  return {"baseline", nvrm::cpu::launch_baseline};
}

CpuVariant cpu_variant = best_cpu_variant();

// Below this many elements per thread a launch stays on the calling thread: waking a sleeping
// worker costs ~10-50 us, about what one thread takes for 2^15 elements of a noisy step
// (bench/test_cpu_threads.py measures the crossover). nvrm_cpu_min_elements_per_thread changes
// it, for that measurement.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 15;
std::atomic<int64_t> min_elements_per_thread{kMinElementsPerThread};

// How many threads a launch uses: torch's intra-op thread count (num_threads), but no more than
// one per kMinElementsPerThread elements and one per block.
int launch_threads(const int64_t* ints, const int64_t* blocks, int64_t num_blocks,
                   int64_t block_size, int num_threads) {
  const int64_t wanted = std::min<int64_t>(num_threads, num_blocks);
  const int64_t least = min_elements_per_thread.load(std::memory_order_relaxed);
  int64_t elements = 0;
  for (int64_t b = 0; b < num_blocks && elements < wanted * least; ++b) {
    const int64_t* row = ints + blocks[nvrm::kBlockColumns * b + nvrm::kBlockRow] * nvrm::kIntColumns;
    const int64_t start = blocks[nvrm::kBlockColumns * b + nvrm::kBlockStart];
    const int64_t offset = row[nvrm::kIntOffset];
    elements += std::min(start + block_size, offset + row[nvrm::kIntNumel]) - std::max(start, offset);
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, elements / least)));
}

std::string at_row(int64_t r, const std::string& what) {
  return "table row " + std::to_string(r) + ": " + what;
}

// Below 2^53 a float64 counter is an exact integer, and one more step stays exact.
constexpr double kMaxCounter = 9007199254740992.0;

bool is_count(double x, double limit) { return x >= 0.0 && x < limit && x == floor(x); }

// Everything the kernel dereferences, divides by or converts, row by row, before anything is
// read through a table address or written: O(rows + blocks), never O(elements). What no table
// can tell -- whether an address holds numel elements -- is the Python side's to check (it
// builds the rows from live tensors); here an address must at least be present where the row's
// op uses it and aligned for its element type.
std::string invalid_tables(int op, int dtype_code, const int64_t* ints, const float* floats,
                           int64_t num_rows, const int64_t* blocks, int64_t num_blocks) {
  using namespace nvrm;
  const int64_t element_bytes = storage_bytes(dtype_code);
  constexpr int64_t kMaxExtent = int64_t{1} << 58;  // no index, byte offset or block end overflows
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t* row = ints + r * kIntColumns;
    const float* frow = floats + r * kFloatColumns;
    const int64_t numel = row[kIntNumel], offset = row[kIntOffset], flags = row[kIntFlags];
    if (numel < 0 || numel > kMaxExtent) {
      return at_row(r, "numel " + std::to_string(numel) + " out of range");
    }
    if (offset < 0 || offset > kMaxExtent) {
      return at_row(r, "offset " + std::to_string(offset) + " out of range");
    }
    const int64_t new_type = (flags >> kFlagNewTypeShift) & kNoiseTypeMask;
    int64_t old_type = (flags >> kFlagOldTypeShift) & kNoiseTypeMask;
    uint64_t old_step = static_cast<uint32_t>(row[kIntOldStep]);
    float old_scale = frow[kFloatOldScale];
    if (row[kIntLive] != 0) {  // the kernel resolves the row from its live counters
      if (row[kIntLive] % static_cast<int64_t>(alignof(double)) != 0) {
        return at_row(r, "misaligned live counters");
      }
      const int64_t num_iters = row[kIntNumIters];
      if (num_iters < 1) {
        return at_row(r, "num_iters must be at least 1, got " + std::to_string(num_iters));
      }
      const double* live = reinterpret_cast<const double*>(row[kIntLive]);
      if (!is_count(live[kLiveStep], kMaxCounter)) {
        return at_row(r, "step counter is not a count below 2^53");
      }
      if (!is_count(live[kLiveNoiseStep], kMaxCounter)) {
        return at_row(r, "noise step counter is not a count below 2^53");
      }
      if (!is_count(live[kLiveNoiseType], 3.0)) {
        return at_row(r, "noise type counter is not 0, 1 or 2");
      }
      const double scale = live[kLiveNoiseScale];
      if (!(fabs(scale) <= 3.4028234663852886e38)) {  // FLT_MAX; NaN fails too
        return at_row(r, "noise scale counter is not a finite float32");
      }
      old_type = static_cast<int64_t>(live[kLiveNoiseType]);
      old_step = static_cast<uint32_t>(static_cast<int64_t>(live[kLiveNoiseStep]));
      old_scale = static_cast<float>(scale);
    }
    if (old_type > kUniform || new_type > kUniform) {
      return at_row(r, "noise type codes " + std::to_string(old_type) + ", " +
                           std::to_string(new_type) + " (old, new) must be 0, 1 or 2");
    }
    // A non-finite scale would put non-finite values on every weight of the row, for good (the
    // new scale is the group's variability even at a step that adds no noise).
    if (old_step != 0 && !isfinite(old_scale)) {
      return at_row(r, "the old noise scale is not finite");
    }
    if (!isfinite(frow[kFloatNewScale])) return at_row(r, "the new noise scale is not finite");
    if (numel == 0) continue;
    const bool momentum = (flags & kFlagMomentum) != 0, amsgrad = (flags & kFlagAmsgrad) != 0;
    static constexpr int kColumns[] = {kIntParam, kIntGrad, kIntState0, kIntState1, kIntState2, kIntComp};
    static constexpr const char* kNames[] = {"parameter", "gradient", "first state", "second state",
                                             "third state", "compensation"};
    const bool needed[] = {true, op != kOpNoise, (op == kOpSgd && momentum) || op == kOpAdam,
                           op == kOpAdam, op == kOpAdam && amsgrad, false};
    bool fine = true;  // one branch-free pass; the loop below only finds the culprit
    for (int i = 0; i < 6; ++i) {
      const int64_t address = row[kColumns[i]];
      fine &= !(address == 0 && needed[i]) & ((address & (element_bytes - 1)) == 0);
    }
    for (int i = 0; !fine && i < 6; ++i) {
      const int64_t address = row[kColumns[i]];
      if (address == 0 && needed[i]) return at_row(r, std::string("null ") + kNames[i] + " address");
      if ((address & (element_bytes - 1)) != 0) {  // element_bytes is 2, 4 or 8
        return at_row(r, std::string("misaligned ") + kNames[i] + " address");
      }
    }
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t table_row = blocks[kBlockColumns * b + kBlockRow];
    const int64_t start = blocks[kBlockColumns * b + kBlockStart];
    if (table_row < 0 || table_row >= num_rows) {
      return "block " + std::to_string(b) + ": table row " + std::to_string(table_row) +
             " outside [0, " + std::to_string(num_rows) + ")";
    }
    const int64_t* row = ints + table_row * kIntColumns;
    const int64_t offset = row[kIntOffset], numel = row[kIntNumel];
    // Philox quads never straddle blocks, and a block starts inside its tensor or in the quad
    // before it (tables.build_block_table).
    if (start % 4 != 0 || start < offset - offset % 4 || start >= offset + numel) {
      return "block " + std::to_string(b) + ": start " + std::to_string(start) +
             " is not a quad inside [" + std::to_string(offset) + ", " +
             std::to_string(offset + numel) + ") of table row " + std::to_string(table_row);
    }
  }
  return {};
}

// One multi-threaded launch: every thread claims blocks one at a time until none are left.
struct CpuJob {
  CpuLaunch launch;
  int op, dtype_code;
  const int64_t* ints;
  const float* floats;
  const int64_t* blocks;
  int64_t num_blocks, block_size;
  uint64_t seed;
  const float* grad_scale;
  std::atomic<int64_t> next{0};

  static void work(void* context) {
    CpuJob& job = *static_cast<CpuJob*>(context);
    for (int64_t b; (b = job.next.fetch_add(1, std::memory_order_relaxed)) < job.num_blocks;) {
      job.launch(job.op, job.dtype_code, job.ints, job.floats, job.blocks, b, b + 1,
                 job.block_size, job.seed, job.grad_scale);
    }
  }
};
}  // namespace
#endif

extern "C" {

__attribute__((visibility("default"))) int nvrm_abi_version(void) { return kAbiVersion; }

__attribute__((visibility("default"))) const char* nvrm_last_error(void) {
  return last_error.c_str();
}

// The table layout compiled in, for the loader to compare with nvrm_ext/backends/tables.py:
// INT_COLUMNS, FLOAT_COLUMNS, the seven flag bits, OP_SGD, OP_ADAM, OP_NOISE, then the live
// counters: I_LIVE, I_NUM_ITERS, LIVE_COLUMNS; then SAMPLE_SIZE, the block table's B_ROW, B_START,
// BLOCK_COLUMNS and NOISE_TYPE_MASK; then the storage dtype codes of float32, float16, bfloat16
// and float64.
__attribute__((visibility("default"))) int nvrm_table_layout(int64_t* out, int capacity) {
  const int64_t layout[] = {nvrm::kIntColumns,     nvrm::kFloatColumns,  nvrm::kFlagWeightDecay,
                            nvrm::kFlagMomentum,   nvrm::kFlagMomentumInit, nvrm::kFlagNesterov,
                            nvrm::kFlagAmsgrad,    nvrm::kFlagDecoupled, nvrm::kFlagKeepNoise,
                            nvrm::kOpSgd,          nvrm::kOpAdam,        nvrm::kOpNoise,
                            nvrm::kIntLive,        nvrm::kIntNumIters,   nvrm::kLiveColumns,
                            nvrm::kSampleSize,     nvrm::kBlockRow,      nvrm::kBlockStart,
                            nvrm::kBlockColumns,   nvrm::kNoiseTypeMask,
                            nvrm::kStorageFloat32, nvrm::kStorageFloat16, nvrm::kStorageBFloat16,
                            nvrm::kStorageFloat64};
  const int count = static_cast<int>(sizeof layout / sizeof layout[0]);
  for (int i = 0; i < count && i < capacity; ++i) out[i] = layout[i];
  return count;
}

#if defined(NVRM_API_CUDA)

// 0 when a CUDA device can be used, else nonzero with the reason in nvrm_last_error().
__attribute__((visibility("default"))) int nvrm_cuda_probe(void) {
  std::string error = nvrm::cuda::probe();
  return error.empty() ? 0 : fail(std::move(error));
}

// Tables, grad_scale and found_inf live in device memory; `stream` is the cudaStream_t to
// launch on. grad_scale / found_inf may be null; commit_rows, sample_rows, samples: see
// nvrm_cpu_launch (samples in device memory).
// The tables' contents are not checked here: they are in device memory (the Python side checks
// the host tables it uploads where it has them).
__attribute__((visibility("default"))) int nvrm_cuda_launch(
    int op, int dtype_code, const int64_t* ints, const float* floats, int64_t num_rows,
    const int64_t* blocks, int64_t num_blocks, int64_t block_size, uint64_t seed,
    int64_t commit_rows, const float* grad_scale, const float* found_inf, int64_t sample_rows,
    void* samples, void* stream) {
  std::string error = invalid_arguments(op, dtype_code, ints, floats, num_rows, blocks, num_blocks,
                                        block_size, commit_rows, sample_rows, samples);
  if (!error.empty()) return refuse(std::move(error));
  if (num_blocks > 0 || commit_rows > 0 || sample_rows > 0) {
    error = nvrm::cuda::launch(op, dtype_code, ints, floats, blocks, num_blocks, block_size, seed,
                               commit_rows, grad_scale, found_inf, sample_rows, samples, stream);
  }
  return error.empty() ? 0 : fail(std::move(error));
}

#else

// The instruction-set variant in use: "avx2_fma" or "baseline".
__attribute__((visibility("default"))) const char* nvrm_cpu_variant(void) {
  return cpu_variant.name;
}

// Selects a variant by name (tests compare them bit for bit); nonzero if this CPU cannot run it.
__attribute__((visibility("default"))) int nvrm_cpu_select_variant(const char* name) {
  const std::string wanted = name == nullptr ? "" : name;
  if (wanted == "baseline") {
    cpu_variant = {"baseline", nvrm::cpu::launch_baseline};
  } else if (wanted == "avx2_fma" && cpu_has_avx2_fma()) {
    cpu_variant = {"avx2_fma", nvrm::cpu::launch_avx2_fma};
  } else {
    return fail("CPU variant '" + wanted + "' is unknown or not supported by this CPU");
  }
  return 0;
}

// The least elements per thread before a launch uses a second thread: sets it when value > 0,
// returns the value in force before. For benchmarks that measure where threads start to pay.
__attribute__((visibility("default"))) int64_t nvrm_cpu_min_elements_per_thread(int64_t value) {
  return value > 0 ? min_elements_per_thread.exchange(value)
                   : min_elements_per_thread.load();
}

// Tables, grad_scale and found_inf live in host memory. grad_scale (may be null): gradients are
// divided by it (and written back) before the update. found_inf (may be null): nonzero skips
// the whole launch. commit_rows: rows 0 .. commit_rows-1 carry live counters (I_LIVE) that are
// advanced after the update (the kernel resolved them: capturable mode, and host mode on the CPU);
// 0 otherwise. sample_rows, samples: after the launch (skipped or not), the weight samples of rows
// 0 .. sample_rows-1 (update.h copy_sample) go to `samples`, [sample_rows, kSampleSize] elements
// of the storage dtype; 0 / null for none. num_threads: the most threads to use
// (torch.get_num_threads()); small launches run on the calling thread alone.
// num_rows: the rows of `ints` and `floats`. Returns 0, or kRefused (nothing read through a table
// address, nothing written) with the reason in nvrm_last_error(): the arguments and every table
// row are checked first (invalid_tables).
__attribute__((visibility("default"))) int nvrm_cpu_launch(
    int op, int dtype_code, const int64_t* ints, const float* floats, int64_t num_rows,
    const int64_t* blocks, int64_t num_blocks, int64_t block_size, uint64_t seed,
    int64_t commit_rows, const float* grad_scale, const float* found_inf, int64_t sample_rows,
    void* samples, int num_threads) {
  std::string error = invalid_arguments(op, dtype_code, ints, floats, num_rows, blocks, num_blocks,
                                        block_size, commit_rows, sample_rows, samples);
  if (error.empty()) {
    error = invalid_tables(op, dtype_code, ints, floats, num_rows, blocks, num_blocks);
  }
  if (!error.empty()) return refuse(std::move(error));
  if (num_threads < 1) return refuse("num_threads must be at least 1");
  if (found_inf == nullptr || *found_inf == 0.0f) {  // else GradScaler skips the step
    const int threads = launch_threads(ints, blocks, num_blocks, block_size, num_threads);
    if (threads == 1) {
      cpu_variant.launch(op, dtype_code, ints, floats, blocks, 0, num_blocks, block_size, seed,
                         grad_scale);
    } else {
      CpuJob job{cpu_variant.launch, op, dtype_code, ints, floats, blocks, num_blocks, block_size,
                 seed, grad_scale};
      nvrm::cpu::WorkerPool::instance().run(threads - 1, CpuJob::work, &job);
    }
    for (int64_t r = 0; r < commit_rows; ++r) {
      nvrm::commit_live(ints + r * nvrm::kIntColumns, floats + r * nvrm::kFloatColumns);
    }
  }
  const int element_bytes = nvrm::storage_bytes(dtype_code);
  unsigned char* out = static_cast<unsigned char*>(samples);
  for (int64_t r = 0; r < sample_rows; ++r) {
    for (int64_t j = 0; j < nvrm::kSampleSize; ++j) {
      nvrm::copy_sample(ints + r * nvrm::kIntColumns, j, element_bytes,
                        out + (r * nvrm::kSampleSize + j) * element_bytes);
    }
  }
  return 0;
}

#endif

}  // extern "C"
