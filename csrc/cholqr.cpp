// Batched orthonormalization for S-RSI: robust CholeskyQR on a batch of same-shaped sketches.
//
// cholqr_orthonormalize(y: (B, m, r) fp32 CUDA, m >= r) -> (B, m, r) fp32 with orthonormal columns
// spanning those of y (completed with fixed directions where y is rank-deficient or zero). The
// algorithm and its plain-PyTorch reference are in adapprox_kernels/cholqr.py; this file runs the
// same steps with batched cuBLAS GEMMs (through at::bmm) and, for sketches up to 64 columns, one
// small kernel per pass that factors and inverts the r x r Gram matrices (cholqr_kernels.cu);
// wider ones use cuSOLVER potrfBatched and cuBLAS trsmBatched. All on torch's current stream.
// Limits: one host sync per call (to decide whether any matrix needs the Householder fallback;
// cholqr_orthonormalize_unchecked leaves that decision to the caller and never syncs); fp64 work
// buffers of about 4x the fp32 input (a pass's fp64 input and output are alive together).
//
// Exposed twice: as the dispatcher op adapprox_kernels::cholqr_orthonormalize (so torch.compile
// traces it; its fake impl is in adapprox_kernels/_extension.py) and as a pybind11 function.

#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <cfloat>
#include <climits>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>

#include "cholqr_kernels.cuh"

namespace adapprox {
namespace {

// Same numbers as adapprox_kernels/cholqr.py (COMPLETION_SCALE = 2**-32, GRAM_TOLERANCE).
constexpr double kCompletionScale = 1.0 / 4294967296.0;
constexpr double kGramTolerance = 0.1;

#define ADAPPROX_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                       \
    const cudaError_t err_ = (expr);                                                                         \
    TORCH_CHECK(err_ == cudaSuccess, "adapprox_kernels: ", #expr, " failed: ", cudaGetErrorString(err_),     \
                (err_ == cudaErrorNoKernelImageForDevice || err_ == cudaErrorInvalidDeviceFunction)          \
                    ? " (the extension was not compiled for this GPU: rebuild with ADAPPROX_CUDA_ARCHS set)" \
                    : "");                                                                                   \
  } while (0)

#define ADAPPROX_CUBLAS_CHECK(expr)                                                                                  \
  do {                                                                                                               \
    const cublasStatus_t st_ = (expr);                                                                               \
    TORCH_CHECK(st_ == CUBLAS_STATUS_SUCCESS, "adapprox_kernels: ", #expr, " failed: ", cublasGetStatusString(st_)); \
  } while (0)

#define ADAPPROX_CUSOLVER_CHECK(expr)                                                                        \
  do {                                                                                                       \
    const cusolverStatus_t st_ = (expr);                                                                     \
    TORCH_CHECK(st_ == CUSOLVER_STATUS_SUCCESS, "adapprox_kernels: ", #expr, " failed with cusolverStatus ", \
                static_cast<int>(st_));                                                                      \
  } while (0)

// torch does not export its cuSOLVER handle pool to extensions (it lives in libtorch_cuda_linalg),
// so keep one handle per (thread, device), bound to the current stream at every use. Handles are
// never destroyed: destroying them at thread exit can run after the CUDA context is gone.
cusolverDnHandle_t solver_handle(c10::DeviceIndex device, cudaStream_t stream) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    cusolverDnHandle_t handle = nullptr;
    ADAPPROX_CUSOLVER_CHECK(cusolverDnCreate(&handle));
    it = handles.emplace(device, handle).first;
  }
  ADAPPROX_CUSOLVER_CHECK(cusolverDnSetStream(it->second, stream));
  return it->second;
}

