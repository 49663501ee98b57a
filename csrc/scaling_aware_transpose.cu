// Scaling-aware transpose: row-wise 1x128 E4M3 -> column-wise (the 1x128 tensor of the transpose), all expert splits
// in one launch. The spec is fp8flow_megatron/numerics/transpose.py; this kernel is bit-identical to it.
//
// Why fp32 arithmetic is exact here. Every scale is a power of two, so the dequantized value code * scale_inv is an
// exact fp32 number (an E4M3 significand has 4 bits; the exponent stays within fp32's range down to 2^-136, in the
// subnormals, unless it overflows to inf, which the spec also does) and multiplying it by the new power-of-two column
// scale is the exponent shift. The only rounding is the final fp32 -> E4M3 conversion (cvt.rn.satfinite: round to
// nearest even into the subnormals, saturate to 448), which is the single rounding of
// quantize_1x128(dequantize(q).t()), the spec's contract. Nothing is materialized: codes go from registers to
// registers. Built without fast-math: fp32 subnormals must not be flushed.
//
// Work split: a CTA owns 128 rows of one split (a column block of the output) and kKBlocksPerCta consecutive
// 128-column k-blocks, loading the next k-block's codes while it transforms the current one; consecutive CTAs take
// consecutive k-blocks of the same rows, so the GPU reads whole rows at a time. 256 threads: warp w owns rows
// 16w..16w+15, lane l columns 4l..4l+3 (one 32-bit word per row; a warp load is one 128-byte row segment). Column
// amax: per thread, then across the 8 warps through shared memory; the scale comes from the amax's exponent bits (no
// division). Output: per column, a thread's 16 codes are one 16-byte piece of an output row; pieces go through an
// XOR-swizzled shared tile and leave as 16-byte stores, 8 threads per 128-byte output row segment.
// Configuration from a sweep on H100 (DeepSeek-V2-Lite 16k/32k tokens and 24k x 7168, GEMM-ready scales): 16 rows per
// thread beat 8 and 4 (fewer per-thread fixed costs: the kernel is issue-bound, ncu: 86% issue-active), 2 k-blocks
// per CTA beat 1 and 4, 4 CTAs per SM (64 registers) beat 3, k-blocks-fastest CTA order beat rows-fastest by 3-5%.

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "scaling_aware_transpose.h"

namespace fp8flow {
namespace {

constexpr int kBlock = 128;         // 1x128 quantization block
constexpr int kRowsPerThread = 16;  // one 32-bit word (4 columns) per row
constexpr int kKBlocksPerCta = 2;
constexpr int kMinCtasPerSm = 4;
constexpr int kThreads = 32 * kBlock / kRowsPerThread;

// Low 16 bits: two E4M3 codes -> two floats (exact: E4M3 -> f16 -> f32 are widenings).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_codes) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes), __NV_E4M3);
  __half2 h;
  memcpy(&h, &raw, sizeof(h));
  return __half22float2(h);
}

__device__ __forceinline__ uint32_t float2_to_e4m3x2(float lo, float hi) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ uint32_t code_at(uint32_t word, int j) { return (word >> (8 * j)) & 0xFF; }

// The spec's scale rule for an amax that has at most 4 significant bits (an E4M3 value times a power of two):
// amax = (8 + f) / 8 * 2^e makes fl32(448 / amax) floored to a power of two exactly 2^(8 - e - (f == 7)) (14 / (8 + f)
// is never within 2^-24 of a power of two unless it is one), capped at 2^127 (TE: an infinite quotient becomes
// FLT_MAX, cleared to 2^127); an fp32-subnormal amax overflows the quotient (2^127); amax 0 or inf (a NaN in the block
// is folded in as inf) -> 2^0. Equal to scale_from_amax's fdiv rule on such values, without the division.
__device__ __forceinline__ int scale_exp_from_amax(float amax) {
  const int bits = __float_as_int(amax);
  if (bits == 0 || bits >= 0x7F800000) return 0;
  const int field = bits >> 23;
  if (field == 0) return 127;
  return min(127, 135 - field - (((bits >> 20) & 7) == 7 ? 1 : 0));
}

__device__ __forceinline__ float pow2f(int e) {  // 2^e for -127 <= e <= 127
  return e >= -126 ? __int_as_float((e + 127) << 23) : __int_as_float(1 << (e + 149));
}

// The two ways a launch learns its splits: a SplitTable passed by value (host-known m_splits, at most
// kMaxSplitsPerLaunch per launch) or a DeviceSplitTable whose starts are read from device memory (the sync-free path:
// the host never sees the counts; the grid covers a worst-case number of row blocks and CTAs past the real end exit).
__device__ __forceinline__ int row_start_of(const SplitTable& t, int i) { return t.row_start[i]; }
__device__ __forceinline__ int block_start_of(const SplitTable& t, int i) { return t.block_start[i]; }
__device__ __forceinline__ int first_block_of(const SplitTable& t) { return t.block_start[0]; }
__device__ __forceinline__ int row_start_of(const DeviceSplitTable& t, int i) {
  return static_cast<int>(__ldg(t.row_start + i));
}
__device__ __forceinline__ int block_start_of(const DeviceSplitTable& t, int i) {
  return static_cast<int>(__ldg(t.block_start + i));
}
__device__ __forceinline__ int first_block_of(const DeviceSplitTable&) { return 0; }

// The split that owns global row-block g: the last i with block_start[i] <= g (empty splits share a start).
template <typename Table>
__device__ __forceinline__ int find_split(const Table& t, int g) {
  int lo = 0, hi = t.num_splits;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (block_start_of(t, mid) <= g) lo = mid; else hi = mid;
  }
  return lo;
}

