"""Rank adaptation: how many columns each factored second moment keeps.

Two policies, both per matrix:

* ``"step"`` (ICLR version, default): every step, grow the rank by Δk when ξ > ξ_thresh, else
  shrink by Δk (:func:`next_rank_step`), then smooth it with the rank moment
  ``k_t = β3·k_{t−1} + (1−β3)·k_next`` (:func:`rank_moment`). ``k_t`` is a float; the factors
  keep ``round(k_t)`` columns.
* ``"sigmoid"`` (arXiv version): every Δs steps measure ξ; when ξ > ξ_thresh grow the rank by
  :func:`sigmoid_increment`. The arXiv text lost the formula of f in extraction; we use
  ``f(ξ) = max(⌈η / (1 + exp(−ω·(ξ − τ)))⌉ − φ, 0)``: bounded by η, steepness ω, centre τ,
  offset φ. The rank never shrinks under this policy.
"""

from __future__ import annotations

import math

RANK_POLICIES = ("step", "sigmoid")


def step_rank_delta(k_max: int) -> int:
    """Δk = max(⌈0.02·k_max⌉, 1), the paper's step size."""
    return max(math.ceil(0.02 * k_max), 1)


def next_rank_step(rank: int, xi: float, xi_thresh: float, k_min: int, k_max: int) -> int:
    """Algorithm 2's rule: grow by Δk when ξ > ξ_thresh, else shrink by Δk; clamp to bounds.
    A NaN ξ (nothing measured) keeps the rank."""
    if xi != xi:
        return min(max(rank, k_min), k_max)
    delta = step_rank_delta(k_max)
    k_next = rank + delta if xi > xi_thresh else rank - delta
    return min(max(k_next, k_min), k_max)


def rank_moment(k_prev: float, k_next: int, beta3: float) -> float:
    """Algorithm 3's rank moment: the exponential moving average of the rank."""
    return beta3 * k_prev + (1.0 - beta3) * k_next


def sigmoid_increment(xi: float, eta: float, omega: float, tau: float, phi: float) -> float:
    """The arXiv policy's growth f(ξ) (our documented form, see the module docstring); 0 for a
    NaN ξ (nothing measured)."""
    if xi != xi:
        return 0.0
    z = -omega * (xi - tau)
    # exp overflows past ~709; the sigmoid is 0 there anyway.
    s = 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))
    return max(math.ceil(eta * s) - phi, 0.0)