// One CholeskyQR pass on x (B, m, r) fp64 contiguous: returns x R^{-1} (B, m, r) and sets
// failed[b] (bool) where the factorization broke down. shift_factor > 0 adds that many traces of
// the Gram matrix to its diagonal first; check_input also sets failed[b] unless x[b] was already
// nearly orthonormal (max |x^T x - I| <= kGramTolerance, false for NaN).
at::Tensor cholqr_pass(const at::Tensor& x, double shift_factor, bool check_input, at::Tensor& failed) {
  const int64_t batch = x.size(0);
  const int r = static_cast<int>(x.size(2));
  const c10::DeviceIndex device = x.get_device();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();

  at::Tensor gram = at::bmm(x.transpose(1, 2), x);  // cuBLAS DgemmStridedBatched
  at::Tensor r_inv = at::empty({batch, r, r}, x.options());
  if (r <= kMaxSharedRank) {  // the usual sketch width: factor, invert and check in one small kernel
    ADAPPROX_CUDA_CHECK(launch_shifted_cholesky_inverse(gram.data_ptr<double>(), r_inv.data_ptr<double>(),
                                                        failed.data_ptr<bool>(), batch, r, shift_factor,
                                                        check_input ? kGramTolerance : -1.0, stream));
    return at::bmm(x, r_inv);
  }
  at::Tensor chol = gram.clone();
  if (shift_factor > 0.0) {
    ADAPPROX_CUDA_CHECK(launch_add_relative_shift(chol.data_ptr<double>(), batch, r, shift_factor, stream));
  }
  // The right-hand side I of the triangular solve that forms R^{-1}.
  r_inv.copy_(at::eye(r, x.options()).expand({batch, r, r}));
  at::Tensor info = at::zeros({batch}, x.options().dtype(at::kInt));
  at::Tensor pointers = at::empty({2 * batch}, x.options().dtype(at::kLong));
  double** chol_ptrs = reinterpret_cast<double**>(pointers.data_ptr<int64_t>());
  double** inv_ptrs = chol_ptrs + batch;
  ADAPPROX_CUDA_CHECK(launch_batch_pointers(chol.data_ptr<double>(), int64_t{r} * r, batch, chol_ptrs, stream));
  ADAPPROX_CUDA_CHECK(launch_batch_pointers(r_inv.data_ptr<double>(), int64_t{r} * r, batch, inv_ptrs, stream));

  // Row-major buffers read as column-major are transposed. The Gram matrix is symmetric, so
  // potrf(LOWER) gives L with G = L L^T, stored column-major; read row-major that is R = L^T,
  // upper, with G = R^T R. Solving L Z = I column-major gives Z = L^{-1}, which read row-major is
  // (L^{-1})^T = R^{-1}. potrf leaves the other triangle untouched and trsm never reads it.
  ADAPPROX_CUSOLVER_CHECK(cusolverDnDpotrfBatched(solver_handle(device, stream), CUBLAS_FILL_MODE_LOWER, r, chol_ptrs,
                                                  r, info.data_ptr<int>(), static_cast<int>(batch)));
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  cublasPointerMode_t mode;
  ADAPPROX_CUBLAS_CHECK(cublasGetPointerMode(blas, &mode));
  ADAPPROX_CUBLAS_CHECK(cublasSetPointerMode(blas, CUBLAS_POINTER_MODE_HOST));
  const double one = 1.0;
  const cublasStatus_t status =
      cublasDtrsmBatched(blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, r, r, &one,
                         chol_ptrs, r, inv_ptrs, r, static_cast<int>(batch));
  ADAPPROX_CUBLAS_CHECK(cublasSetPointerMode(blas, mode));
  ADAPPROX_CUBLAS_CHECK(status);
  failed.logical_or_(info.ne(0));
  if (check_input) {
    // `not (<=)` also flags NaN.
    const at::Tensor gram_err = (gram - at::eye(r, gram.options())).abs().amax(at::IntArrayRef{1, 2});
    failed.logical_or_(gram_err.le(kGramTolerance).logical_not());
  }
  return at::bmm(x, r_inv);
}

}  // namespace

