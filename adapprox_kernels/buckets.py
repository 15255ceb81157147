"""Adapprox's buckets: a param group's parameters of one kind (factored or dense), shape,
dtype, device and DTensor layout, which the step takes through S-RSI and the update as one
batched call. They are formed where a parameter's state is made, and remembered from one step
to the next while the same parameters on the same storage step with the same state (sorting
hundreds of parameters every step would cost); what a remembered bucket would keep alive is
forgotten: a state dropped from ``opt.state``, a group or a parameter removed, a factor that
views a larger stack.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from .distributed import is_dtensor

# A C getter for map(), as the step reads hundreds of tensors.
_dtype = operator.attrgetter("dtype")


def _shares_a_larger_storage(t: torch.Tensor) -> bool:
    """Is ``t`` a view of a larger tensor (a factor stack)? By its ``_base``, or where it has
    none (views made under ``torch.inference_mode``) by its storage's size."""
    if t._base is not None:
        return t._base.numel() > t.numel()
    return not is_dtensor(t) and t.untyped_storage().nbytes() > t.numel() * t.element_size()


class BucketMixin:
    """The step's buckets, formed and remembered (:meth:`_buckets`), before
    :class:`~adapprox_kernels.optim_base.SketchOptimizer` in the bases of
    :class:`~adapprox_kernels.adapprox.Adapprox`. It reads the optimizer's ``state`` and
    ``param_groups``, Adapprox's ``_init_state`` (a factored state holds ``"Q"``) and the base
    class's ``_check_no_aliases``, ``_check_state_fits`` and ``_match_state_dtypes``. A step
    that deletes the states it made (discarded for a bad gradient, or raising before any work)
    sets ``self._marks["stale_scan_due"]``: the buckets remembered may hold them."""

    def _reset_step_caches(self) -> None:
        super()._reset_step_caches()
        self._bucket_cache: dict[tuple, tuple] = {}  # see _buckets
        self._last_buckets: dict[int, tuple] = {}  # id(group) -> its _bucket_cache entry of the last step
        # Written during a step: an entry of a dict each, not an attribute of the optimizer (the
        # dynamo of torch 2.10 and 2.11 cannot set one in a compiled step: pytorch#171590). The
        # subclass adds its own.
        self._marks: dict[str, Any] = {
            "stale_scan_due": True,  # _forget_stale_buckets at the step's first miss
            "group_lists": None,  # (group, its params list, its length) at the last step
        }

    def _buckets(
        self, params: list[torch.Tensor], group: dict[str, Any]
    ) -> tuple[dict[tuple, tuple[list[torch.Tensor], list[dict[str, Any]]]], list[torch.Tensor]]:
        """Same-kind, same-shape parameters: ``(factored, shape, dtype, device, DTensor layout)``
        -> ``(parameters, their state)`` (each bucket is one batched call), read-only; and the
        parameters whose state this call made (state is lazy: this is where it is made).

        Remembered from the last call: the same parameters on the same storage, of the same
        dtype (a parameter moved or cast in place gets new storage, though a cast may land at
        the old address) whose state is still there (the same
        ``self.state``, as many entries, none emptied; ``load_state_dict`` goes through
        ``__setstate__``, which forgets everything) fall into the same buckets. Sorting hundreds
        of parameters and looking up their state (a Python hash per lookup) would cost every step.
        Where they are not remembered, each state made before is checked to fit its parameter's
        shape (:meth:`_check_state_fits`): a parameter's shape changes with its storage, or with
        its sizes (``p.data = p.data.t()``), both in the key; and it is cast to the dtypes its
        parameter's dtype asks for (:meth:`_match_state_dtypes`), which is in the key too."""
        key = tuple(tuple(map(f, params)) for f in (id, torch.Tensor.data_ptr, torch.Tensor.size, _dtype))
        cached = self._bucket_cache.get(key)
        if cached is not None:
            state_map, size, buckets, states, idle = cached
            # Each parameter's state is still the dict the buckets hold (``opt.state[p] = {}``
            # replaces it), and none was emptied: identity checks by ``map``, no Python loop.
            if (
                state_map is self.state and len(self.state) == size and all(states)
                and all(map(operator.is_, map(self.state.__getitem__, params), states))
            ):  # fmt: skip
                # The same parameters sat out last step too: they were compacted then, and no
                # view has come to them since (frozen layers cost nothing a step).
                if idle and self._last_buckets.get(id(group)) is not cached:
                    self._compact_factors(idle)
                self._last_buckets[id(group)] = cached
                return buckets, []
        self._check_no_aliases(params)  # a storage shared since the last step misses too
        new, cast = [], False
        for p in params:
            if self.state[p]:
                self._check_state_fits(p, self.state[p])
                cast |= self._match_state_dtypes(p, self.state[p])  # a dtype change misses the cache too
            else:
                new.append(p)
        if cast:  # what is remembered for the old dtypes holds these states: their storage may come back
            self._bucket_cache.clear()
        buckets: dict[tuple, tuple[list[torch.Tensor], list[dict[str, Any]]]] = {}
        states = []  # in the order of params
        for p in params:
            state = self.state[p] or self._init_state(p, group)
            states.append(state)
            # The parameter's own shape, not its matrix view: a Conv2d(64, 128, 1) weight folds
            # to the (128, 64) of a Linear(64, 128) but is written back in its own shape. A
            # DTensor's layout too: a bucket is stepped as its first member is sharded.
            layout = (p.device_mesh, tuple(p.placements)) if is_dtensor(p) else None
            kind = ("Q" in state, tuple(p.shape), p.dtype, p.device, layout)
            bucket, bucket_states = buckets.setdefault(kind, ([], []))
            bucket.append(p)
            bucket_states.append(state)
        active = set(map(id, params))
        idle = [p for p in group["params"] if id(p) not in active]
        if idle:  # eager under torch.compile: not a graph break every step
            self._compact_factors(idle)
        # Every group's list of the step, and a few more (who has a gradient may alternate); the
        # rare other list is recomputed. (A fixed 8 missed every step with more groups.)
        if len(self._bucket_cache) >= 8 + 2 * len(self.param_groups):
            self._bucket_cache.clear()
        elif self._marks["stale_scan_due"]:  # once a step: every group may miss (routed experts)
            self._forget_stale_buckets()
            self._marks["stale_scan_due"] = False
        self._bucket_cache[key] = self._last_buckets[id(group)] = (self.state, len(self.state), buckets, states, idle)
        return buckets, new

    def _forget_stale_buckets(self) -> None:
        """Drops the remembered buckets that hold a state no longer in ``self.state``: one
        removed or replaced (``del opt.state[p]`` or ``opt.state[p] = {}`` to free a frozen
        layer's memory, ``opt.state.clear()``, the new states of a step discarded for a bad
        gradient). Such an entry keeps that state's tensors alive, outside ``opt.state`` and so
        outside every byte count, until its pattern of gradients comes back, possibly never.
        Runs at a step's first cache miss (a state removed, or replaced while its parameter
        steps, or which parameters have gradients changed), and again after a discarded step,
        never on steps that only hit: a state replaced by another dict while its parameter sits
        out is dropped at the next miss (``del opt.state[p]`` or ``opt.state[p].clear()`` frees
        it at once)."""
        state = self.state
        stale = [
            key for key, (state_map, _, buckets, _, _) in self._bucket_cache.items()
            if state_map is not state or not all(
                all(map(operator.is_, map(state.get, bucket), states)) for bucket, states in buckets.values()
            )
        ]  # fmt: skip
        for key in stale:
            del self._bucket_cache[key]

    def _forget_removed_groups(self) -> None:
        """Also forgets the remembered buckets (see :meth:`_buckets`) where a group left
        ``param_groups`` or a parameter its group's list (model surgery) since the last step:
        they may hold parameters of no group, with their gradients and state (GPU memory), for
        as long as the optimizer lives. They are made anew at this step (once). The
        record holds the groups, so that their ids stay theirs."""
        super()._forget_removed_groups()
        self._marks["stale_scan_due"] = True  # the step's start: states may have been dropped since the last
        lists = [(group, group["params"], len(group["params"])) for group in self.param_groups]
        seen = self._marks["group_lists"]
        if seen is not None and not (len(seen) == len(lists) and all(
            group is was and params is had and size == count
            for (group, params, size), (was, had, count) in zip(lists, seen, strict=True)
        )):  # fmt: skip
            self._bucket_cache.clear()
            self._last_buckets.clear()
        self._marks["group_lists"] = lists

    def _compact_factors(self, idle: list[torch.Tensor]) -> None:
        """Copies out the factors of the parameters that sit out this step (no gradient),
        where they are views of a stack that other parameters move on from (see
        ``Adapprox._store_factors``): such a view would keep the whole stack alive, in memory and in
        every checkpoint. Wherever who sits out changed since the group's last step, remembered
        buckets too: with a pattern that repeats (experts of a mixture, routed in turn), a
        parameter back from an idle step gets a view of a new stack, and idles again with it."""
        for p in idle:
            state = self.state.get(p)
            for key in ("Q", "U") if state else ():
                factor = state.get(key)
                if torch.is_tensor(factor) and _shares_a_larger_storage(factor):
                    state[key] = factor.clone()
