"""The csrc/ extension (batched robust CholeskyQR), its PyTorch reference and the soft loader.

Without a GPU (CI): loading or the saved reason, clean errors for CPU tensors and without a CUDA
driver, the fake impl, and the reference algorithm (adapprox_kernels/cholqr.py) against
torch.linalg.qr on random, rank-deficient and zero sketches. With a GPU (marker ``gpu``): the
extension against that reference and torch.linalg.qr, streams, torch.compile, the optimizer.
"""

from __future__ import annotations

import glob
import os
import types

import pytest
import torch

import adapprox_kernels
from adapprox_kernels import DenseOperator, srsi
from adapprox_kernels import _extension as ext
from adapprox_kernels.cholqr import COMPLETION_SCALE, GRAM_TOLERANCE, cholqr_orthonormalize, completion_basis
from adapprox_kernels.srsi import householder_orthonormalize

LOADED, LOAD_ERROR = ext.extension_status()
needs_extension = pytest.mark.skipif(not LOADED, reason=f"extension not loaded: {LOAD_ERROR}")
PACKAGE_DIR = os.path.dirname(adapprox_kernels.__file__)


# ----------------------------------------------------------------------------------- sketches
def sketches(kind: str, b: int, m: int, r: int, device="cpu") -> torch.Tensor:
    """Test inputs ``(b, m, r)`` fp32: well-conditioned or the degenerate ones S-RSI produces."""
    g = torch.Generator().manual_seed(1000 * KINDS.index(kind) + m + r)
    if kind == "random":
        y = torch.randn(b, m, r, generator=g)
    elif kind == "zero":
        y = torch.zeros(b, m, r)
    elif kind == "rank1":  # a second moment close to rank 1
        y = torch.randn(b, m, 1, generator=g) @ torch.randn(b, 1, r, generator=g)
    elif kind == "identical_columns":
        y = torch.randn(b, m, 1, generator=g).expand(b, m, r).contiguous()
    elif kind == "zero_columns":  # rank 2 with a zero first column
        y = torch.randn(b, m, 2, generator=g) @ torch.randn(b, 2, r, generator=g)
        y[:, :, 0] = 0
    elif kind == "constant":
        y = torch.ones(b, m, r)
    elif kind == "graded":  # singular values from 1 down to 1e-12: numerically rank-deficient
        u = torch.linalg.qr(torch.randn(b, m, r, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(b, r, r, generator=g, dtype=torch.float64)).Q
        y = ((u * torch.logspace(0, -12, r, dtype=torch.float64)) @ v).float()
    elif kind == "scaled_columns":  # column norms from 1e-30 to 1e30
        y = torch.randn(b, m, r, generator=g) * torch.logspace(-30, 30, r)
    elif kind == "tiny":
        y = torch.randn(b, m, r, generator=g) * 1e-40  # subnormal fp32
    else:
        raise ValueError(kind)
    return y.to(device)


KINDS = ["random", "zero", "rank1", "identical_columns", "zero_columns", "constant", "graded", "scaled_columns", "tiny"]
SHAPES = [(3, 40, 6), (2, 29, 29), (2, 97, 13), (4, 7, 1), (1, 1, 1)]


def orthonormality_error(q: torch.Tensor) -> float:
    q = q.double()
    return (q.transpose(1, 2) @ q - torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)).abs().max().item()


def span_residual(q: torch.Tensor, y: torch.Tensor) -> float:
    """max over the batch of ``‖Y − Q Qᵀ Y‖_F / ‖Y‖_F`` (0 for a zero ``Y``)."""
    q, y = q.double(), y.double()
    resid = torch.linalg.matrix_norm(y - q @ (q.transpose(1, 2) @ y))
    norm = torch.linalg.matrix_norm(y)
    return torch.where(norm > 0, resid / torch.where(norm > 0, norm, 1), 0).max().item()


