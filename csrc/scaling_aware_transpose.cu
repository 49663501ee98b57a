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
// Tile: 128 rows of one split x 128 columns (one k-block), 256 threads. Warp w owns rows 16w..16w+15 and lane l owns
// columns 4l..4l+3 (one 32-bit word per row: each warp load is one 128-byte row segment). Column amax: per thread,
// then across the 8 warps through shared memory. Output: each thread holds, per column, the 16 codes of its 16 rows
// (one 16-byte chunk of an output row); chunks go through a swizzled shared tile and leave as 16-byte stores, 8
// threads per 128-byte output row segment.

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "scaling_aware_transpose.h"

namespace fp8flow {
namespace {

constexpr int kBlock = 128;   // 1x128 quantization block
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBlock / kWarps;  // 16
constexpr float kE4M3Max = 448.0f;

// TE's compute_scale_from_amax(force_pow_2_scales=True, epsilon=0): fp32 448/amax with the mantissa cleared; amax
// 0, inf or NaN -> 1; an infinite quotient -> FLT_MAX, cleared to 2^127. (numerics/format.py::scale_from_amax)
__device__ __forceinline__ float scale_from_amax(float amax) {
  if (amax == 0.0f || !isfinite(amax)) return 1.0f;
  float scale = __fdiv_rn(kE4M3Max, amax);
  if (isinf(scale)) scale = FLT_MAX;
  return __int_as_float(__float_as_int(scale) & 0x7F800000);
}

__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes & 0xFFFF), __NV_E4M3);
  return make_float2(__half2float(__ushort_as_half(h.x)), __half2float(__ushort_as_half(h.y)));
}

__device__ __forceinline__ uint32_t float2_to_e4m3x2(float lo, float hi) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ uint32_t code_at(uint32_t word, int j) { return (word >> (8 * j)) & 0xFF; }

// The split that owns global row-block g: the last i with block_start[i] <= g (empty splits share a start).
__device__ __forceinline__ int find_split(const SplitTable& t, int g) {
  int lo = 0, hi = t.num_splits;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (t.block_start[mid] <= g) lo = mid; else hi = mid;
  }
  return lo;
}

template <bool kGemmReadyScales, bool kWordLoads>
__global__ void __launch_bounds__(kThreads) scaling_aware_transpose_kernel(
    // inputs
    const uint8_t* __restrict__ codes, const float* __restrict__ scale_inv,
    // outputs
    uint8_t* __restrict__ out_codes, float* __restrict__ out_scale_inv,
    // sizes
    int K, int num_k_blocks, int scale_row_len,
    // splits covered by this launch
    SplitTable table) {
  __shared__ float s_row_scale_inv[kBlock];
  __shared__ __align__(16) float s_amax[kWarps][kBlock];
  __shared__ __align__(16) uint8_t s_out[kBlock][kBlock];  // [output row = input column][16-byte chunks, swizzled]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = table.block_start[0] + blockIdx.x;
  const int kb = blockIdx.y;
  const int split = find_split(table, g);
  const int m = table.row_start[split + 1] - table.row_start[split];
  const int m_blocks = table.block_start[split + 1] - table.block_start[split];
  const int rb = g - table.block_start[split];
  const int64_t row0 = static_cast<int64_t>(table.row_start[split]) + static_cast<int64_t>(rb) * kBlock;
  const int rows_here = min(kBlock, m - rb * kBlock);
  const int col0 = kb * kBlock;
  const int cols_here = min(kBlock, K - col0);

  // Load: warp w, rows 16w + i; lane l, columns 4l..4l+3 of this k-block.
  const int c_lane = col0 + 4 * lane;
  uint32_t words[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    uint32_t w = 0;
    if (r < rows_here && c_lane < K) {
      const uint8_t* p = codes + (row0 + r) * K + c_lane;
      if (kWordLoads) {
        w = __ldg(reinterpret_cast<const uint32_t*>(p));
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (c_lane + j < K) w |= static_cast<uint32_t>(__ldg(p + j)) << (8 * j);
        }
      }
    }
    words[i] = w;
  }
  if (threadIdx.x < kBlock) {
    const int r = threadIdx.x;
    s_row_scale_inv[r] = r < rows_here ? __ldg(scale_inv + (row0 + r) * num_k_blocks + kb) : 1.0f;
  }
  __syncthreads();

  // Column amax of the dequantized values. fmaxf drops NaN, so NaN is tracked apart and counted as inf: both give
  // scale 1 (numerics: a block holding NaN or an infinite value is scaled by 1).
  float amax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  uint32_t nan_bytes = 0;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const float rs = s_row_scale_inv[warp * kRowsPerWarp + i];
    nan_bytes |= __vcmpeq4(words[i] & 0x7F7F7F7Fu, 0x7F7F7F7Fu);
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

  float col_scale[4];
  {
    float4 a = *reinterpret_cast<const float4*>(&s_amax[0][4 * lane]);
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 b = *reinterpret_cast<const float4*>(&s_amax[w][4 * lane]);
      a = make_float4(fmaxf(a.x, b.x), fmaxf(a.y, b.y), fmaxf(a.z, b.z), fmaxf(a.w, b.w));
    }
    col_scale[0] = scale_from_amax(a.x);
    col_scale[1] = scale_from_amax(a.y);
    col_scale[2] = scale_from_amax(a.z);
    col_scale[3] = scale_from_amax(a.w);
  }

  // Column scales: compact [K, m_blocks] per split, or GEMM-ready [m_blocks, pad4(K)] (TE's 1x128 column-wise
  // scale_inv layout; the pad columns are written as 0).
  if (warp == 0 && c_lane < K) {
    float sinv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) sinv[j] = c_lane + j < K ? __fdiv_rn(1.0f, col_scale[j]) : 0.0f;
    if (kGemmReadyScales) {
      float* dst = out_scale_inv + static_cast<int64_t>(scale_row_len) * (table.block_start[split] + rb) + c_lane;
      *reinterpret_cast<float4*>(dst) = make_float4(sinv[0], sinv[1], sinv[2], sinv[3]);
    } else {
      float* dst = out_scale_inv + static_cast<int64_t>(K) * table.block_start[split] + rb;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (c_lane + j < K) dst[static_cast<int64_t>(c_lane + j) * m_blocks] = sinv[j];
      }
    }
  }

  // Requantize with the column scales, transposed: per column j, 16 codes (rows 16w..16w+15) = one 16-byte chunk.
  const bool any_nan = nan_bytes != 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t chunk[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t packed = 0;
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int i = 4 * q + 2 * p;
        const uint32_t c0 = code_at(words[i], j), c1 = code_at(words[i + 1], j);
        const float2 v = e4m3x2_to_float2(c0 | (c1 << 8));
        const float rs0 = s_row_scale_inv[warp * kRowsPerWarp + i];
        const float rs1 = s_row_scale_inv[warp * kRowsPerWarp + i + 1];
        // Two products, not one by rs*scale: that could overflow to inf and turn a zero code into NaN.
        uint32_t two = float2_to_e4m3x2((v.x * rs0) * col_scale[j], (v.y * rs1) * col_scale[j]);
        if (any_nan) {  // NaN codes pass through with their sign (numerics: 0x7F | sign << 7)
          if ((c0 & 0x7F) == 0x7F) two = (two & 0xFF00) | c0;
          if ((c1 & 0x7F) == 0x7F) two = (two & 0x00FF) | (c1 << 8);
        }
        packed |= two << (16 * p);
      }
      chunk[q] = packed;
    }
    const int out_row = 4 * lane + j;
    const int pos = warp ^ (lane & 7);  // swizzle: the 8 lanes of a 16-byte store phase hit distinct banks
    *reinterpret_cast<uint4*>(&s_out[out_row][16 * pos]) = make_uint4(chunk[0], chunk[1], chunk[2], chunk[3]);
  }
  __syncthreads();

  // Store: output row c (= input column col0 + c) of this split, bytes rb*128 .. rb*128+rows_here.
  uint8_t* out_split = out_codes + static_cast<int64_t>(K) * table.row_start[split];
  const bool aligned16 = (m % 16 == 0) && ((reinterpret_cast<uintptr_t>(out_split) & 15) == 0);
