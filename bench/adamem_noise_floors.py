"""AdaMeM's noise floors for gradients that arrive in bf16 or fp16 (``adamem.noise_floors``).

Seven measurements, on the GPU when torch sees one, else the CPU (``--device``; all but the last
are about numbers, not time):

* ``noise``: exactly low-rank G (rank k < r) rounded to the dtype. The rows of ``R = PᵀG`` beyond
  k and the residual S are then pure rounding noise; their largest norm over shapes 2×3 to
  768×2048 (r = min(k + 4, m)), ranks 1–8 and four kinds of factors, as a fraction of
  ``gradient_rounding_noise``'s
  estimate (the floor is ``GRADIENT_NOISE_MARGIN`` times it, so a fraction above the margin is
  noise that gets through). Tiny shapes get 2000 draws each.
* ``cosine``: cos(first step on the rounded gradient, first step on the exact fp32 gradient), with
  the package's floors and with fp32's floor alone (the rule before gradients' own rounding
  counted), on decaying spectra (σᵢ ∝ i^-a, full rank) and exactly low-rank gradients. The
  rounded gradient goes in as fp32 values on the dtype's grid, as autocast gives them: the
  package has to recognise the grid (a bf16 or fp16 parameter's gradient declares it).
* ``unfloored``: what the floors are for. The first fp32 step on exactly low-rank G (rank k < r)
  with no floor at all, next to the fp64 step: the length of their difference (the noise part)
  over the fp64 step's (the real part), and each one's cos(step, G); 8 draws per case.
* ``arithmetic_noise``: what ``NOISE_FLOOR`` is for. Exactly low-rank G (rank k ≤ 8 < r =
  k + 4, flat or spread singular values, 16×64 to 2048×2048) in fp32 or fp64, and R = PᵀG,
  S = G − P R computed in that dtype with the S-RSI or SVD projection: the largest norm of a row
  of R beyond k, and of S, over ``u·‖G‖_F`` (u the dtype's unit roundoff).
* ``accumulated``: what one rounding does not cover. k = 2–16 rank-1 micro-batch gradients summed
  into a bf16 or fp16 ``.grad`` (as autograd accumulates: k roundings of the pieces, k − 1 of the
  sums), 64×128 and 256×512 at r = min(4k, m): the error over ``gradient_rounding_noise``'s
  ``‖E‖_F`` estimate, and cos(first step, first step on the exact fp32 sum), next to the cos of
  the sum rounded once; 3 draws per case.
* ``tail_noise``: why the steep spectra of ``cosine`` lose. For its full-rank cases, the r-th
  singular value σ_r of G next to the rounding error's ``‖E‖_2`` (measured) and its estimate,
  each over ``‖G‖_F``; 3 draws per case.
* ``cost``: the time of ``noise_floors`` on an fp32 768×3072 gradient next to that of a whole
  steady (not refreshing) AdaMeM step on it at r = 128, each the median of 15 (p20, p80).

``python bench/adamem_noise_floors.py`` writes ``bench/results/adamem_noise_floors_<device>.json``
and ``.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapprox_kernels import AdaMeM, adamem
from bench.common import in_ms, measured, metadata, parser, setup, time_call, write_results

DTYPES = (torch.bfloat16, torch.float16)
SPECTRA = ((192, 384, 48), (768, 3072, 256))  # (m, n, r) of the full-rank cases
EXPONENTS = (1.0, 1.5, 2.0)  # σ_i ∝ i^-a
KINDS = ("gaussian", "heavy_tailed", "zero_rows", "repeated_rows")


def low_rank(batch: int, m: int, n: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``(batch, m, n)`` fp64 matrices of rank ≤ k; ``kind`` shapes the left factor's rows."""
    a = torch.randn(batch, m, k, generator=gen, dtype=torch.float64)
    b = torch.randn(batch, k, n, generator=gen, dtype=torch.float64)
    if kind == "heavy_tailed":  # entries over many binades
        a, b = a**3, b * torch.randn(batch, k, n, generator=gen, dtype=torch.float64).exp()
    elif kind == "zero_rows":
        a = a * (torch.rand(batch, m, 1, generator=gen) > 0.7)
    elif kind == "repeated_rows":  # the same rounding in every repeated row: not independent
        a[:, m // 4 :] = a[:, m // 4 : m // 4 + 1]
    return a @ b


def noise_rows(device: torch.device, gen: torch.Generator) -> list[dict]:
    rows = []
    shapes = [(2, 3, 2000), (2, 8, 2000), (4, 8, 2000), (16, 64, 20), (64, 128, 5), (256, 512, 1), (768, 2048, 1)]
    for dtype in DTYPES:
        for kind in KINDS:
            for projection in ("svd", "srsi"):
                worst_row = worst_resid = 0.0
                over = total = 0
                for m, n, batch in shapes:
                    for k in (1, 2, 4, 8):
                        r = min(k + 4, m)  # r = m: no residual, rows beyond k still noise
                        if k >= r:
                            continue
                        g = low_rank(batch, m, n, k, kind, gen).to(dtype).to(device, torch.float32)
                        proj = adamem.top_left_subspace(
                            g, r, projection, generator=torch.Generator(device).manual_seed(0)
                        )
                        r_proj = proj.mT @ g
                        spectral, frobenius = adamem.gradient_rounding_noise(g, dtype)
                        row = torch.linalg.vector_norm(r_proj[:, k:], dim=2).amax(dim=1) / spectral
                        resid = torch.linalg.vector_norm(g - proj @ r_proj, dim=(1, 2)) / frobenius
                        assert row.isfinite().all() and resid.isfinite().all()
                        worst_row, worst_resid = max(worst_row, row.max().item()), max(worst_resid, resid.max().item())
                        over += int(
                            (row > adamem.GRADIENT_NOISE_MARGIN).sum() + (resid > adamem.GRADIENT_NOISE_MARGIN).sum()
                        )
                        total += 2 * batch
                rows.append(dict(
                    measure="noise", dtype=str(dtype).removeprefix("torch."), kind=kind, projection=projection,
                    max_noise_row_over_estimate=round(worst_row, 3), max_residual_over_estimate=round(worst_resid, 3),
                    fraction_over_margin=over / total, **measured(),
                ))  # fmt: skip
                print(rows[-1])
    return rows


def first_step(g: torch.Tensor, rank: int, floors: str) -> torch.Tensor:
    """``P N1 + N2`` of AdaMeM's first step (S-RSI projection, default betas) on ``g: (1, m, n)``,
    with the package's ``floors``, the compute dtype's floor alone (``"compute"``) or ``"none"``."""
    n = g.shape[-1]
    proj = adamem.top_left_subspace(g, rank, generator=torch.Generator(g.device).manual_seed(0))

    def zeros(*shape):
        return torch.zeros(1, *shape, dtype=g.dtype, device=g.device)

    if floors == "package":
        floors = adamem.noise_floors(g)
    elif floors == "compute":
        floors = (adamem.NOISE_FLOOR * adamem.unit_roundoff(g.dtype) * torch.linalg.vector_norm(g, dim=(1, 2)),) * 2
    else:
        floors = (zeros(), zeros())
    low, resid = adamem.adamem_directions(
        g, proj, zeros(rank, n), zeros(rank), zeros(n), zeros(n), beta1=0.9, beta2=0.95, step=1, eps=1e-8,
        floors=floors,
    )  # fmt: skip
    return (low + resid).flatten()


def spectrum(m: int, n: int, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``(m, n)`` fp64 with singular values ``sigma`` and random singular vectors."""
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=gen, dtype=torch.float64))
    return (u * sigma) @ v.T


def cosine_rows(device: torch.device, gen: torch.Generator, draws: int = 3) -> list[dict]:
    """Mean and least cosine over ``draws`` gradients per case."""
    cases = []
    for m, n, r in SPECTRA:
        for a in EXPONENTS:
            sigma = torch.arange(1, m + 1, dtype=torch.float64) ** -a
            cases.append(
                (f"{m}x{n} full rank, σ_i ∝ i^-{a}", r, lambda m=m, n=n, sigma=sigma: spectrum(m, n, sigma, gen))
            )
    for m, n, k in [(64, 128, 1), (256, 512, 2), (768, 3072, 16)]:
        cases.append((f"{m}x{n} rank {k}", 4 * k, lambda m=m, n=n, k=k: low_rank(1, m, n, k, "gaussian", gen)[0]))
    rows = []
    for name, rank, draw in cases:
        cos: dict[tuple, list[float]] = {}
        for _ in range(draws):
            exact = draw().to(device, torch.float32).unsqueeze(0)
            want = first_step(exact, rank, "package")
            for dtype in DTYPES:
                g = exact.to(dtype).float()
                for rule, floors in (("package", "package"), ("fp32_floor_only", "compute")):
                    got = first_step(g, rank, floors)
                    cos.setdefault((dtype, rule), []).append(
                        torch.nn.functional.cosine_similarity(got, want, dim=0).item()
                    )
        for dtype in DTYPES:
            stats = {}
            for rule in ("package", "fp32_floor_only"):
                values = cos[dtype, rule]
                stats |= {f"cos_{rule}_mean": round(sum(values) / draws, 3), f"cos_{rule}_min": round(min(values), 3)}
            rows.append(dict(
                measure="cosine", case=name, rank=rank, dtype=str(dtype).removeprefix("torch."), draws=draws,
                **stats, **measured(),
            ))  # fmt: skip
            print(rows[-1])
    return rows


def spread(name: str, values: list[float], places: int = 3) -> dict:
    """``{name_mean, name_min, name_max}`` of ``values``, to ``places`` decimals."""
    return {f"{name}_mean": round(sum(values) / len(values), places), f"{name}_min": round(min(values), places),
            f"{name}_max": round(max(values), places)}  # fmt: skip


def unfloored_rows(device: torch.device, draws: int = 8) -> list[dict]:
    """The fp32 step without floors against the fp64 step (whose own floor is fp64's rounding)."""
    rows = []
    for m, n, k, rank in [(256, 512, 2, 4), (64, 128, 1, 4)]:
        gen = torch.Generator().manual_seed(0)
        ratios, cos32, cos64 = [], [], []
        for _ in range(draws):
            g64 = low_rank(1, m, n, k, "gaussian", gen).to(device)
            raw, real = first_step(g64.float(), rank, "none").double(), first_step(g64, rank, "package")
            ratios.append(((raw - real).norm() / real.norm()).item())
            cos32.append(torch.nn.functional.cosine_similarity(raw, g64.flatten(), dim=0).item())
            cos64.append(torch.nn.functional.cosine_similarity(real, g64.flatten(), dim=0).item())
        rows.append(dict(
            measure="unfloored", case=f"{m}x{n} rank {k}", rank=rank, draws=draws, **spread("noise_over_real", ratios),
            **spread("cos_fp32_unfloored", cos32), **spread("cos_fp64", cos64), **measured(),
        ))  # fmt: skip
        print(rows[-1])
    return rows


def arithmetic_noise_rows(device: torch.device) -> list[dict]:
    """The noise of R and S in G's own precision over ``u·‖G‖_F``, largest over ``batch`` draws per
    shape and rank k (r = k + 4); singular values all 1 (flat) or 1 down to 1e-3, geometric (spread)."""
    rows = []
    shapes = [(16, 64, 30), (64, 256, 10), (256, 1024, 3), (2048, 2048, 1)]
    for dtype in (torch.float32, torch.float64):
        u = adamem.unit_roundoff(dtype)
        for projection in ("srsi", "svd"):
            for kind in ("flat", "spread"):
                gen = torch.Generator().manual_seed(0)
                worst_row = worst_resid = 0.0
                for m, n, batch in shapes:
                    for k in (1, 2, 4, 8):
                        sigma = torch.logspace(0, -3 if kind == "spread" else 0, k, dtype=torch.float64)
                        g = torch.stack([spectrum(m, n, sigma, gen) for _ in range(batch)]).to(device, dtype)
                        sketch_rng = torch.Generator(device).manual_seed(0)
                        proj = adamem.top_left_subspace(g, k + 4, projection, generator=sketch_rng)
                        r_proj = proj.mT @ g
                        scale = u * torch.linalg.vector_norm(g, dim=(1, 2))
                        row = torch.linalg.vector_norm(r_proj[:, k:], dim=2).amax(dim=1) / scale
                        resid = torch.linalg.vector_norm(g - proj @ r_proj, dim=(1, 2)) / scale
                        worst_row, worst_resid = max(worst_row, row.max().item()), max(worst_resid, resid.max().item())
                rows.append(dict(
                    measure="arithmetic_noise", dtype=str(dtype).removeprefix("torch."), kind=kind,
                    projection=projection,
                    max_noise_row_over_u_norm=round(worst_row, 2), max_residual_over_u_norm=round(worst_resid, 2),
                    floor_over_max=round(adamem.NOISE_FLOOR / max(worst_row, worst_resid), 2), **measured(),
                ))  # fmt: skip
                print(rows[-1])
    return rows


def accumulated_rows(device: torch.device, draws: int = 3) -> list[dict]:
    """k rank-1 pieces summed in the gradient's dtype, one addition at a time, as autograd
    accumulates them into a bf16 or fp16 ``.grad``."""
    rows = []
    for dtype in DTYPES:
        for m, n in [(64, 128), (256, 512)]:
            for k in (2, 4, 8, 16):
                rank = min(4 * k, m)
                gen = torch.Generator().manual_seed(0)
                cos, once, ratios = [], [], []
                for _ in range(draws):
                    pieces = low_rank(k, m, n, 1, "gaussian", gen).to(device)
                    exact = pieces.sum(dim=0, keepdim=True)
                    acc = pieces[0].to(dtype)
                    for piece in pieces[1:]:
                        acc += piece.to(dtype)
                    g = acc.float().unsqueeze(0)
                    want = first_step(exact.float(), rank, "package")
                    for values, rounded in ((cos, g), (once, exact.to(dtype).float())):
                        got = first_step(rounded, rank, "package")
                        values.append(torch.nn.functional.cosine_similarity(got, want, dim=0).item())
                    ratios.append(((g - exact).norm() / adamem.gradient_rounding_noise(g)[1]).item())
                rows.append(dict(
                    measure="accumulated", case=f"{m}x{n}", micro_batches=k, rank=rank,
                    dtype=str(dtype).removeprefix("torch."), draws=draws, **spread("error_over_estimate", ratios),
                    **spread("cos_accumulated", cos), **spread("cos_rounded_once", once), **measured(),
                ))  # fmt: skip
                print(rows[-1])
    return rows


def tail_noise_rows(device: torch.device, draws: int = 3) -> list[dict]:
    """σ_r of the ``cosine`` rows' full-rank spectra against the error ``E`` of rounding G to
    bf16 or fp16: ``‖E‖_2`` measured (fp64) and ``gradient_rounding_noise``'s estimate."""
    rows = []
    for m, n, r in SPECTRA:
        for a in EXPONENTS:
            gen = torch.Generator().manual_seed(0)
            sigma = torch.arange(1, m + 1, dtype=torch.float64) ** -a
            errors: dict[torch.dtype, list[float]] = {dtype: [] for dtype in DTYPES}
            estimates: dict[torch.dtype, list[float]] = {dtype: [] for dtype in DTYPES}
            for _ in range(draws):
                exact = spectrum(m, n, sigma, gen).to(device, torch.float32).unsqueeze(0)
                norm = torch.linalg.vector_norm(exact.double()).item()
                for dtype in DTYPES:
                    g = exact.to(dtype).float()
                    errors[dtype].append(torch.linalg.matrix_norm((g - exact).double(), ord=2).item() / norm)
                    estimates[dtype].append(adamem.gradient_rounding_noise(g)[0].item() / norm)
            for dtype in DTYPES:
                rows.append(dict(
                    measure="tail_noise", case=f"{m}x{n} full rank, σ_i ∝ i^-{a}", rank=r,
                    dtype=str(dtype).removeprefix("torch."), draws=draws,
                    sigma_r_over_norm=round((sigma[r - 1] / sigma.norm()).item(), 7),
                    **spread("error_spectral_over_norm", errors[dtype], 7),
                    **spread("estimate_spectral_over_norm", estimates[dtype], 7), **measured(),
                ))  # fmt: skip
                print(rows[-1])
    return rows


def cost_rows(device: torch.device) -> list[dict]:
    """``noise_floors`` against the whole steady step, 768×3072 at r = 128, in ms."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(0.02 * torch.randn(768, 3072, generator=gen).to(device))
    w.grad = torch.randn(768, 3072, generator=gen).to(device)
    opt = AdaMeM([w], lr=1e-4, rank=128, update_proj_gap=10**6, seed=0)
    opt.step()  # the one refresh (projection): the timed steps are steady
    g = w.grad.unsqueeze(0)
    times = {}
    for name, fn in (("step", opt.step), ("noise_floors", lambda: adamem.noise_floors(g, torch.float32))):
        median, p20, p80 = in_ms(time_call(fn, device, warmup=2, reps=15))
        times |= {f"{name}_ms": round(median, 2), f"{name}_p20_ms": round(p20, 2), f"{name}_p80_ms": round(p80, 2)}
    rows = [dict(measure="cost", case="768x3072", rank=128, **times, **measured())]
    print(rows[-1])
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    gen = torch.Generator().manual_seed(0)
    rows = noise_rows(device, gen) + cosine_rows(device, gen) + unfloored_rows(device)
    rows += arithmetic_noise_rows(device) + accumulated_rows(device) + tail_noise_rows(device) + cost_rows(device)
    meta = metadata(device, margin=adamem.GRADIENT_NOISE_MARGIN)
    print(write_results("adamem_noise_floors", device, rows, meta, args.out))


if __name__ == "__main__":
    main()
