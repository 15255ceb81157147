"""Triton kernels of the Adapprox step. Importing a submodule imports triton.

``V_t = β2·relu(Q Uᵀ) + (1−β2)·G²`` is never stored: every kernel of a factored parameter rebuilds
the tiles of V it needs in registers from the previous factors ``Q (m×K)``, ``U (n×K)`` and the
gradient ``G`` (see ``docs/kernels.md``). One op per file:

* :mod:`.v_matmul` — ``V @ X`` and ``Vᵀ @ Y`` for thin ``X``, ``Y`` (first pass can also
  reduce ``‖V‖²`` and the update's ``Σ (G/(√V+ε))²``);
* :mod:`.v_norms` — ``‖V‖²``, ``‖V − Q_t U_tᵀ‖²`` and ``Σ (G/(√V+ε))²`` as a reduction pass;
* :mod:`.update_cosine` — the sums cosine guidance needs (update · new momentum);
* :mod:`.apply_update` — clipping, momentum of updates, weight decay, the weight write, and
  optionally the ξ numerator ``‖V − Q_t U_tᵀ‖²`` in the same pass;
* :mod:`.dense_moment` — the same step for parameters whose ``V`` is stored (vectors,
  matrices too small to factor): a sums pass, then the update pass, which also writes ``V``;
* :mod:`.jacobi_eigh` — the eigen-decomposition of S-RSI's small ``r × r`` Grams (Rayleigh–Ritz)
  without a host sync.

:mod:`._tiles` holds the ``@triton.jit`` helpers they share, :mod:`._launch` the host-side
pieces (matrix tables, block sizes, dot precision).
"""
