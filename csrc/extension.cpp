// Torch binding of fp8flow_megatron's CUDA kernels (module fp8flow_megatron._fp8flow_cuda). Allocation and the
// per-split views stay in Python (fp8flow_megatron/kernels/transpose.py); this file checks and launches.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "scaling_aware_transpose.h"

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void scaling_aware_transpose(const at::Tensor& codes, const at::Tensor& scale_inv, const std::vector<int64_t>& m_splits,
                             bool gemm_ready_scales, at::Tensor& out_codes, at::Tensor& out_scale_inv) {
  TORCH_CHECK(codes.is_cuda() && scale_inv.is_cuda() && out_codes.is_cuda() && out_scale_inv.is_cuda(),
              "scaling_aware_transpose: all tensors must be CUDA tensors");
  TORCH_CHECK(codes.scalar_type() == at::kByte && out_codes.scalar_type() == at::kByte,
              "scaling_aware_transpose: codes must be viewed as uint8");
  TORCH_CHECK(scale_inv.scalar_type() == at::kFloat && out_scale_inv.scalar_type() == at::kFloat,
              "scaling_aware_transpose: scale_inv must be float32");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous(), "scaling_aware_transpose: codes must be contiguous [M, K]");
  const int64_t M = codes.size(0), K = codes.size(1);
  const int64_t nbk = ceil_div(K, 128);
  TORCH_CHECK(scale_inv.is_contiguous() && scale_inv.dim() == 2 && scale_inv.size(0) == M && scale_inv.size(1) == nbk,
              "scaling_aware_transpose: scale_inv must be contiguous [M, ceil(K/128)] = [", M, ", ", nbk, "], got ",
              scale_inv.sizes());
  TORCH_CHECK(M <= INT_MAX && K <= INT_MAX && nbk <= 65535, "scaling_aware_transpose: shape too large: ", codes.sizes());
  TORCH_CHECK(out_codes.is_contiguous() && out_scale_inv.is_contiguous(),
              "scaling_aware_transpose: outputs must be contiguous");

  int64_t total_rows = 0, total_blocks = 0;
  for (const int64_t m : m_splits) {
    TORCH_CHECK(m >= 0, "scaling_aware_transpose: negative split ", m);
    total_rows += m;
    total_blocks += ceil_div(m, 128);
  }
  TORCH_CHECK(total_rows == M, "scaling_aware_transpose: m_splits sum to ", total_rows, ", expected M=", M);
  TORCH_CHECK(out_codes.numel() == M * K, "scaling_aware_transpose: out_codes must hold M*K bytes");
  const int64_t scale_row_len = gemm_ready_scales ? ceil_div(K, 4) * 4 : K;
  TORCH_CHECK(out_scale_inv.numel() == scale_row_len * total_blocks,
              "scaling_aware_transpose: out_scale_inv must hold ", scale_row_len * total_blocks, " floats");

  const c10::cuda::CUDAGuard guard(codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int num_splits = static_cast<int>(m_splits.size());
  int64_t row = 0, block = 0;
  for (int first = 0; first < num_splits; first += fp8flow::kMaxSplitsPerLaunch) {
    fp8flow::SplitTable table;
    table.num_splits = std::min(fp8flow::kMaxSplitsPerLaunch, num_splits - first);
    for (int i = 0; i < table.num_splits; ++i) {
      table.row_start[i] = static_cast<int>(row);
      table.block_start[i] = static_cast<int>(block);
      row += m_splits[first + i];
      block += ceil_div(m_splits[first + i], 128);
    }
    table.row_start[table.num_splits] = static_cast<int>(row);
    table.block_start[table.num_splits] = static_cast<int>(block);
    const cudaError_t err = fp8flow::launch_scaling_aware_transpose(
        codes.data_ptr<uint8_t>(), scale_inv.data_ptr<float>(), static_cast<int>(K), out_codes.data_ptr<uint8_t>(),
        out_scale_inv.data_ptr<float>(), gemm_ready_scales, table, stream);
    TORCH_CHECK(err == cudaSuccess, "scaling_aware_transpose: kernel launch failed: ", cudaGetErrorString(err));
  }
}

