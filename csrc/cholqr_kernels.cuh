// Small CUDA kernels of the batched CholeskyQR (cholqr.cpp); no torch headers here, which keeps
// nvcc's compile time short. All pointers are device pointers of contiguous row-major batches.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace adapprox {

// x[b] = y[b] + delta * s_b * D * C  (fp32 in, fp64 out), with s_b = norms[b] if > 0 else 1 and
// D * C the sign-flipped DCT-II completion basis of adapprox_kernels/cholqr.py. (B, m, r).
cudaError_t launch_complete_sketch(const float* y, double* x, const double* norms, int64_t batch, int64_t m, int64_t r,
                                   double delta, cudaStream_t stream);

// gram[b] += factor * trace(gram[b]) * I, for a (B, r, r) batch.
cudaError_t launch_add_relative_shift(double* gram, int64_t batch, int64_t r, double factor, cudaStream_t stream);

// The largest r that launch_shifted_cholesky_inverse takes: its r x r fp64 matrix lives in one
// block's shared memory (33 KiB at r = 64, under the 48 KiB every GPU gives without opting in).
constexpr int64_t kMaxSharedRank = 64;

// Per matrix b of a (B, r, r) batch of symmetric Gram matrices, r <= kMaxSharedRank: the
// Cholesky factorization gram[b] + factor * trace(gram[b]) * I = R^T R (R upper triangular),
// and r_inv[b] = R^{-1} (upper triangular, zeros below). Sets failed[b] (never clears it) when a
// pivot is not positive and finite (r_inv[b] is then garbage) and, with tolerance >= 0, when
// max |gram[b] - I| > tolerance or is NaN. gram is read only. One block per matrix, no host sync.
cudaError_t launch_shifted_cholesky_inverse(const double* gram, double* r_inv, bool* failed, int64_t batch, int64_t r,
                                            double factor, double tolerance, cudaStream_t stream);

// out[b] = base + b * stride: the pointer arrays of the cuBLAS / cuSOLVER batched routines.
cudaError_t launch_batch_pointers(double* base, int64_t stride, int64_t batch, double** out, cudaStream_t stream);

}  // namespace adapprox