// Column j of a thread's kRows x 4 codes, requantized: (code * row scale_inv) * column scale, RNE to E4M3, packed
// four rows per word (kRows bytes = one piece of an output row). kNaN: NaN codes pass through with their sign
// (numerics: 0x7F | sign << 7); the cvt alone would drop the sign.
template <int kRows, bool kNaN>
__device__ __forceinline__ void requant_column(const uint32_t (&words)[kRows], int j, const float* row_scale_inv,
                                               float scale, uint32_t (&piece)[kRows / 4]) {
#pragma unroll
  for (int q = 0; q < kRows / 4; ++q) {
    uint32_t two[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int i = 4 * q + 2 * p;
      const uint32_t pair = __byte_perm(words[i], words[i + 1], j | ((j + 4) << 4));  // byte j of rows i, i + 1
      const float2 v = e4m3x2_to_float2(pair);
      // Two products, not one by row_scale_inv * scale: that could overflow to inf and turn a zero code into NaN.
      two[p] = float2_to_e4m3x2((v.x * row_scale_inv[i]) * scale, (v.y * row_scale_inv[i + 1]) * scale);
      if (kNaN) {
        const uint32_t c0 = pair & 0xFF, c1 = (pair >> 8) & 0xFF;
        if ((c0 & 0x7F) == 0x7F) two[p] = (two[p] & 0xFF00) | c0;
        if ((c1 & 0x7F) == 0x7F) two[p] = (two[p] & 0x00FF) | (c1 << 8);
      }
    }
    piece[q] = __byte_perm(two[0], two[1], 0x5410);
  }
}