#pragma unroll
  for (int it = 0; it < (kBlock * kBlock / 16) / kThreads; ++it) {
    const int idx = it * kThreads + threadIdx.x;
    const int c = idx >> 3;
    const int chunk = idx & 7;
    const int r0 = chunk * 16;
    if (c >= cols_here || r0 >= rows_here) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(&s_out[c][16 * (chunk ^ ((c >> 2) & 7))]);
    uint8_t* dst = out_split + static_cast<int64_t>(col0 + c) * m + static_cast<int64_t>(rb) * kBlock + r0;
    if (aligned16 && r0 + 16 <= rows_here) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      const uint32_t vw[4] = {v.x, v.y, v.z, v.w};
      for (int b = 0; b < 16 && r0 + b < rows_here; ++b) dst[b] = static_cast<uint8_t>(code_at(vw[b >> 2], b & 3));
    }
  }
}

}  // namespace

cudaError_t launch_scaling_aware_transpose(const uint8_t* codes, const float* scale_inv, int K, uint8_t* out_codes,
                                           float* out_scale_inv, bool gemm_ready_scales, const SplitTable& table,
                                           cudaStream_t stream) {
  const int num_blocks = table.block_start[table.num_splits] - table.block_start[0];
  const int num_k_blocks = (K + kBlock - 1) / kBlock;
  if (num_blocks == 0 || num_k_blocks == 0) return cudaSuccess;
  const dim3 grid(num_blocks, num_k_blocks);
  const int scale_row_len = (K + 3) / 4 * 4;
  const bool word_loads = (K % 4 == 0) && ((reinterpret_cast<uintptr_t>(codes) & 3) == 0);
  if (gemm_ready_scales) {
    if (word_loads) {
      scaling_aware_transpose_kernel<true, true><<<grid, kThreads, 0, stream>>>(
          codes, scale_inv, out_codes, out_scale_inv, K, num_k_blocks, scale_row_len, table);
    } else {
      scaling_aware_transpose_kernel<true, false><<<grid, kThreads, 0, stream>>>(
          codes, scale_inv, out_codes, out_scale_inv, K, num_k_blocks, scale_row_len, table);
    }
  } else {
    if (word_loads) {
      scaling_aware_transpose_kernel<false, true><<<grid, kThreads, 0, stream>>>(
          codes, scale_inv, out_codes, out_scale_inv, K, num_k_blocks, scale_row_len, table);
    } else {
      scaling_aware_transpose_kernel<false, false><<<grid, kThreads, 0, stream>>>(
          codes, scale_inv, out_codes, out_scale_inv, K, num_k_blocks, scale_row_len, table);
    }
  }
  return cudaGetLastError();
}

}  // namespace fp8flow