def align_signs(q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``ref`` with its columns' signs flipped to match ``q`` (QR is unique up to them)."""
    signs = torch.sign((q * ref).sum(dim=1, keepdim=True))
    return ref * torch.where(signs == 0, 1, signs)


def check_orthonormal_basis(q: torch.Tensor, y: torch.Tensor, orth_tol: float = 5e-6, span_tol: float = 5e-6):
    assert q.shape == y.shape and q.dtype == y.dtype and q.device == y.device
    assert torch.isfinite(q).all()
    assert orthonormality_error(q) <= orth_tol
    assert span_residual(q, y) <= span_tol


# --------------------------------------------------------------------- soft loading (no GPU)
def test_status_is_flag_and_reason():
    loaded, error = ext.extension_status()
    assert isinstance(loaded, bool)
    assert (error is None) if loaded else (isinstance(error, str) and error)


def test_built_module_loads():
    """A compiled module that is present must load (a broken build fails here, not silently);
    set ADAPPROX_REQUIRE_EXTENSION=1 where the build is expected (CI compiles it)."""
    built = glob.glob(os.path.join(PACKAGE_DIR, "_C*.so"))
    required = os.environ.get("ADAPPROX_REQUIRE_EXTENSION") == "1"
    if not built and not required:
        pytest.skip("extension not built in this checkout")
    if os.environ.get("ADAPPROX_DISABLE_EXTENSION"):
        pytest.skip("ADAPPROX_DISABLE_EXTENSION is set")
    assert LOADED, LOAD_ERROR


def test_missing_module_is_a_flag(monkeypatch):
    monkeypatch.delenv("ADAPPROX_DISABLE_EXTENSION", raising=False)
    module, error = ext._load("adapprox_kernels._C_not_there")
    assert module is None and error.startswith("not built")


def test_broken_module_keeps_its_error(tmp_path, monkeypatch):
    # A module that fails while loading, as a build against another torch does (undefined symbol).
    (tmp_path / "brokenext").mkdir()
    (tmp_path / "brokenext" / "__init__.py").write_text("")
    (tmp_path / "brokenext" / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c104impl')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ADAPPROX_DISABLE_EXTENSION", raising=False)
    module, error = ext._load("brokenext._C")
    assert module is None and error == "ImportError: undefined symbol: _ZN3c104impl"


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("ADAPPROX_DISABLE_EXTENSION", "1")
    assert ext._load() == (None, "disabled by ADAPPROX_DISABLE_EXTENSION")


def test_unavailable_extension_falls_back(monkeypatch):
    # An fp32 CUDA tensor is what would go to the extension; only its device and dtype are read.
    cuda_fp32 = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    monkeypatch.setattr(ext, "_MODULE", object())
    assert ext.uses_extension(cuda_fp32)
    monkeypatch.setattr(ext, "_MODULE", None)
    monkeypatch.setattr(ext, "_ERROR", "not built (test)")
    assert not ext.uses_extension(cuda_fp32)
    y = torch.randn(2, 9, 4)
    assert not ext.uses_extension(y)
    assert torch.equal(ext.orthonormalize(y), householder_orthonormalize(y))
    with pytest.raises(RuntimeError, match="not built \\(test\\)"):
        ext.cholqr_cuda(y)


def test_orthonormalize_on_cpu_is_householder():
    y = torch.randn(3, 12, 5)
    assert torch.equal(ext.orthonormalize(y), householder_orthonormalize(y))


# ------------------------------------------------------------ the loaded module, without a GPU
@needs_extension
def test_cpu_tensors_get_clean_errors():
    y = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="CUDA tensor"):
        ext.cholqr_cuda(y)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        torch.ops.adapprox_kernels.cholqr_orthonormalize(y)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        ext.extension_module().cholqr_orthonormalize(y)


@needs_extension
def test_runtime_status_never_raises():
    count, error = ext.extension_module().cuda_runtime_status()
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count() and error is None
    else:  # no driver or no device: a message, not a crash
        assert count == 0 and isinstance(error, str) and error.startswith("cuda")


@needs_extension
def test_constants_match_reference():
    module = ext.extension_module()
    assert module.COMPLETION_SCALE == COMPLETION_SCALE and module.GRAM_TOLERANCE == GRAM_TOLERANCE


@needs_extension
def test_fake_impl_gives_shape_and_dtype():
    y = torch.empty(4, 33, 7, device="meta")
    out = torch.ops.adapprox_kernels.cholqr_orthonormalize(y)
    assert out.shape == y.shape and out.dtype == y.dtype and out.device.type == "meta"


@needs_extension
def test_only_the_checked_op_is_cudagraph_unsafe():
    """The checked op's host sync cannot sit inside a CUDA graph: torch.compile's CUDA graphs
    leave it out by its tag. The optimizer's sync-free op is captured (cuda_graphs=True)."""
    ops = torch.ops.adapprox_kernels
    assert torch.Tag.cudagraph_unsafe in ops.cholqr_orthonormalize.default.tags
    assert torch.Tag.cudagraph_unsafe not in ops.cholqr_orthonormalize_unchecked.default.tags


@needs_extension
@pytest.mark.parametrize(
    "shape,dtype", [((33, 7), torch.float32), ((4, 7, 33), torch.float32), ((4, 33, 7), torch.float64)]
)
@pytest.mark.parametrize("name", ["cholqr_orthonormalize", "cholqr_orthonormalize_unchecked"])
def test_fake_impl_rejects_what_the_kernel_rejects(name, shape, dtype):
    """A trace must not accept inputs the CUDA kernel raises on (2-D, m < r, not float32)."""
    with pytest.raises(RuntimeError, match="cholqr_orthonormalize"):
        getattr(torch.ops.adapprox_kernels, name)(torch.empty(shape, dtype=dtype, device="meta"))


@pytest.mark.parametrize("bad", [torch.randn(8, 3), torch.randn(2, 3, 8), torch.ones(2, 8, 3, dtype=torch.int64)])
def test_bad_sketches_raise_valueerror(bad):
    with pytest.raises(ValueError):
        cholqr_orthonormalize(bad)
    if LOADED:
        with pytest.raises(ValueError):
            ext.cholqr_cuda(bad)


# --------------------------------------------------------------- the reference algorithm (CPU)
def test_completion_basis_is_orthonormal():
    for m, r in [(1, 1), (7, 7), (50, 3), (300, 261)]:
        c = completion_basis(m, r)
        torch.testing.assert_close(c.T @ c, torch.eye(r, dtype=torch.float64), atol=1e-13, rtol=0)
    # The sign flips break alignment with constant columns (the DCT's first column).
    cosine = completion_basis(1000, 1).sum().abs().item() / 1000**0.5
    assert cosine < 0.1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_orthonormal_basis(kind, shape):
    y = sketches(kind, *shape)
    q = cholqr_orthonormalize(y)
    check_orthonormal_basis(q, y)


@pytest.mark.parametrize("kind", KINDS)
def test_householder_fallback_on_degenerate_sketches(kind):
    """The pure-PyTorch fallback orthonormalizer also never breaks down."""
    y = sketches(kind, 3, 40, 6)
    # Subnormal entries carry fewer bits, which fp32 Householder (unlike the fp64 CholeskyQR) sees.
    check_orthonormal_basis(householder_orthonormalize(y), y, span_tol=5e-5 if kind == "tiny" else 2e-6)


@pytest.mark.parametrize("shape", [(3, 40, 6), (2, 97, 13), (2, 16, 16)])
def test_reference_matches_householder_up_to_signs(shape):
    y = sketches("random", *shape)
    q = cholqr_orthonormalize(y)
    torch.testing.assert_close(q, align_signs(q, householder_orthonormalize(y)), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["random", "rank1", "zero_columns"])
def test_reference_is_scale_invariant(kind):
    """The shift scales with trace(XᵀX) and the completion with ‖Y‖: a sketch scaled by 2^±40
    (exact in floating point) gets the same Q, rank-deficient ones included (an absolute shift
    is negligible for a large sketch, whose Cholesky then fails over to Householder QR)."""
    y = sketches(kind, 2, 30, 5)
    q = cholqr_orthonormalize(y)
    for scale in (2.0**40, 2.0**-40):
        torch.testing.assert_close(cholqr_orthonormalize(y * scale), q, atol=1e-6, rtol=0, msg=f"scale {scale}")


def test_reference_matrices_are_independent():
    y = torch.cat([sketches("random", 2, 30, 5), sketches("zero", 1, 30, 5), sketches("rank1", 2, 30, 5)])
    y[1, 3, 2] = float("nan")
    q = cholqr_orthonormalize(y)
    bad = ~torch.isfinite(q).all(dim=(1, 2))
    assert bad.tolist() == [False, True, False, False, False]  # NaN in, NaN out, neighbours intact
    for b in [0, 2, 3, 4]:
        torch.testing.assert_close(q[b : b + 1], cholqr_orthonormalize(y[b : b + 1]), atol=1e-6, rtol=0)


def test_reference_keeps_dtype_and_empty_batches():
    y = sketches("random", 2, 20, 4).double()
    q = cholqr_orthonormalize(y)
    assert q.dtype == torch.float64 and orthonormality_error(q) < 1e-12
    assert cholqr_orthonormalize(torch.empty(0, 5, 3)).shape == (0, 5, 3)
    assert cholqr_orthonormalize(torch.empty(2, 5, 0)).shape == (2, 5, 0)


def test_srsi_same_approximation_with_either_orthonormalizer():
    """S-RSI only sees the span: Q Uᵀ agrees between CholeskyQR and Householder, here on a
    nearly rank-1 second moment (squared gradient) plus an exactly rank-1 matrix."""
    g = torch.randn(2, 60, 45)
    a = torch.cat([g * g, (torch.rand(1, 60, 1) @ torch.rand(1, 1, 45))])
    op = DenseOperator(a)
    results = []
    for orth in (householder_orthonormalize, cholqr_orthonormalize):
        q, u = srsi(op, 4, generator=torch.Generator().manual_seed(3), orthonormalize=orth)
        results.append(q @ u.transpose(1, 2))
    torch.testing.assert_close(results[0], results[1], atol=1e-5 * a.abs().max().item(), rtol=0)


# ----------------------------------------------------------------------- on a GPU (marker gpu)
@pytest.mark.parametrize("kind", KINDS)
# r = 64 and 65: either side of the switch from the shared-memory Cholesky kernel to cuSOLVER.
@pytest.mark.parametrize("shape", SHAPES + [(5, 768, 261), (3, 300, 261), (4, 4096, 37), (2, 200, 64), (2, 200, 65)])
@pytest.mark.gpu
@needs_extension
def test_extension_matches_reference(kind, shape):
    y = sketches(kind, *shape, device="cuda")
    q = ext.cholqr_cuda(y)
    check_orthonormal_basis(q, y)
    # Same algorithm and same completion directions: equal to the reference up to rounding.
    torch.testing.assert_close(q, cholqr_orthonormalize(y), atol=1e-5, rtol=0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("shape", [(3, 40, 6), (12, 768, 13), (4, 1024, 261)])
def test_extension_matches_torch_linalg_qr(shape):
    y = sketches("random", *shape, device="cuda")
    q = ext.cholqr_cuda(y)
    torch.testing.assert_close(q, align_signs(q, torch.linalg.qr(y).Q), atol=5e-5, rtol=0)


@pytest.mark.gpu
@needs_extension
def test_extension_batch_independence_and_nonfinite():
    y = torch.cat([sketches("random", 2, 64, 8), sketches("zero", 1, 64, 8), sketches("graded", 2, 64, 8)]).cuda()
    y[3, 5, 1] = float("inf")
    q = ext.cholqr_cuda(y)
    assert (~torch.isfinite(q).all(dim=(1, 2))).tolist() == [False, False, False, True, False]
    for b in [0, 1, 2, 4]:
        torch.testing.assert_close(q[b : b + 1], ext.cholqr_cuda(y[b : b + 1]), atol=1e-6, rtol=0)


@pytest.mark.gpu
@needs_extension
def test_extension_noncontiguous_and_side_stream():
    base = sketches("random", 3, 6, 50, device="cuda")
    y = base.transpose(1, 2)  # (3, 50, 6), not contiguous
    want = ext.cholqr_cuda(y.contiguous())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ext.cholqr_cuda(y)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # cuBLAS may pick other kernels per stream


@pytest.mark.gpu
@needs_extension
def test_extension_opcheck_and_compile():
    y = sketches("rank1", 3, 40, 6, device="cuda")
    torch.library.opcheck(torch.ops.adapprox_kernels.cholqr_orthonormalize.default, (y,))
    compiled = torch.compile(lambda t: ext.orthonormalize(t) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(y), ext.cholqr_cuda(y) * 2, atol=1e-6, rtol=0)


@pytest.mark.gpu
@needs_extension
def test_unchecked_op_flags_failures_without_fallback():
    """The sync-free op the optimizer uses: the checked op's result where nothing failed, and the
    flags of the matrices the checked op would send to Householder QR (non-finite sketches)."""
    y = sketches("random", 4, 40, 6, device="cuda")
    y[2, 5, 1] = float("nan")
    y[3, 0, 0] = float("inf")
    q, failed = ext.orthonormalize_unchecked(y)
    assert failed.tolist() == [False, False, True, True]
    torch.testing.assert_close(q[:2], ext.cholqr_cuda(y)[:2], atol=0, rtol=0)
    torch.library.opcheck(torch.ops.adapprox_kernels.cholqr_orthonormalize_unchecked.default, (y[:2].contiguous(),))


@pytest.mark.gpu
@needs_extension
def test_optimizer_same_results_with_and_without_extension(monkeypatch):
    """The optimizer uses the extension on CUDA and, without it, Householder QR: same steps."""
    from adapprox_kernels import Adapprox

    def run():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(48, 32, device="cuda")) for _ in range(3)]
        opt = Adapprox(params, lr=1e-2)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + i + 1))
            opt.step()
        return [p.detach().clone() for p in params]

    with_ext = run()
    monkeypatch.setattr(ext, "_MODULE", None)
    without = run()
    for a, b in zip(with_ext, without):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