template <bool kGemmReadyScales, bool kWordLoads, typename Table>
__global__ void __launch_bounds__(32 * kBlock / kRowsPerThread, kMinCtasPerSm) scaling_aware_transpose_kernel(
    // inputs
    const uint8_t* __restrict__ codes, const float* __restrict__ scale_inv,
    // outputs
    uint8_t* __restrict__ out_codes, float* __restrict__ out_scale_inv,
    // sizes
    int K, int num_k_blocks, int scale_row_len,
    // splits covered by this launch
    Table table) {
  constexpr int kRows = kRowsPerThread;
  constexpr int kKBlocks = kKBlocksPerCta;
  constexpr int kWarps = kBlock / kRows;
  constexpr int kPiecesPerSlot = 16 / kRows;  // a 16-byte slot of an output row holds 16 rows: kRows per warp
  __shared__ float s_row_scale_inv[2][kBlock];
  __shared__ __align__(16) float s_amax[kWarps][kBlock];
  __shared__ __align__(16) uint8_t s_out[kBlock][kBlock];  // [output row = input column][16-byte slots, swizzled]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_k_groups = (num_k_blocks + kKBlocks - 1) / kKBlocks;
  const int k_group = static_cast<int>(blockIdx.x % num_k_groups);
  const int g = first_block_of(table) + static_cast<int>(blockIdx.x / num_k_groups);  // global 128-row block
  // Past the last split's blocks: only a DeviceSplitTable's worst-case grid has such CTAs (the whole CTA leaves,
  // before any barrier).
  if (g >= block_start_of(table, table.num_splits)) return;
  const int split = find_split(table, g);
  const int split_row0 = row_start_of(table, split);
  const int split_block0 = block_start_of(table, split);
  const int m = row_start_of(table, split + 1) - split_row0;
  const int m_blocks = block_start_of(table, split + 1) - split_block0;
  const int rb = g - split_block0;
  const int64_t row0 = static_cast<int64_t>(split_row0) + static_cast<int64_t>(rb) * kBlock;
  const int rows_here = min(kBlock, m - rb * kBlock);
  uint8_t* out_split = out_codes + static_cast<int64_t>(K) * split_row0;
  const bool aligned16 = (m % 16 == 0) && ((reinterpret_cast<uintptr_t>(out_split) & 15) == 0);
  const int kb_first = k_group * kKBlocks;
  const int kb_end = min(num_k_blocks, kb_first + kKBlocks);

  // Load of one tile: warp w, rows kRows*w + i; lane l, columns 4l..4l+3 of k-block kb.
  auto load_tile = [&](int kb, uint32_t (&words)[kRows], float& row_scale) {
    const int c = kb * kBlock + 4 * lane;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = warp * kRows + i;
      uint32_t w = 0;
      if (r < rows_here && c < K) {
        const uint8_t* p = codes + (row0 + r) * K + c;
        if (kWordLoads) {
          w = __ldg(reinterpret_cast<const uint32_t*>(p));
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (c + j < K) w |= static_cast<uint32_t>(__ldg(p + j)) << (8 * j);
          }
        }
      }
      words[i] = w;
    }
    row_scale = 1.0f;
    if (threadIdx.x < rows_here) row_scale = __ldg(scale_inv + (row0 + threadIdx.x) * num_k_blocks + kb);
  };

  uint32_t words[kRows], next_words[kRows];
  float row_scale, next_row_scale;
  load_tile(kb_first, words, row_scale);

  for (int kb = kb_first; kb < kb_end; ++kb) {
    const int buf = (kb - kb_first) & 1;
    if (threadIdx.x < kBlock) s_row_scale_inv[buf][threadIdx.x] = row_scale;
    if (kb + 1 < kb_end) load_tile(kb + 1, next_words, next_row_scale);  // in flight during this tile's work
    const int col0 = kb * kBlock;
    const int cols_here = min(kBlock, K - col0);
    const int c_lane = col0 + 4 * lane;
    __syncthreads();

    // Column amax of the dequantized values. fmaxf drops NaN, so NaN codes are flagged apart ((mag + 1) reaches
    // 0x80 only for mag 0x7F) and counted as inf: both give scale 1 (numerics: a block holding NaN or an infinite
    // value is scaled by 1).
    float amax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    uint32_t nan_bytes = 0;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const float rs = s_row_scale_inv[buf][warp * kRows + i];
      nan_bytes |= ((words[i] & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u;
      const float2 lo = e4m3x2_to_float2(words[i]);
      const float2 hi = e4m3x2_to_float2(words[i] >> 16);
      amax[0] = fmaxf(amax[0], fabsf(lo.x * rs));
      amax[1] = fmaxf(amax[1], fabsf(lo.y * rs));
      amax[2] = fmaxf(amax[2], fabsf(hi.x * rs));
      amax[3] = fmaxf(amax[3], fabsf(hi.y * rs));
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (code_at(nan_bytes, j)) amax[j] = INFINITY;
    }
    *reinterpret_cast<float4*>(&s_amax[warp][4 * lane]) = make_float4(amax[0], amax[1], amax[2], amax[3]);
    __syncthreads();
    int scale_exp[4];
    {
      float4 a = *reinterpret_cast<const float4*>(&s_amax[0][4 * lane]);
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        const float4 b = *reinterpret_cast<const float4*>(&s_amax[w][4 * lane]);
        a = make_float4(fmaxf(a.x, b.x), fmaxf(a.y, b.y), fmaxf(a.z, b.z), fmaxf(a.w, b.w));
      }
      scale_exp[0] = scale_exp_from_amax(a.x);
      scale_exp[1] = scale_exp_from_amax(a.y);
      scale_exp[2] = scale_exp_from_amax(a.z);
      scale_exp[3] = scale_exp_from_amax(a.w);
    }
    float col_scale[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) col_scale[j] = pow2f(scale_exp[j]);

    // Column scales: compact [K, m_blocks] per split, or GEMM-ready [m_blocks, pad4(K)] (TE's 1x128 column-wise
    // scale_inv layout; the pad columns are written as 0).
    if (warp == 0 && c_lane < K) {
      float sinv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) sinv[j] = c_lane + j < K ? pow2f(-scale_exp[j]) : 0.0f;
      if (kGemmReadyScales) {
        float* dst = out_scale_inv + static_cast<int64_t>(scale_row_len) * (split_block0 + rb) + c_lane;
        *reinterpret_cast<float4*>(dst) = make_float4(sinv[0], sinv[1], sinv[2], sinv[3]);
      } else {
        float* dst = out_scale_inv + static_cast<int64_t>(K) * split_block0 + rb;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (c_lane + j < K) dst[static_cast<int64_t>(c_lane + j) * m_blocks] = sinv[j];
        }
      }
    }

    // Requantize with the column scales, transposed: per column j, the kRows codes of this warp's rows are one piece
    // of a 16-byte slot of output row 4l + j. Slots are XOR-swizzled by (l & 7) so a store phase spreads over banks.
    const bool any_nan = nan_bytes != 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t piece[kRows / 4];
      const float* rs = &s_row_scale_inv[buf][warp * kRows];
      if (any_nan) {
        requant_column<kRows, true>(words, j, rs, col_scale[j], piece);
      } else {
        requant_column<kRows, false>(words, j, rs, col_scale[j], piece);
      }
      const int out_row = 4 * lane + j;
      const int slot = (warp / kPiecesPerSlot) ^ (lane & 7);
      uint8_t* dst = &s_out[out_row][16 * slot + kRows * (warp % kPiecesPerSlot)];
      if constexpr (kRows == 16) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(piece[0], piece[1], piece[2], piece[3]);
      } else if constexpr (kRows == 8) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(piece[0], piece[1]);
      } else {
        *reinterpret_cast<uint32_t*>(dst) = piece[0];
      }
    }
    __syncthreads();

    // Store: output row c (= input column col0 + c) of this split, bytes rb*128 .. rb*128+rows_here.
