"""Observability: per-parameter rank, ξ and optimizer-state bytes, next to AdamW's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .distributed import is_dtensor, local


def tensor_bytes(state: dict) -> int:
    """Bytes held by the tensors of one parameter's optimizer state."""
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def reachable_tensors(value) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``value`` through dicts, lists, tuples and object attributes
    (GaLore keeps its projection matrix in a projector object inside the state)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from reachable_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from reachable_tensors(v)
    elif hasattr(value, "__dict__"):
        yield from reachable_tensors(vars(value))


def held_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state keeps alive in this process: each storage its tensors use,
    once, at full size; of a DTensor (FSDP2), its local part's (this rank's shards).

    A view holds its whole buffer: Adapprox's factors of same-shaped layers are views of one
    stacked buffer, GaLore's projector is a slice of a full SVD factor."""
    storages = {}
    for t in reachable_tensors(list(opt.state.values())):
        storage = local(t).untyped_storage()  # a DTensor has no storage of its own
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def adamw_bytes(p: torch.Tensor) -> int:
    """What AdamW keeps for ``p``: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype."""
    return 2 * p.numel() * p.element_size()


@dataclass
class StateRow:
    name: str
    shape: tuple[int, ...]
    kind: str  # "factored" (Adapprox), "lowrank" (AdaMeM), "dense" or "-" (no state yet)
    rank: float | None
    xi: float | None
    state_bytes: int
    adamw_bytes: int
    sharded: bool = False  # its state holds DTensors (FSDP2): the sizes are global


class StateReport:
    """Rows of :class:`StateRow`, their totals, and a printable table (``str(report)``)."""

    def __init__(self, rows: list[StateRow]):
        self.rows = rows

    @property
    def state_bytes(self) -> int:
        """Bytes of every parameter's state tensors at their global shapes. Under FSDP2 that is
        the whole state, as one process would hold it (the replicated ``U`` counted once), not
        this rank's: each rank holds its rows of ``Q`` and of the moments, plus all of ``U``
        (:func:`held_bytes` counts this process's)."""
        return sum(r.state_bytes for r in self.rows)

    @property
    def adamw_bytes(self) -> int:
        return sum(r.adamw_bytes for r in self.rows)

    @property
    def ratio_to_adamw(self) -> float:
        return self.state_bytes / self.adamw_bytes if self.adamw_bytes else float("nan")

    @property
    def mean_rank(self) -> float:
        ranks = [r.rank for r in self.rows if r.rank is not None]
        return sum(ranks) / len(ranks) if ranks else float("nan")

    def __repr__(self) -> str:
        return (
            f"StateReport({len(self.rows)} params, state={self.state_bytes} B, "
            f"adamw={self.adamw_bytes} B, ratio={self.ratio_to_adamw:.3f}, mean_rank={self.mean_rank:.2f})"
        )

    def __str__(self) -> str:
        w = max([len("parameter")] + [len(r.name) for r in self.rows])  # whole names: "….weight" vs "….bias"
        # Columns as wide as their widest entry: an MoE weight's shape, a large model's byte totals.
        ws = max([16] + [len(str(tuple(r.shape))) for r in self.rows])
        wb = max(11, len(str(self.state_bytes)), len(str(self.adamw_bytes)))
        head = f"{'shape':>{ws}s} {'kind':>9s} {'rank':>7s} {'xi':>9s} {'state B':>{wb}s} {'AdamW B':>{wb}s}"
        lines = [f"{'parameter':{w}s} {head}"]
        for r in self.rows:
            rank = "-" if r.rank is None else f"{r.rank:.2f}"
            xi = "-" if r.xi is None else f"{r.xi:.2e}"
            lines.append(
                f"{r.name:{w}s} {str(tuple(r.shape)):>{ws}s} {r.kind:>9s} {rank:>7s} {xi:>9s} "
                f"{r.state_bytes:>{wb}d} {r.adamw_bytes:>{wb}d}"
            )
        # No factored matrix (or no state yet): no mean rank, no ratio; "-", as in the rows.
        mean_rank = "-" if self.mean_rank != self.mean_rank else f"{self.mean_rank:.2f}"
        ratio = f"  ({100 * self.ratio_to_adamw:.1f}% of AdamW)" if self.adamw_bytes else ""
        lines.append(
            f"{'total':{w}s} {'':>{ws}s} {'':>9s} {mean_rank:>7s} {'':>9s} {self.state_bytes:>{wb}d} "
            f"{self.adamw_bytes:>{wb}d}{ratio}"
        )
        if any(r.sharded for r in self.rows):
            lines.append(
                "(DTensor state, FSDP2: global sizes, the whole state as one process holds it; each rank holds its "
                "rows of Q and of the moments, plus all of U, which held_bytes(opt) counts)"
            )
        return "\n".join(lines)


def report_rows(opt: torch.optim.Optimizer) -> list[StateRow]:
    rows = []
    for gi, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            state = opt.state.get(p, {})
            kind = "factored" if "Q" in state else "lowrank" if "P" in state else ("dense" if state else "-")
            xi = state.get("xi")
            rows.append(
                StateRow(
                    name=names[pi] if names else f"group{gi}.param{pi}",
                    shape=tuple(p.shape),
                    kind=kind,
                    rank=state.get("rank"),
                    xi=None if xi is None or xi != xi else xi,
                    state_bytes=tensor_bytes(state),
                    # AdamW's state is lazy too: a parameter that never had a gradient holds none.
                    adamw_bytes=adamw_bytes(p) if state else 0,
                    sharded=any(map(is_dtensor, state.values())),
                )
            )
    return rows
