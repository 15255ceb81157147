"""Saving and loading an optimizer's state: the ``state_dict`` and ``load_state_dict`` of
:class:`~adapprox_kernels.optim_base.SketchOptimizer`, which inherits them from
:class:`CheckpointMixin`.

A checkpoint holds torch.optim's dict (``"state"``, ``"param_groups"``), the sketch RNG
(``"sketch_rng"``: the seed and each device's generator state, so that a resumed run draws the
same sketches) and, where some parameter is a DTensor (FSDP2), ``"dtensor_rank"``: the rank
whose shards the state holds. A load checks the saved groups and every parameter's state
before it changes anything, and keeps each state tensor's own dtype.

The hooks a subclass overrides: ``_saved_shapes`` (what a parameter's saved state holds, at
which shapes) and ``_saved_mismatches`` (its other checks), ``_export_state`` (the saved form
of the state) and ``_complete_loaded_state`` (the live form again), ``_draws_sketches`` (does
a resume without the RNG change the numbers?) and ``_RUN_OPTIONS`` (the options a load keeps).
"""

from __future__ import annotations

import numbers
import warnings
from collections import defaultdict
from types import EllipsisType
from typing import Any

import torch

from ._stacklevel import _outside_stacklevel
from .distributed import is_dtensor, local, process_rank
from .options import as_python, is_int


