// Host interface of the scaling-aware transpose kernel (no torch headers, so the .cu compiles fast).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fp8flow {

// Splits handled by one launch, passed by value as a kernel argument (2 KiB, under the classic 4 KiB limit). The
// host wrapper launches once per kMaxSplitsPerLaunch splits (one launch for any realistic expert count).
constexpr int kMaxSplitsPerLaunch = 255;

struct SplitTable {
  int num_splits;
  int row_start[kMaxSplitsPerLaunch + 1];    // first input row of each split; row_start[num_splits] = its end
  int block_start[kMaxSplitsPerLaunch + 1];  // first 128-row block of each split, counted over all splits
};

// The same splits read from device memory (the sync-free path): row_start and block_start are int64 [num_splits + 1]
// on the device (block_start[i + 1] - block_start[i] = ceil(m_i / 128)); any number of splits in one launch.
struct DeviceSplitTable {
  const int64_t* row_start;
  const int64_t* block_start;
  int num_splits;
};

// codes [M, K] uint8 (E4M3), scale_inv [M, ceil(K/128)] fp32 (compact row-wise). Writes, per split i,
// out_codes[K * row_start[i] ...] = [K, m_i] and out_scale_inv at K * block_start[i] ([K, ceil(m_i/128)], compact)
// or at pad4(K) * block_start[i] ([ceil(m_i/128), pad4(K)], GEMM-ready).
cudaError_t launch_scaling_aware_transpose(const uint8_t* codes, const float* scale_inv, int K, uint8_t* out_codes,
                                           float* out_scale_inv, bool gemm_ready_scales, const SplitTable& table,
                                           cudaStream_t stream);

// As launch_scaling_aware_transpose, the splits read from device memory: a grid of max_blocks 128-row blocks (>= the
// real block_start[num_splits]); CTAs past the real end exit. Input rows past row_start[num_splits] are never read,
// outputs past the splits' extents never written.
cudaError_t launch_scaling_aware_transpose_device(const uint8_t* codes, const float* scale_inv, int K,
                                                  uint8_t* out_codes, float* out_scale_inv, bool gemm_ready_scales,
                                                  const DeviceSplitTable& table, int max_blocks, cudaStream_t stream);

}  // namespace fp8flow