// The splits read from device memory (the sync-free path): row_start, block_start int64 [E + 1] CUDA tensors
// (numerics.groups.RowGroups.offsets / .tiles), a grid of max_blocks 128-row blocks. Nothing is read on the host.
void scaling_aware_transpose_grouped(const at::Tensor& codes, const at::Tensor& scale_inv, const at::Tensor& row_start,
                                     const at::Tensor& block_start, int64_t max_blocks, bool gemm_ready_scales,
                                     at::Tensor& out_codes, at::Tensor& out_scale_inv) {
  TORCH_CHECK(codes.is_cuda() && scale_inv.is_cuda() && out_codes.is_cuda() && out_scale_inv.is_cuda() &&
                  row_start.is_cuda() && block_start.is_cuda(),
              "scaling_aware_transpose_grouped: all tensors must be CUDA tensors");
  TORCH_CHECK(codes.scalar_type() == at::kByte && out_codes.scalar_type() == at::kByte,
              "scaling_aware_transpose_grouped: codes must be viewed as uint8");
  TORCH_CHECK(scale_inv.scalar_type() == at::kFloat && out_scale_inv.scalar_type() == at::kFloat,
              "scaling_aware_transpose_grouped: scale_inv must be float32");
  TORCH_CHECK(row_start.scalar_type() == at::kLong && block_start.scalar_type() == at::kLong &&
                  row_start.dim() == 1 && block_start.dim() == 1 && row_start.is_contiguous() &&
                  block_start.is_contiguous() && row_start.numel() == block_start.numel() && row_start.numel() >= 1,
              "scaling_aware_transpose_grouped: row_start and block_start must be contiguous int64 [E + 1]");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous(), "scaling_aware_transpose_grouped: codes must be contiguous [M, K]");
  const int64_t M = codes.size(0), K = codes.size(1);
  const int64_t nbk = ceil_div(K, 128);
  TORCH_CHECK(scale_inv.is_contiguous() && scale_inv.dim() == 2 && scale_inv.size(0) == M && scale_inv.size(1) == nbk,
              "scaling_aware_transpose_grouped: scale_inv must be contiguous [M, ceil(K/128)] = [", M, ", ", nbk,
              "], got ", scale_inv.sizes());
  TORCH_CHECK(M <= INT_MAX && K <= INT_MAX && nbk <= 65535 && max_blocks >= 0 && max_blocks * ceil_div(nbk, 2) <= INT_MAX,
              "scaling_aware_transpose_grouped: shape too large: ", codes.sizes(), ", max_blocks ", max_blocks);
  TORCH_CHECK(out_codes.is_contiguous() && out_scale_inv.is_contiguous(),
              "scaling_aware_transpose_grouped: outputs must be contiguous");
  TORCH_CHECK(out_codes.numel() >= M * K, "scaling_aware_transpose_grouped: out_codes must hold M*K bytes");
  const int64_t scale_row_len = gemm_ready_scales ? ceil_div(K, 4) * 4 : K;
  TORCH_CHECK(out_scale_inv.numel() >= scale_row_len * max_blocks, "scaling_aware_transpose_grouped: out_scale_inv "
              "must hold ", scale_row_len * max_blocks, " floats");
  const int64_t num_splits = row_start.numel() - 1;
  TORCH_CHECK(num_splits <= INT_MAX, "scaling_aware_transpose_grouped: too many splits");
  if (M == 0 || K == 0 || max_blocks == 0) return;

  const c10::cuda::CUDAGuard guard(codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  fp8flow::DeviceSplitTable table;
  table.row_start = row_start.data_ptr<int64_t>();
  table.block_start = block_start.data_ptr<int64_t>();
  table.num_splits = static_cast<int>(num_splits);
  const cudaError_t err = fp8flow::launch_scaling_aware_transpose_device(
      codes.data_ptr<uint8_t>(), scale_inv.data_ptr<float>(), static_cast<int>(K), out_codes.data_ptr<uint8_t>(),
      out_scale_inv.data_ptr<float>(), gemm_ready_scales, table, static_cast<int>(max_blocks), stream);
  TORCH_CHECK(err == cudaSuccess, "scaling_aware_transpose_grouped: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fp8flow_megatron CUDA kernels";
  m.def("scaling_aware_transpose", &scaling_aware_transpose,
        "Row-wise 1x128 E4M3 -> column-wise, every split in one launch (outputs preallocated)", py::arg("codes"),
        py::arg("scale_inv"), py::arg("m_splits"), py::arg("gemm_ready_scales"), py::arg("out_codes"),
        py::arg("out_scale_inv"));
  m.def("scaling_aware_transpose_grouped", &scaling_aware_transpose_grouped,
        "As scaling_aware_transpose, the splits read from device memory (row_start, block_start int64 [E + 1]; a "
        "grid of max_blocks 128-row blocks; no host read)",
        py::arg("codes"), py::arg("scale_inv"), py::arg("row_start"), py::arg("block_start"), py::arg("max_blocks"),
        py::arg("gemm_ready_scales"), py::arg("out_codes"), py::arg("out_scale_inv"));
}