def _seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A new generator of ``device`` seeded with ``seed`` (the sketch RNG of that device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _holding(sharded: bool, rank: dict[str, int] | None) -> str:
    """What a parameter's state holds, in words: whole tensors, or which rank's shards."""
    if not sharded:
        return "whole tensors"
    if rank is None:
        return "DTensor shards of an unrecorded rank"
    return f"DTensor shards of rank {rank['rank']} of {rank['world_size']}"


class CheckpointMixin:
    """``state_dict``, ``load_state_dict`` and the sketch RNG's saved form (for pickles and copies
    too), before ``torch.optim.Optimizer`` in the bases of
    :class:`~adapprox_kernels.optim_base.SketchOptimizer`. It reads that class's sketch RNG
    (``_seed``, ``_generators``), ``_param_name``, ``_check_hyperparameters`` and
    ``_state_dtype`` (the step's too: the dtype a state tensor is kept in); a load that brings a sketch
    RNG clears its ``_seed_unshared``."""

    def _rng_state(self) -> dict[str, Any]:
        return {"seed": self._seed, "states": {k: g.get_state() for k, g in self._generators.items()}}

    def _restore_rng(self, rng: dict[str, Any]) -> None:
        """The saved generator of each device the parameters are on; where there is none, the
        one saved for another device of its type if there is just one (a checkpoint of rank 0's
        ``cuda:0`` loaded on rank 1's ``cuda:1``: under DDP every rank must draw rank 0's
        sketches); else that device's generator restarts from the seed. Generators of devices
        no parameter is on are not made (a GPU run's checkpoint loads on a CPU-only machine)."""
        self._seed, self._generators = self._saved_generators(rng)

    def _saved_generators(self, rng: dict[str, Any]) -> tuple[int, dict[str, torch.Generator]]:
        """``(seed, generators)`` that :meth:`_restore_rng` installs, made without touching this
        optimizer's (raises where the seed or a state does not fit torch's generators)."""
        seed, generators = int(rng["seed"]), {}
        saved = rng["states"]
        by_type = defaultdict(list)
        for key in saved:
            by_type[torch.device(key).type].append(saved[key])
        for device in {local(p).device for group in self.param_groups for p in group["params"]}:
            state = saved.get(str(device))
            if state is None and len(by_type[device.type]) == 1:
                state = by_type[device.type][0]
            if state is not None:
                gen = generators[str(device)] = _seeded_generator(device, seed)
                # set_state takes a CPU ByteTensor only (for every device's generator), and
                # torch.load(..., map_location="cuda") moves the saved one with everything else.
                gen.set_state(state.to("cpu"))
        return seed, generators

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus the sketch RNG and, where some parameter is a DTensor
        (FSDP2), ``"dtensor_rank"``: the rank whose shards its state holds (see
        :meth:`load_state_dict`). These are in it before the user's post-hooks run (ours is
        registered first, per call)."""
        hook = self.register_state_dict_post_hook(CheckpointMixin._add_own_entries, prepend=True)
        try:
            return super().state_dict()
        finally:
            hook.remove()

    def _add_own_entries(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # A NumPy number a scheduler wrote into a group (LambdaLR's lambda returning np.float64)
        # as the Python number it holds: torch.load(weights_only=True) refuses NumPy scalars.
        # (The saved groups are copies; the live ones keep what the scheduler wrote.)
        for group in state_dict["param_groups"]:
            for key, value in group.items():
                if key not in ("params", "param_names"):
                    group[key] = as_python(value)
        state_dict["sketch_rng"] = self._rng_state()
        self._export_state(state_dict["state"])
        if any(is_dtensor(p) for group in self.param_groups for p in group["params"]):
            state_dict["dtensor_rank"] = process_rank()
        return state_dict

    def _export_state(self, saved: dict[Any, dict[str, Any]]) -> None:
        """Rewrites the entries of ``state_dict()["state"]`` (which are the live per-parameter
        dicts: replace them, do not edit them) into their saved form. None by default."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, with three differences.

        * Every parameter's saved state is checked to fit it first (a ``ValueError`` naming the
          parameter otherwise, and nothing is loaded: torch.optim would load another
          optimizer's or model's state, and the next step would fail far from the cause).
          The state of a DTensor parameter (FSDP2) holds only the saving rank's shards, so it
          loads only on the rank that saved it (in a process group of the same size), into
          DTensor parameters: another rank's shards of the same shape would train on its
          moments; ``adapprox_kernels.distributed.load_optimizer_state`` reshards. The saved groups'
          options, the order of their ``param_names`` and the sketch RNG are checked alike.
        * Saved tensors keep the precision this optimizer keeps them in (:meth:`_state_dtype`),
          not the parameter's dtype that torch.optim casts every floating tensor to; and they
          are copied, where torch.optim keeps the given tensors of matching dtype and device:
          the dict handed in (a checkpoint kept in memory) never changes with the run.
        * The options that say how to run, not what to compute (``_RUN_OPTIONS``, e.g. the
          backend), stay this optimizer's: a GPU run's checkpoint resumes on a CPU.

        These happen between the user's hooks: after every pre-hook (which may rewrite the
        dict) and before every post-hook (which may rewrite the state)."""
        run_options = [{k: g[k] for k in self._RUN_OPTIONS if k in g} for g in self.param_groups]
        pre = self.register_load_state_dict_pre_hook(CheckpointMixin._take_saved_state)
        post = self.register_load_state_dict_post_hook(CheckpointMixin._restore_saved_state, prepend=True)
        self._loading = run_options
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
            self._loading = None

    _RUN_OPTIONS: tuple[str, ...] = ()

    def _take_saved_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Pre-hook (the last): checks the saved state and sets aside its tensors and RNG."""
        state_dict = dict(state_dict)
        rng = state_dict.pop("sketch_rng", None)
        saved_on = state_dict.pop("dtensor_rank", None)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        for i, saved_group in enumerate(state_dict["param_groups"]):
            self._check_saved_group(i, saved_group)
        self._check_saved_order(state_dict["param_groups"])
        same_groups = sizes == [len(g["params"]) for g in self.param_groups]
        if same_groups:  # (torch.optim raises where the groups differ)
            for idx, p in zip(saved_ids, params, strict=True):
                self._check_saved_state(p, state_dict["state"].get(idx))
                self._check_saved_shards(p, state_dict["state"].get(idx), saved_on)
        tensors = (
            [(p, state_dict["state"].get(idx, {})) for idx, p in zip(saved_ids, params, strict=True)]
            if same_groups
            else []
        )
        if rng is None and state_dict["state"] and self._draws_sketches(state_dict["param_groups"]):
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the checkpoint has no sketch RNG ('sketch_rng': torch's "
                "get_optimizer_state_dict and ZeroRedundancyOptimizer.consolidate_state_dict drop it; "
                "adapprox_kernels.distributed.optimizer_state_dict keeps it). The state loads; the optimizer keeps "
                "its own seed and generators, so its Gaussian sketches from here on differ from the uninterrupted "
                "run's: the same algorithm, not the same numbers.",
                UserWarning,
                stacklevel=_outside_stacklevel(),
            )
        self._loading = (self._loading, tensors, None if rng is None else self._checked_rng(rng))
        return state_dict

    def _draws_sketches(self, groups: list[dict[str, Any]]) -> bool:
        """Does a step with these (the saved, about to be loaded) param groups draw from the
        sketch RNG, so that a resume without it changes the numbers?"""
        return True

    def _check_saved_group(self, i: int, saved_group: dict[str, Any]) -> None:
        """``ValueError`` unless the saved ``param_groups[i]`` passes the checks a group's do: the
        saved groups replace ours (another optimizer's, e.g. AdamW's two betas, would fail steps
        later). The run options stay ours; keys we do not know (a scheduler's initial_lr) are not
        ours to check."""
        # NumPy numbers (a hand-edited checkpoint's) as the Python ones they hold, as the constructor
        # and the step take them.
        own = {k: as_python(v) for k, v in saved_group.items() if k in self.defaults and k not in self._RUN_OPTIONS}
        # The step takes any real lr: a NumPy number (a LambdaLR's), checked here by value, or a
        # one-element floating tensor filled in place (torch.optim's habit), which the checks
        # read themselves (lr_value), as the step does.
        lr = own.get("lr")
        if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
            own["lr"] = float(lr)
        try:
            self._check_hyperparameters({**self.defaults, **own})
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved param_groups[{i}] does not fit: {err}. "
                "Either the checkpoint is another optimizer's, or the value was written into param_groups "
                "after the last step (or by a version that did not check such writes): mend it in the saved "
                "dict's param_groups before loading"
            ) from None

    def _check_saved_order(self, saved_groups: list[dict[str, Any]]) -> None:
        """``ValueError`` where the checkpoint and this optimizer both name their parameters
        (``named_parameters()``) with the same names but in another order (layers defined in
        another order, param groups swapped). The state is matched by position, as torch.optim
        matches it, so same-shaped parameters (q and k projections) would take each other's
        state and names without a word. Other names (a compiled model's ``_orig_mod.``) load as
        torch.optim loads them."""
        if not all("param_names" in g for g in [*saved_groups, *self.param_groups]):
            return
        saved = [(name, g, j) for g, group in enumerate(saved_groups) for j, name in enumerate(group["param_names"])]
        theirs = [name for name, _, _ in saved]
        ours = [name for group in self.param_groups for name in group["param_names"]]
        if theirs == ours or sorted(theirs) != sorted(ours):
            return
        (was, g, j), now = next((s, o) for s, o in zip(saved, ours, strict=True) if s[0] != o)
        raise ValueError(
            f"{type(self).__name__}.load_state_dict: the checkpoint lists the same parameter names in another "
            f"order: its param_groups[{g}]['params'][{j}] is {was!r}, this optimizer's is {now!r}. The state is "
            "matched by position, so it would load into the wrong parameters; build the optimizer with its groups "
            "and parameters in the checkpoint's order (or reorder the saved dict in a load_state_dict pre-hook, "
            "param_names included)"
        )

    def _checked_rng(self, rng: Any) -> tuple[int, dict[str, torch.Generator]]:
        """The saved ``sketch_rng`` as the ``(seed, generators)`` that the post-hook installs
        (:meth:`_saved_generators`); ``ValueError`` before anything is loaded where it is not one
        (a bad one used to fail in the post-hook, the state already loaded)."""
        states = rng.get("states") if isinstance(rng, dict) else None
        # The seed in the range the constructor takes (torch.Generator.manual_seed's).
        ok = isinstance(states, dict) and is_int(rng.get("seed")) and -(2**63) <= rng["seed"] < 2**64
        for key, value in states.items() if ok else ():
            try:
                torch.device(key)
            except (RuntimeError, TypeError):
                ok = False
            ok = ok and torch.is_tensor(value) and value.dtype == torch.uint8 and value.dim() == 1
        if ok:  # the states this optimizer would take fit its devices' generators (their size)
            try:
                seed_and_generators = self._saved_generators(rng)
            except (RuntimeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved sketch_rng is not "
                "{'seed': int, 'states': {device: uint8 tensor}}"
            )
        return seed_and_generators

    def _restore_saved_state(self) -> None:
        """Post-hook (the first): the saved tensors at this optimizer's precision, this
        optimizer's run options, the sketch RNG."""
        run_options, tensors, rng = self._loading
        for p, saved in tensors:
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=self._state_dtype(p, key, value), copy=True)
            if saved:
                self._complete_loaded_state(p, self.state[p])
        for group, options in zip(self.param_groups, run_options, strict=True):
            group.update(options)
        if rng is not None:  # (seed, generators), made by _checked_rng
            self._seed, self._generators = rng
            self._seed_unshared = False  # the checkpoint's seed, common to the ranks, is kept

    def _complete_loaded_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Brings ``p``'s loaded ``state`` to the live form a step reads, before the user's
        post-hooks see it. Nothing by default."""

    def _check_saved_state(self, p: torch.Tensor, state: dict[str, Any] | None) -> None:
        """``ValueError`` unless ``state`` (None: the parameter had none) fits ``p``
        (:meth:`_state_problems`)."""
        problems = self._state_problems(p, state)
        if problems:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved state of {self._param_name(p)} "
                f"(shape {tuple(p.shape)}) does not fit it: {'; '.join(problems)}. Was it saved by another "
                "optimizer, or for another model?"
            )

    def _state_problems(self, p: torch.Tensor, state: dict[str, Any] | None) -> list[str]:
        """What in ``state`` (None: the parameter had none) does not fit ``p``, in words: every
        entry that :meth:`_saved_shapes` asks for, at that shape: tensors of floating point, a
        step count that is an int >= 0 (a float or a string loaded, and failed at the next
        step); then :meth:`_saved_mismatches`."""
        if not state:
            return []
        problems = []
        for key, shape in self._saved_shapes(p, state).items():
            if key not in state:
                problems.append(f"no {key!r}")
            elif (shape is not None) != torch.is_tensor(state[key]):  # e.g. torch.optim's tensor step
                want = "a tensor" if shape is not None else "a number"
                problems.append(f"{key!r} is a {type(state[key]).__name__}, not {want}")
            elif shape is None and key == "step" and not (is_int(state[key]) and state[key] >= 0):
                problems.append(f"'step' is {state[key]!r}, not an int >= 0")
            elif shape is not None and not state[key].is_floating_point():
                problems.append(f"{key!r} holds {state[key].dtype}, not floating point")
            elif shape not in (None, ...) and tuple(state[key].shape) != shape:
                problems.append(f"{key!r} is {tuple(state[key].shape)}, not {shape}")
        return problems + self._saved_mismatches(p, state)

    def _saved_shapes(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, tuple[int, ...] | EllipsisType | None]:
        """What a saved state of ``p`` must hold: entry -> its shape (None: not a tensor; ``...``:
        a tensor whose shape the state does not tell)."""
        raise NotImplementedError

    def _saved_mismatches(self, p: torch.Tensor, state: dict[str, Any]) -> list[str]:
        """What else in a saved state of ``p`` does not fit it, in words (a subclass's checks
        beyond the shapes of :meth:`_saved_shapes`). None by default."""
        return []

    def _check_saved_shards(self, p: torch.Tensor, state: dict[str, Any] | None, saved_on: dict | None) -> None:
        """``ValueError`` unless ``state`` holds what ``p`` needs: whole tensors for a plain
        parameter, this rank's shards for a DTensor one. ``saved_on``: the rank whose shards the
        state dict holds (``"dtensor_rank"``). Global shapes alike, :meth:`_check_saved_state`
        cannot tell another rank's shards (or a whole tensor unpickled as a DTensor) apart."""
        if not state:
            return
        have = _holding(any(is_dtensor(v) for v in state.values()), saved_on)
        need = _holding(is_dtensor(p), process_rank())
        if have != need:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved state of {self._param_name(p)} holds {have}, "
                f"this process needs {need}. A plain state dict of DTensor (FSDP2) parameters holds only the "
                "saving rank's shards; save and load with adapprox_kernels.distributed.optimizer_state_dict and "
                "load_optimizer_state (torch.distributed.checkpoint), which reshard."
            )
