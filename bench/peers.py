"""The optimizers the tables compare, each built from its own installed package (never a
re-implementation), on GPT-2-shaped parameters built with the main job's model class.

* ``adamw``: ``torch.optim.AdamW`` (``fused=True``: the fused kernel on CUDA, and on CPU too);
* ``adafactor``: ``torch.optim.Adafactor`` (torch's version keeps no first moment, so β1 does not
  apply to it);
* ``came``: ``came_pytorch.CAME`` with its README's betas ``(β1, 0.999, 0.9999)`` and eps;
* ``galore``: ``galore_torch.GaLoreAdamW`` on the attention and MLP matrices (rank ``r``,
  projection refreshed every 200 steps, scale 0.25, as in GaLore's recipe), plain Adam
  (the same class without a rank) on everything else;
* ``adamem``: ours (:class:`~adapprox_kernels.AdaMeM`) at GaLore's rank ``r``, projection
  refreshed every 200 steps, β2 = 0.95 (its paper's default);
* ``adafactor-m``: Adafactor with momentum, Hugging Face's (``transformers``, the one with β1;
  absolute lr, no parameter scaling);
* ``adapprox``: ours at a fixed rank ``k`` (``k_init = k_min = k_max = k``), reference backend
  unless told otherwise.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import nn

from adapprox_kernels import AdaMeM, Adapprox
from adapprox_kernels.state_report import held_bytes, reachable_tensors
from adapprox_kernels.train.model import GPT, Block, GPTConfig
from adapprox_kernels.train.runner import matrix_type

# GPT-2 parameter shapes (vocabulary 50,257, context 1,024) in the main job's model class; its
# Linear weights are the transposes of GPT-2's Conv1D weights, which changes no count.
GPT2 = {
    "gpt2-124m": GPTConfig(vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-345m": GPTConfig(vocab_size=50257, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
    # The paper's "GPT-2 1.1B" (Table 8): its AdamW figure, 7,089.92 MiB = 8 bytes × 929,289,856
    # parameters, and its k = 1 figure are matched exactly by this GPT-2-structured shape
    # (width 1,408, 36 layers: bench/results/table2_8_state_memory_cpu.md); no other (width,
    # layers) pair near 1.1B matches both.
    "gpt2-1.1b": GPTConfig(vocab_size=50257, seq_len=1024, n_layer=36, n_head=16, d_model=1408),
}
# GaLore's ranks for similar sizes in its paper (130M, 350M: 256; 1B: 512).
GALORE_RANK = {"gpt2-124m": 256, "gpt2-345m": 256, "gpt2-1.1b": 512}
GALORE_TYPES = ("qkv", "proj", "fc", "fc_out")
PEERS = ("adamw", "adafactor", "came", "galore", "adamem", "adafactor-m", "adapprox")


def meta_model(size: str) -> GPT:
    """The full model with parameters on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return GPT(GPT2[size])


def param_kinds(size: str) -> Counter:
    """``{(matrix type, shape): count}`` of the model's parameters. Every optimizer here keeps
    state per parameter that depends only on its shape (and, for GaLore, on its type), so
    instantiating one parameter of each kind for real and multiplying is an exact count."""
    kinds = Counter()
    for name, p in meta_model(size).named_parameters():
        kinds[(matrix_type(name) if p.dim() >= 2 else "vector", tuple(p.shape))] += 1
    return kinds


def block_params(size: str, device: torch.device | str, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """One transformer block of the model, as named parameters with random gradients."""
    torch.manual_seed(seed)
    block = Block(GPT2[size]).to(device)
    named = []
    for name, p in block.named_parameters():
        p.grad = 1e-3 * torch.randn_like(p)
        named.append((f"blocks.0.{name}", p))
    return named


def model_params(size: str, device: torch.device | str, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """Every parameter of the model, as named parameters with random gradients."""
    torch.manual_seed(seed)
    named = list(GPT(GPT2[size]).to(device).named_parameters())
    for _, p in named:
        p.grad = 1e-3 * torch.randn_like(p)
    return named


def build(
    name: str,
    named: Sequence[tuple[str, nn.Parameter]],
    *,
    beta1: float = 0.9,
    k: int | None = None,
    galore_rank: int = 256,
    backend: str = "auto",
) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``named`` parameters (the learning rate is irrelevant here)."""
    params = [p for _, p in named]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, betas=(beta1, 0.999), weight_decay=0.1, fused=True)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name == "came":
        from came_pytorch import CAME

        return CAME(params, lr=1e-4, betas=(beta1, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=0.1)
    if name == "galore":
        from galore_torch import GaLoreAdamW

        low = [p for n, p in named if p.dim() == 2 and matrix_type(n) in GALORE_TYPES]
        rest = [p for n, p in named if not (p.dim() == 2 and matrix_type(n) in GALORE_TYPES)]
        groups = [{"params": rest}] if rest else []
        if low:
            groups.append(dict(params=low, rank=galore_rank, update_proj_gap=200, scale=0.25, proj_type="std"))
        return GaLoreAdamW(groups, lr=1e-4, betas=(beta1, 0.999), weight_decay=0.1, no_deprecation_warning=True)
    if name == "adamem":
        return AdaMeM(
            named, lr=1e-4, betas=(beta1, 0.95), rank=galore_rank, update_proj_gap=200, weight_decay=0.1, seed=0
        )
    if name == "adafactor-m":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, beta1=beta1, relative_step=False, scale_parameter=False, warmup_init=False)
    if name == "adapprox":
        if k is None:
            raise ValueError("adapprox needs a rank k")
        return Adapprox(named, lr=1e-4, betas=(beta1, 0.999, 0.9), k_init=k, k_min=k, k_max=k, backend=backend, seed=0)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {PEERS}")


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """``(held, logical)`` bytes of the optimizer's state.

    ``held`` is the main job's count (:func:`~adapprox_kernels.state_report.held_bytes`): the
    storages the state's tensors keep alive, each once. ``logical`` sums ``numel × element size``
    of the tensors themselves, each once, which is less when a view leaves part of its buffer
    unused: GaLore's projector is a slice of the full SVD factor."""
    tensors = {id(t): t for t in reachable_tensors(list(opt.state.values()))}
    return held_bytes(opt), sum(t.numel() * t.element_size() for t in tensors.values())
