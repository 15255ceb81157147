// The element-wise and per-matrix helpers of the batched CholeskyQR: building the completed fp64
// sketch, shifting Gram matrices, and the pointer arrays that batched cuBLAS/cuSOLVER calls take.
// The heavy work (GEMMs, Cholesky, triangular solves) is in cuBLAS/cuSOLVER, see cholqr.cpp.
#include "cholqr_kernels.cuh"

namespace adapprox {
namespace {

constexpr int kThreads = 256;

// The row sign of the completion basis: the uint32 hash that adapprox_kernels.cholqr.row_signs
// reproduces in int64 arithmetic.
__device__ __forceinline__ double row_sign(int64_t i) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
  h ^= h >> 16;
  h *= 0x045D9F3Bu;
  h ^= h >> 16;
  return (h & 1u) ? -1.0 : 1.0;
}

__global__ void complete_sketch_kernel(const float* __restrict__ y, double* __restrict__ x,
                                       const double* __restrict__ norms, int64_t batch, int64_t m, int64_t r,
                                       double delta) {
  const int64_t per_matrix = m * r;
  const int64_t total = batch * per_matrix;
  const double w0 = sqrt(1.0 / static_cast<double>(m));
  const double w = sqrt(2.0 / static_cast<double>(m));
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / per_matrix;
    const int64_t i = (idx % per_matrix) / r;
    const int64_t j = idx % r;
    // cos(pi * (2i+1) j / (2m)) with the phase reduced modulo 4m in integers, for accuracy.
    const int64_t phase = ((2 * i + 1) * j) % (4 * m);
    const double basis = (j == 0 ? w0 : w) * cospi(static_cast<double>(phase) / static_cast<double>(2 * m));
    const double nrm = norms[b];
    const double scale = nrm > 0.0 ? nrm : 1.0;  // an all-zero sketch is completed by the basis alone
    x[idx] = static_cast<double>(y[idx]) + delta * scale * row_sign(i) * basis;
  }
}

// One block per matrix: reduce the diagonal, then add the shift to it.
__global__ void add_relative_shift_kernel(double* __restrict__ gram, int64_t r, double factor) {
  __shared__ double partial[kThreads];
  double* g = gram + blockIdx.x * r * r;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) sum += g[i * r + i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const double shift = factor * partial[0];
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) g[i * r + i] += shift;
}

// Row-major a[i * r + k]. After the factorization the lower triangle holds L = R^T; the inverse
// Z = L^{-1} (lower) is then kept transposed in the strictly upper triangle, which the
// factorization leaves unused, and its diagonal in z_diag, so R^{-1} = Z^T reads off directly.
__global__ void shifted_cholesky_inverse_kernel(const double* __restrict__ gram, double* __restrict__ r_inv,
                                                bool* __restrict__ failed, int64_t r, double factor, double tolerance) {
  extern __shared__ double shared[];
  double* a = shared;          // r * r
  double* z_diag = a + r * r;  // r
  __shared__ double shift;
  __shared__ int bad;
  const int64_t b = blockIdx.x;
  const double* g = gram + b * r * r;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < r * r; idx += blockDim.x) {
    a[idx] = g[idx];
    const double err = fabs(a[idx] - (idx / r == idx % r ? 1.0 : 0.0));
    if (tolerance >= 0.0 && !(err <= tolerance)) bad = 1;  // a benign race: every writer writes 1
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // r <= 64: a serial trace is cheaper than a reduction's syncs
    double trace = 0.0;
    for (int64_t i = 0; i < r; ++i) trace += a[i * r + i];
    shift = factor * trace;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) a[i * r + i] += shift;
  __syncthreads();

  // Right-looking Cholesky, A = L L^T: column j is scaled by its pivot, then the trailing
  // lower triangle loses its outer product.
  for (int64_t j = 0; j < r; ++j) {
    const double pivot = a[j * r + j];
    if (threadIdx.x == 0 && !(pivot > 0.0 && isfinite(pivot))) bad = 1;  // also NaN
    const double diag = sqrt(pivot);
    __syncthreads();  // everyone has read the pivot before thread 0 overwrites it
    if (threadIdx.x == 0) a[j * r + j] = diag;
    for (int64_t i = j + 1 + threadIdx.x; i < r; i += blockDim.x) a[i * r + j] /= diag;
    __syncthreads();
    const int64_t rest = r - j - 1;
    for (int64_t idx = threadIdx.x; idx < rest * rest; idx += blockDim.x) {
      const int64_t i = j + 1 + idx / rest, k = j + 1 + idx % rest;
      if (k <= i) a[i * r + k] -= a[i * r + j] * a[k * r + j];
    }
    __syncthreads();
  }

  // Forward substitution, one column c of Z = L^{-1} per thread: Z[i][c] sits at a[c * r + i].
  for (int64_t c = threadIdx.x; c < r; c += blockDim.x) {
    z_diag[c] = 1.0 / a[c * r + c];
    for (int64_t i = c + 1; i < r; ++i) {
      double sum = a[i * r + c] * z_diag[c];
      for (int64_t k = c + 1; k < i; ++k) sum += a[i * r + k] * a[c * r + k];
      a[c * r + i] = -sum / a[i * r + i];
    }
  }
  __syncthreads();
  double* out = r_inv + b * r * r;
  for (int64_t idx = threadIdx.x; idx < r * r; idx += blockDim.x) {
    const int64_t i = idx / r, k = idx % r;
    out[idx] = k > i ? a[idx] : (k == i ? z_diag[i] : 0.0);
  }
  __syncthreads();
  if (threadIdx.x == 0 && bad) failed[b] = true;
}

__global__ void batch_pointers_kernel(double* base, int64_t stride, int64_t batch, double** out) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < batch) out[b] = base + b * stride;
}

int blocks_for(int64_t n) {
  // Grid-stride loops: a bounded grid is enough to fill the GPU.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t launch_complete_sketch(const float* y, double* x, const double* norms, int64_t batch, int64_t m, int64_t r,
                                   double delta, cudaStream_t stream) {
  complete_sketch_kernel<<<blocks_for(batch * m * r), kThreads, 0, stream>>>(y, x, norms, batch, m, r, delta);
  return cudaGetLastError();
}

cudaError_t launch_add_relative_shift(double* gram, int64_t batch, int64_t r, double factor, cudaStream_t stream) {
  // batch <= INT_MAX is checked by the caller (cuSOLVER takes an int batch count anyway).
  add_relative_shift_kernel<<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(gram, r, factor);
  return cudaGetLastError();
}

cudaError_t launch_shifted_cholesky_inverse(const double* gram, double* r_inv, bool* failed, int64_t batch, int64_t r,
                                            double factor, double tolerance, cudaStream_t stream) {
  if (r < 1 || r > kMaxSharedRank) return cudaErrorInvalidValue;
  const size_t shared = static_cast<size_t>(r * r + r) * sizeof(double);
  const int threads = r * r < 128 ? 32 : 128;  // the factorization's trailing updates use them all
  shifted_cholesky_inverse_kernel<<<static_cast<unsigned int>(batch), threads, shared, stream>>>(gram, r_inv, failed, r,
                                                                                                 factor, tolerance);
  return cudaGetLastError();
}

cudaError_t launch_batch_pointers(double* base, int64_t stride, int64_t batch, double** out, cudaStream_t stream) {
  batch_pointers_kernel<<<static_cast<unsigned int>((batch + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      base, stride, batch, out);
  return cudaGetLastError();
}

}  // namespace adapprox