// Steps 1-3 and the check of step 4 without the fallback: (Q (B, m, r) fp32, failed (B,) bool).
// No host sync: a caller that can wait (the optimizer checks once per step) recomputes the
// failed matrices itself; cholqr_orthonormalize below does it at once.
std::tuple<at::Tensor, at::Tensor> cholqr_orthonormalize_unchecked(const at::Tensor& y) {
  TORCH_CHECK(y.is_cuda(), "adapprox_kernels.cholqr_orthonormalize needs a CUDA tensor, got one on ", y.device(),
              "; on the CPU use adapprox_kernels.cholqr.cholqr_orthonormalize or srsi.householder_orthonormalize");
  TORCH_CHECK(y.dim() == 3, "cholqr_orthonormalize expects a (B, m, r) tensor, got ", y.dim(), " dimensions");
  TORCH_CHECK(y.scalar_type() == at::kFloat, "cholqr_orthonormalize expects float32, got ", y.scalar_type());
  const int64_t batch = y.size(0), m = y.size(1), r = y.size(2);
  TORCH_CHECK(m >= r, "cholqr_orthonormalize needs m >= r, got m = ", m, ", r = ", r);
  TORCH_CHECK(r <= INT_MAX && batch <= INT_MAX, "cholqr_orthonormalize: r and B must fit in int (cuSOLVER)");
  if (y.numel() == 0) return {at::empty_like(y), at::zeros({batch}, y.options().dtype(at::kBool))};

  c10::cuda::CUDAGuard guard(y.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(y.get_device()).stream();
  const at::Tensor yc = y.contiguous();

  // Step 1: the completed sketch X = Y + delta * ||Y||_F * D C, in fp64.
  const at::Tensor norms = at::linalg_vector_norm(yc, 2, at::IntArrayRef{1, 2}, false, at::kDouble);
  at::Tensor x = at::empty(yc.sizes(), yc.options().dtype(at::kDouble));
  ADAPPROX_CUDA_CHECK(launch_complete_sketch(yc.data_ptr<float>(), x.data_ptr<double>(), norms.data_ptr<double>(),
                                             batch, m, r, kCompletionScale, stream));

  // Steps 2-3: shifted CholeskyQR, then CholeskyQR2 (shift = 11 (m r + r (r+1)) u, u = 2^-53).
  const double shift = 11.0 * static_cast<double>(m * r + r * (r + 1)) * (DBL_EPSILON / 2);
  at::Tensor failed = at::zeros({batch}, y.options().dtype(at::kBool));
  at::Tensor q = cholqr_pass(x, shift, false, failed);
  x = at::Tensor();  // free the fp64 sketch early
  q = cholqr_pass(q, 0.0, false, failed);
  // Step 4: the last pass must start from a nearly orthonormal, finite input. Then its output is
  // finite and orthonormal, so no separate finiteness scan.
  q = cholqr_pass(q, 0.0, true, failed);
  return {q.to(at::kFloat), failed};
}

at::Tensor cholqr_orthonormalize(const at::Tensor& y) {
  auto [q, failed] = cholqr_orthonormalize_unchecked(y);
  if (y.numel() > 0 && failed.any().item<bool>()) {  // the one host sync
    const at::Tensor idx = failed.nonzero().squeeze(1);
    const at::Tensor householder = std::get<0>(at::linalg_qr(y.index_select(0, idx), "reduced"));
    q.index_copy_(0, idx, householder);
  }
  return q;
}

namespace {

// (number of CUDA devices, None) or (0, the CUDA runtime's error): tells a missing driver apart
// from a missing GPU without raising, for `python -m adapprox_kernels`.
std::tuple<int, std::optional<std::string>> cuda_runtime_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last-error state so later calls do not report it
    return {0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
  }
  return {count, std::nullopt};
}

}  // namespace
}  // namespace adapprox

TORCH_LIBRARY_FRAGMENT(adapprox_kernels, m) {
  m.set_python_module("adapprox_kernels._extension");
  // The checked op waits for the GPU (its one host sync): tagged so that torch.compile's CUDA
  // graphs (mode="reduce-overhead", graph partitions) leave it out of a capture.
  m.def("cholqr_orthonormalize(Tensor y) -> Tensor", {at::Tag::cudagraph_unsafe});
  m.def("cholqr_orthonormalize_unchecked(Tensor y) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adapprox_kernels, CUDA, m) {
  m.impl("cholqr_orthonormalize", &adapprox::cholqr_orthonormalize);
  m.impl("cholqr_orthonormalize_unchecked", &adapprox::cholqr_orthonormalize_unchecked);
}

// On CPU tensors the same function stops at its first check with a clear message, rather than the
// dispatcher's generic "could not run ... with arguments from the 'CPU' backend".
TORCH_LIBRARY_IMPL(adapprox_kernels, CPU, m) {
  m.impl("cholqr_orthonormalize", &adapprox::cholqr_orthonormalize);
  m.impl("cholqr_orthonormalize_unchecked", &adapprox::cholqr_orthonormalize_unchecked);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapprox_kernels CUDA extension: batched robust CholeskyQR for S-RSI";
  m.def("cholqr_orthonormalize", &adapprox::cholqr_orthonormalize, pybind11::arg("y"),
        "(B, m, r) fp32 CUDA -> (B, m, r) orthonormal columns (see adapprox_kernels/cholqr.py)");
  m.def("cuda_runtime_status", &adapprox::cuda_runtime_status,
        "(device count, None) or (0, CUDA runtime error): never raises, works without a driver");
  m.attr("COMPLETION_SCALE") = adapprox::kCompletionScale;
  m.attr("GRAM_TOLERANCE") = adapprox::kGramTolerance;
  m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;
  m.attr("CUBLAS_VERSION") = CUBLAS_VERSION;
  m.attr("CUSOLVER_VERSION") = CUSOLVER_VERSION;
}