#pragma unroll
    for (int it = 0; it < (kBlock * kBlock / 16 + kThreads - 1) / kThreads; ++it) {
      const int idx = it * kThreads + threadIdx.x;
      const int c = idx >> 3;
      const int chunk = idx & 7;
      const int r0 = chunk * 16;
      if (idx >= kBlock * kBlock / 16 || c >= cols_here || r0 >= rows_here) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(&s_out[c][16 * (chunk ^ ((c >> 2) & 7))]);
      uint8_t* dst = out_split + static_cast<int64_t>(col0 + c) * m + static_cast<int64_t>(rb) * kBlock + r0;
      if (aligned16 && r0 + 16 <= rows_here) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
        const uint32_t vw[4] = {v.x, v.y, v.z, v.w};
        for (int b = 0; b < 16 && r0 + b < rows_here; ++b) dst[b] = static_cast<uint8_t>(code_at(vw[b >> 2], b & 3));
      }
    }
    if (kb + 1 < kb_end) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) words[i] = next_words[i];
      row_scale = next_row_scale;
    }
  }
}

}  // namespace

namespace {

template <typename Table>
cudaError_t launch(const uint8_t* codes, const float* scale_inv, int K, uint8_t* out_codes, float* out_scale_inv,
                   bool gemm_ready_scales, const Table& table, int num_blocks, cudaStream_t stream) {
  const int num_k_blocks = (K + kBlock - 1) / kBlock;
  if (num_blocks == 0 || num_k_blocks == 0) return cudaSuccess;
  const int num_k_groups = (num_k_blocks + kKBlocksPerCta - 1) / kKBlocksPerCta;
  const dim3 grid(num_blocks * num_k_groups);
  const int scale_row_len = (K + 3) / 4 * 4;
  const bool word_loads = (K % 4 == 0) && ((reinterpret_cast<uintptr_t>(codes) & 3) == 0);
#define FP8FLOW_LAUNCH(GEMM_READY, WORD_LOADS)                                                           \
  scaling_aware_transpose_kernel<GEMM_READY, WORD_LOADS, Table><<<grid, kThreads, 0, stream>>>(        \
      codes, scale_inv, out_codes, out_scale_inv, K, num_k_blocks, scale_row_len, table)
  if (gemm_ready_scales) {
    if (word_loads) FP8FLOW_LAUNCH(true, true); else FP8FLOW_LAUNCH(true, false);
  } else {
    if (word_loads) FP8FLOW_LAUNCH(false, true); else FP8FLOW_LAUNCH(false, false);
  }
#undef FP8FLOW_LAUNCH
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scaling_aware_transpose(const uint8_t* codes, const float* scale_inv, int K, uint8_t* out_codes,
                                           float* out_scale_inv, bool gemm_ready_scales, const SplitTable& table,
                                           cudaStream_t stream) {
  const int num_blocks = table.block_start[table.num_splits] - table.block_start[0];
  return launch(codes, scale_inv, K, out_codes, out_scale_inv, gemm_ready_scales, table, num_blocks, stream);
}

cudaError_t launch_scaling_aware_transpose_device(const uint8_t* codes, const float* scale_inv, int K,
                                                  uint8_t* out_codes, float* out_scale_inv, bool gemm_ready_scales,
                                                  const DeviceSplitTable& table, int max_blocks,
                                                  cudaStream_t stream) {
  if (table.num_splits == 0) return cudaSuccess;
  return launch(codes, scale_inv, K, out_codes, out_scale_inv, gemm_ready_scales, table, max_blocks, stream);
}

}  // namespace fp8flow
