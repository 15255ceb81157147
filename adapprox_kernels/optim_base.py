"""What the package's optimizers (Adapprox, AdaMeM) share around their update rules.

:class:`SketchOptimizer` is a ``torch.optim.Optimizer`` with

* its own sketch RNG: one ``torch.Generator`` per device, seeded from ``seed``;
* checkpoints (:class:`~adapprox_kernels.checkpoint.CheckpointMixin`): ``state_dict()`` saves
  the sketch RNG too, so that a resumed run draws the same sketches, and ``load_state_dict``
  checks the saved state and keeps each state tensor's own dtype (torch.optim would cast
  floating state to the parameter's dtype: fp32 factors of a bf16 parameter must stay fp32);
* hyperparameters checked (by :mod:`adapprox_kernels.options`) as a group is added and as the
  step finds them changed;
* the non-finite gradient policy (``"raise"`` before anything is modified, or ``"skip"`` that
  parameter and count it in ``state["nonfinite_skips"]``), checked for all groups at once with
  one host sync per device; a subclass may also refuse finite gradients above
  ``_gradient_limit(p)`` this way (ones its arithmetic would overflow on);
* ``torch.amp.GradScaler`` support without a host read of its inf flag before every step
  (``_step_supports_amp_scaling``, :meth:`SketchOptimizer._unscale`);
* ``step(closure)`` under ``torch.no_grad()``, which calls the subclass's
  ``_check_states(groups)`` (a state that no longer fits its parameter's shape),
  ``_run_ahead(groups)`` (work that may start before the non-finite check because it yields
  the check as a by-product; ``_discard_run_ahead()`` undoes it), ``_step_group(group,
  params)`` (the update, which makes the parameters' state by ``_init_state(p, group)`` where
  there is none yet) for every group and then ``_end_step()`` (work that waits for one host
  sync per step).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import operator
import warnings
from collections import defaultdict
from itertools import islice, repeat
from typing import Any

import torch
from torch.optim import Optimizer

from ._stacklevel import _outside_stacklevel
from .checkpoint import CheckpointMixin, _seeded_generator
from .distributed import check_same_seed, group_size, is_dtensor, local, nonfinite_flags, shared_seed
from .options import as_python, as_tuple, check, is_int, is_real, lr_value
from .reference import mix32
from .transfer import rounding_keys_tensor, update_scalars

_MISSING = object()  # an option deleted from a param group (see SketchOptimizer._check_groups)
_grad, _is_sparse = operator.attrgetter("grad"), operator.attrgetter("is_sparse")


def to_host(tensors: list[torch.Tensor | list[float] | None]) -> list[list[float] | None]:
    """``t.tolist()`` (as floats) of every small 1-D tensor, ``None`` for ``None``, with one host
    sync per device instead of one per tensor; values already on the host (lists) pass."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    out: list[list[float] | None] = [None] * len(tensors)
    for i, t in enumerate(tensors):
        if isinstance(t, list):
            out[i] = t
        elif t is not None:
            by_device[t.device].append(i)
    for idxs in by_device.values():
        # cat promotes to a dtype that holds every value: one conversion, not one per tensor
        flat = torch.cat([tensors[i] for i in idxs]).double().tolist()
        end = 0
        for i in idxs:  # numel(), not len(): Tensor.__len__ is Python, and this runs after the sync
            start, end = end, end + tensors[i].numel()
            out[i] = flat[start:end]
    return out


def autocast_off() -> contextlib.AbstractContextManager:
    """Switches off the caller's autocast (CPU, CUDA) for the block where it is on: a training
    step written wholly inside ``torch.autocast`` would run the optimizer's matmuls (S-RSI's
    products, AdaMeM's projections) in bf16 or fp16, and its steps drift from those outside."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s arithmetic and floating state: float64 for a float64 parameter,
    float32 otherwise (bf16 and fp16 included)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _max_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """``(len(grads),)``: each (non-empty) gradient's largest magnitude, NaN where it holds a
    NaN. Finite iff every entry is (a 2-norm of a finite fp16 gradient can overflow). One
    foreach launch on a GPU; on CPU, where the foreach inf-norm is slower than ``aminmax``,
    from the extremes. Mixed dtypes come out in the widest
    (``torch.stack`` promotes): an fp64 gradient's entries above fp32's range stay finite."""
    if grads[0].device.type == "cpu":
        mins, maxs = zip(*map(torch.aminmax, grads), strict=True)
        return torch.maximum(torch.stack(maxs), torch.stack(mins).neg())
    return torch.stack(torch._foreach_norm(grads, float("inf")))


def keep_eager(cls: type, names: tuple[str, ...]) -> None:
    """Makes ``cls``'s methods ``names`` run eagerly inside ``torch.compile(opt.step)``
    (``torch.compiler.disable``), once per class: host work that dynamo would compile anew for
    every parameter or every step (it guards a parameter by identity, and a Python number of
    the state by value), until its recompile limit, after which it runs that frame eagerly
    for good. Done when an optimizer is made or unpickled, not as a decorator at import:
    ``torch.compiler.disable`` imports torch._dynamo, which takes a second and imports triton,
    whose own functions are then decorated for good, before a user may set TRITON_INTERPRET."""
    if "_eager_methods" in cls.__dict__:
        return
    for name in names:
        fn = getattr(cls, name)
        if not getattr(fn, "_kept_eager", False):
            fn = torch.compiler.disable(fn)
            fn._kept_eager = True
            setattr(cls, name, fn)
    cls._eager_methods = names


class SketchOptimizer(CheckpointMixin, Optimizer):
    """Base class; subclasses implement ``_init_state`` and ``_step_group``."""

    # A drawn seed that no process group has shared yet (none existed at construction): the
    # first step takes rank 0's. A class attribute, for copies unpickled from older pickles.
    _seed_unshared = False
    # Methods that run eagerly inside torch.compile(opt.step) (see keep_eager).
    # _forget_removed_groups: torch 2.8's dynamo cannot trace id() of a dict (a graph break from
    # the step that first fills the memo, whose new frame then recompiled a step later).
    # _share_seed: sets attributes of the optimizer (see its docstring).
    _EAGER_UNDER_COMPILE: tuple[str, ...] = (
        "_init_state",
        "_check_groups",
        "_forget_removed_groups",
        "_share_seed",
        "_rounding_keys_tensor",
        "_update_scalars",
    )

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by ``torch.amp.GradScaler.step``: when true, it sets ``grad_scale`` and
        ``found_inf`` (device tensors) on the optimizer and calls ``step()`` itself, instead of
        unscaling and reading its inf flag on the host first (a second host sync per step, before
        the step's own). The step then unscales in place and reads the flag only where its own
        check finds a bad gradient (see :meth:`_unscale`).

        Off unless ``opt.unscale_in_step = True`` was set, and never for DTensor (FSDP2)
        gradients. Frameworks read this attribute as "a fused optimizer, which nothing may
        unscale or clip before": PyTorch Lightning's mixed precision (``"bf16-mixed"`` too,
        which has no scaler) then refuses ``gradient_clip_val``, and Accelerate (so the Hugging
        Face Trainer) sees no skipped step on an fp16 overflow and steps the LR scheduler
        anyway; for a plain training loop with a scaler it saves the sync. An instance
        attribute, read with ``getattr`` (older pickles have none): a class one would hide the
        optimizer's own from Lightning's ``LightningOptimizer``, a subclass of the optimizer's
        class that forwards only the attributes it lacks."""
        return bool(getattr(self, "unscale_in_step", False)) and not any(
            is_dtensor(p) for group in self.param_groups for p in group["params"]
        )

    def __init__(self, params, defaults: dict[str, Any], seed: int | None):
        valid_seed = seed is None or (
            isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and -(2**63) <= seed < 2**64
        )  # the range torch.Generator.manual_seed takes
        check(valid_seed, f"Invalid seed: {seed!r} (need None or an int in [-2**63, 2**64))")
        # Set before the groups arrive: add_param_group checks a given seed where there are DTensors.
        self._seed = None if seed is None else int(seed)
        super().__init__(params, {k: as_python(v) for k, v in defaults.items()})
        if seed is None:
            # Under torch.distributed every rank must draw the same sketches: rank 0's seed is used
            # (taken at the first step where the process group is initialized after this).
            # torch's CPU RNG whatever the default device (a CUDA one would sync; a meta one has no value).
            self._seed = shared_seed(int(torch.randint(0, 2**62, (1,), device="cpu").item()))
            self._seed_unshared = group_size() == 1
        self._generators: dict[str, torch.Generator] = {}
        self.unscale_in_step = False  # see _step_supports_amp_scaling
        self._warn_if_flattened()  # the constructor's groups, all of them (add_param_group: each later one)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles defaults, state and groups only; a copy must also draw the same
        # sketches as the original from here on (torch.optim's __setstate__ sets what it holds).
        state = super().__getstate__()
        state["sketch_rng"] = self._rng_state()
        state["_seed_unshared"] = self._seed_unshared
        state["unscale_in_step"] = getattr(self, "unscale_in_step", False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        rng = state.pop("sketch_rng", None)
        super().__setstate__(state)
        # torch.optim's __setstate__ (run by load_state_dict, deepcopy and unpickling) adds a
        # "differentiable" default, an option these optimizers do not take: it would show in
        # repr and state_dict, and type(opt)(params, **opt.defaults) would raise TypeError.
        self.defaults.pop("differentiable", None)
        # An optimizer pickled by an older version holds the defaults of its day: the options
        # added since take the constructor's defaults (which keep the older behaviour), here and
        # in the groups below (the step's check read them: KeyError). A no-op for a load.
        for key, value in self._constructor_defaults().items():
            self.defaults.setdefault(key, value)
        # Fill options added after a checkpoint was written, as torch.optim does.
        for group in self.param_groups:
            group.pop("differentiable", None)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._generators = {}
        if rng is not None:
            self._restore_rng(rng)
        self._reset_step_caches()

    def _reset_step_caches(self) -> None:
        """Per-object helpers that are not state (a subclass's step caches); after unpickling.
        A subclass's override calls :func:`keep_eager` as this does."""
        keep_eager(type(self), self._EAGER_UNDER_COMPILE)

    @classmethod
    def _constructor_defaults(cls) -> dict[str, Any]:
        """Each option's value where the constructor is not given it, from the signature of the
        class that defines the options (Adapprox, AdaMeM: a user's subclass may take others)."""
        # The package's class (a user's subclass may override the check, and take arguments
        # that are no options of its defaults: those are not put into defaults and groups).
        own = next(
            c for c in cls.__mro__
            if "_check_hyperparameters" in vars(c) and c.__module__.split(".")[0] == __name__.split(".")[0]
        )  # fmt: skip
        if own is SketchOptimizer:
            return {}
        params = inspect.signature(own.__init__).parameters.values()
        return {p.name: as_tuple(p.default) for p in params if p.default is not p.empty and p.name != "seed"}

    def _check_unknown_keys(self, own: dict[str, Any], where: str) -> None:
        """A group's keys that are no option. A ``seed`` other than the optimizer's is a
        ``ValueError``: the sketch RNG is one for all groups, and the group's was kept and
        ignored (ZeroRedundancyOptimizer copies the optimizer's own into its groups: that one
        passes, as does None). A near miss of an option's name (``weight_deacy``) warns, since
        torch.optim keeps any key a group brings (names for logging, a scheduler's
        ``initial_lr``) and the misspelled option would silently keep its default."""
        cls = type(self).__name__
        self._check_group_seed(own.get("seed"), where)
        for key in own.keys() - self.defaults.keys() - {"seed"}:
            near = difflib.get_close_matches(str(key), self.defaults, n=1, cutoff=0.8)
            if near:
                warnings.warn(
                    f"{where}: {key!r} is not an option of {cls} (did you mean {near[0]!r}?); it has no effect",
                    stacklevel=_outside_stacklevel(),
                )

    def _check_group_seed(self, seed: Any, where: str | int) -> None:
        """``ValueError`` where a group's ``seed`` is neither None nor the optimizer's (such as a
        ZeroRedundancyOptimizer checkpoint's groups, loaded into one built with another seed).
        ``where``: the group's name in the message, or its index when the step checks it (the
        message is then made only on failure: the step checks every group every step)."""
        if seed is not None and seed != self._seed:
            cls = type(self).__name__
            after = "; nothing was updated" if is_int(where) else ""
            where = f"{cls}.step: param_groups[{where}]" if is_int(where) else where
            raise ValueError(
                f"{where}: seed {seed!r} is not {cls}'s (seed={self._seed!r}): one sketch RNG serves all groups; "
                "give the group None or the optimizer's seed (a ZeroRedundancyOptimizer checkpoint's groups "
                f"keep the seed it was built with: build the one resuming with it){after}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, once the group's hyperparameters pass :meth:`_check_hyperparameters`:
        the group's own values and the defaults it takes (the constructor's arguments arrive
        this way too). torch.optim checks none, so ``{"params": ps, "lr": -1}`` would train.
        A parameter listed twice in the group is an error (torch.optim only warns, and it would
        take two steps per step), and so is a parameter :meth:`_check_params` refuses, then a
        seed that differs between the ranks sharing the group's DTensors (FSDP2; see
        :func:`~adapprox_kernels.distributed.check_same_seed`)."""
        self._check_hyperparameters(self.defaults)
        where = f"param_groups[{len(self.param_groups)}]"
        # The options' lists as tuples: a list edited in place would look unchanged to
        # _check_groups (a key of the user's own keeps its list).
        own = {
            k: as_tuple(as_python(v)) if k in self.defaults else as_python(v)
            for k, v in param_group.items() if k not in ("params", "param_names")
        }  # fmt: skip
        param_group = {**param_group, **own}
        if own:
            try:
                self._check_hyperparameters({**self.defaults, **own})
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            self._check_unknown_keys(own, where)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len(set(params)) != len(params):
            self.param_groups.pop()
            raise ValueError(f"{where}: a parameter appears more than once; it would take two steps per step")
        try:
            # First: a refused parameter raises for what it is, whatever the seeds, with no collective.
            self._check_params(params)
            # A drawn seed is shared once the constructor's groups are in, or at the first step.
            if self._seed is not None and not self._seed_unshared:
                check_same_seed(self._seed, params, type(self).__name__)
        except (NotImplementedError, ValueError):
            self.param_groups.pop()
            raise
        # A group added after the constructor's: the whole check only where this group brings
        # FSDP1-flattened parameters (it walks every group's parameters, quadratic in groups added one by one).
        if "_generators" in self.__dict__ and any(getattr(p, "_fsdp_flattened", False) for p in params):
            self._warn_if_flattened()

    def _check_params(self, params: list[torch.Tensor]) -> None:
        """``NotImplementedError`` for parameters of a new group that the optimizer cannot step
        (before :meth:`add_param_group` keeps the group); none here."""

    def _warn_if_flattened(self) -> None:
        """A ``RuntimeWarning`` (once) where FSDP1 (``FullyShardedDataParallel``) has flattened
        the parameters: it marks each parameter it manages (``_fsdp_flattened``) and hands the
        optimizer 1-D tensors, a ``FlatParameter`` or (``use_orig_params=True``, sharded) each
        parameter's 1-D shard. Stepped as vectors, they keep a dense second moment: Adapprox
        keeps no low-rank factors (its state is as large as AdamW's) and AdaMeM turns into
        Adafactor without momentum, silently. Told apart from FSDP1 keeping the shapes
        (``NO_SHARD``, one rank) by none of its parameters being a matrix."""
        if self.__dict__.get("_warned_flattened"):
            return
        marked = [p for g in self.param_groups for p in g["params"] if getattr(p, "_fsdp_flattened", False)]
        if marked and all(p.dim() < 2 for p in marked):
            self._warned_flattened = True
            warnings.warn(
                f"{type(self).__name__}: its parameters were flattened by FSDP1 (FullyShardedDataParallel): "
                "each reaches the optimizer as a 1-D tensor and is stepped as a vector with a dense second "
                "moment, so no matrix is factored (Adapprox's state is then as large as AdamW's; AdaMeM is "
                "Adafactor without momentum). Use FSDP2 (torch.distributed.fsdp.fully_shard), DDP or "
                "ZeroRedundancyOptimizer (docs/distributed.md).",
                RuntimeWarning,
                stacklevel=_outside_stacklevel(),  # the constructor's caller, or add_param_group's
            )

    def _check_groups(self) -> None:
        """Each group's hyperparameters, as the step is about to read them, pass the constructor's
        checks: a value written into ``param_groups`` mid-run (``group["lr"] = float("nan")``,
        ``group["nonfinite"] = "ignore"``) is refused before the step changes anything, not
        trained on (torch.optim checks none) nor found only when a checkpoint fails to load;
        so is a group ``seed`` written in that is not the optimizer's (it would be ignored).
        Checked where the values changed since the last step (a scheduler changes lr every
        step: comparing is cheaper than checking). An lr tensor, which a scheduler fills in
        place, is checked every step by its value, read once here for the whole step
        (:meth:`_lr`): a CUDA one syncs once a step, not once a bucket. A value written in is
        stored once checked as the constructor stores it: a list (``group["betas"] = [0.9, …]``)
        as a tuple, which edited in place later would compare equal to itself and go unchecked;
        a NumPy number as the Python one it holds, which the step's arithmetic and the state
        take (np.float32 betas took ``1 − βᵗ`` in float32, and a run resumed from the
        checkpoint's Python floats ended on other bits; an np.int64 rank went into AdaMeM's
        state, which ``torch.load(weights_only=True)`` refuses)."""
        checked = self.__dict__.setdefault("_checked_groups", {})  # not pickled: checked anew
        self.__dict__["_lr_values"] = lr_values = {}  # not pickled: this step's only
        names = tuple(self.defaults)
        for i, group in enumerate(self.param_groups):
            # A deleted option reads as _MISSING, not None: None is a valid value of some
            # (clip_threshold, k_init), which passed the check and then raised KeyError from
            # inside the step, after the step counts had moved.
            values = list(map(group.get, names, repeat(_MISSING)))
            self._check_group_seed(group.get("seed"), i)  # not an option (no default): every step, a dict read
            lr, was = group.get("lr"), checked.get(i)
            # The values themselves, compared by identity first, then by type (4.0 == 4 and
            # 1 == True, but an int option must be an int, a flag a bool), then by value; a
            # tensor never by value (== compares elements): another tensor counts as changed.
            changed = was is None or any(
                v is not w and (type(v) is not type(w) or torch.is_tensor(v) or v != w)
                for v, w in zip(values, was, strict=True)
            )
            if not (changed or torch.is_tensor(lr)):
                continue
            missing = [name for name, v in zip(names, values, strict=True) if v is _MISSING] if changed else []
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.step: param_groups[{i}] has no {missing[0]!r} (deleted from the group?): "
                    f"set it again (this optimizer's default is {self.defaults[missing[0]]!r}); nothing was updated"
                )
            try:
                if torch.is_tensor(lr):  # its value may have changed in place: NaN trained on
                    value = lr_value(lr)
                    check(
                        is_real(value) and value >= 0.0,
                        f"Invalid learning rate: {value!r} (a tensor; need a finite float >= 0)",
                    )
                    lr_values[id(lr)] = value
                if changed:
                    # Another option written as a tensor is refused, as the constructor refuses
                    # it (it trained on, and its checkpoint did not load). A tensor lr is checked
                    # by the value read above (not read again: a CUDA one would sync again).
                    own = {k: as_tuple(as_python(v)) for k, v in zip(names, values, strict=True)}
                    if torch.is_tensor(lr):
                        own["lr"] = lr_values[id(lr)]
                    self._check_hyperparameters({**self.defaults, **own})
            except ValueError as err:
                raise ValueError(
                    f"{type(self).__name__}.step: param_groups[{i}] was changed to a bad value: {err}; "
                    "nothing was updated"
                ) from None
            if not changed:
                continue
            for k, v in zip(names, values, strict=True):
                if own[k] is not v and not torch.is_tensor(v):  # a tensor lr is filled in place
                    group[k] = own[k]
            checked[i] = list(map(group.get, names))

    def _lr(self, group: dict[str, Any]) -> float | torch.Tensor:
        """``group["lr"]`` as this step reads it: a tensor lr as the number :meth:`_check_groups`
        read from it at the step's start (reading a CUDA tensor syncs with the device). Traced
        by torch.compile, the tensor itself (the compiled update reads it from the device)."""
        lr = group["lr"]
        if torch.is_tensor(lr) and not torch.compiler.is_compiling():
            return self.__dict__.get("_lr_values", {}).get(id(lr), lr)
        return lr

    @staticmethod
    def _check_hyperparameters(h: dict[str, Any]) -> None:
        """``ValueError`` naming the first bad value of ``h`` (one value per option)."""
        raise NotImplementedError

    def _rounding_keys(
        self, group: dict[str, Any], bucket: list[torch.Tensor], states: list[dict[str, Any]]
    ) -> list[int] | torch.Tensor | None:
        """Each parameter's key of stochastic rounding this step (``bf16_stochastic_round``; see
        ``reference.rounding_noise``, which hashes it): a hash of the seed, the group's position
        and the parameter's position in the group, plus its own step count (mod 2³²). So no
        parameter draws the same bits on two steps, whichever others share its bucket or skipped
        a step, and two parameters share a stream only by chance; every backend, data-parallel
        rank (whatever its device) and resumed run draws the same ones (seed, order and step
        counts are saved). None where the group rounds to nearest or the bucket is not bf16;
        inside torch.compile, :meth:`_rounding_keys_tensor`'s tensor."""
        if not group["bf16_stochastic_round"] or bucket[0].dtype != torch.bfloat16:
            return None
        if torch.compiler.is_compiling():
            # Traced, the keys (new every step) would be constants of the compiled update, which
            # dynamo then compiled anew every step until its recompile limit, and ran eagerly
            # from then on: made eagerly, as a tensor that the update takes as an input.
            return self._rounding_keys_tensor(group, bucket, states)
        params = group["params"]
        slot_of, prefixes = self._key_prefixes(group)
        slots = [slot_of.get(id(p), -1) for p in bucket]
        # A slot not found or taken by another parameter: the list was edited in place.
        if not all(s >= 0 and params[s] is p for s, p in zip(slots, bucket, strict=True)):
            slot_of, prefixes = self._key_prefixes(group, fresh=True)
            slots = [slot_of[id(p)] for p in bucket]
        return [(prefixes[s] + state["step"]) & 0xFFFFFFFF for s, state in zip(slots, states, strict=True)]

    def _rounding_keys_tensor(
        self, group: dict[str, Any], bucket: list[torch.Tensor], states: list[dict[str, Any]]
    ) -> torch.Tensor:
        """:meth:`_rounding_keys` as an int64 ``(B,)`` tensor on the bucket's device, which every
        backend's update takes as it takes the ints (the same bits); eager inside
        torch.compile (see :func:`keep_eager`)."""
        return rounding_keys_tensor(self._rounding_keys(group, bucket, states), local(bucket[0]).device)

    def _traced_scalars(self, group: dict[str, Any], device: torch.device, momentum: bool) -> torch.Tensor | None:
        """Inside torch.compile, the group's ``[α, 1 − α·λ, β1, 1 − β1]`` as a tensor on ``device``
        (β1 = 0 without ``momentum``), which the reference update reads in place of the numbers
        (``reference.apply_updates``): a scheduler's new lr every step would otherwise be a new
        constant of the compiled update, compiled anew each step. None in an eager step."""
        return self._update_scalars(group, device, momentum) if torch.compiler.is_compiling() else None

    def _update_scalars(self, group: dict[str, Any], device: torch.device, momentum: bool) -> torch.Tensor:
        """:meth:`_traced_scalars`' tensor, made eagerly (see :func:`keep_eager`)."""
        beta1 = group["betas"][0] if momentum else 0.0
        return update_scalars(self._lr(group), group["weight_decay"], beta1, device)

    def _key_prefixes(self, group: dict[str, Any], fresh: bool = False) -> tuple[dict[int, int], list[int]]:
        """``({id(p): slot}, [hash of (seed, group index, slot) for each slot])`` of ``group``,
        the step-independent part of its rounding keys, kept from step to step (rather than
        hashing every parameter each step) while the group's parameter
        list, its length, its position and the seed stay the same. Each entry holds its group
        (whose id no other group can take while it does) until :meth:`_forget_removed_groups`."""
        params, memo = group["params"], self.__dict__.setdefault("_key_memo", {})  # not pickled: rebuilt
        kept = memo.get(id(group))
        # The group's position: where it was last time, unless it moved (a scan for every bucket
        # of every group is quadratic in the groups).
        groups, index = self.param_groups, -1 if kept is None else kept[1][1]
        if not (0 <= index < len(groups) and groups[index] is group):
            index = next(i for i, g in enumerate(groups) if g is group)
        if fresh or kept is None or kept[0] is not params or kept[1] != (len(params), index, self._seed):
            slots = {id(p): i for i, p in enumerate(params)}
            kept = memo[id(group)] = (params, (len(params), index, self._seed), slots, [
                mix32((self._seed, index, i)) for i in range(len(params))
            ], group)  # fmt: skip
        return kept[2], kept[3]

    def _forget_removed_groups(self) -> None:
        """Drops what the step's memos keyed by group hold of groups no longer in
        ``param_groups``: one popped from it (model surgery), or one that ``load_state_dict``
        replaced (every load makes new group dicts). They hold its parameters (and, in a
        subclass's, their gradients and state), which would otherwise live, and the memo grow,
        as long as the optimizer. Once a step, for a few groups: cheap."""
        memo = self.__dict__.get("_key_memo")
        if memo:
            live = set(map(id, self.param_groups))
            for key in [key for key in memo if key not in live]:
                del memo[key]

    # --------------------------------------- sketch RNG (saved and restored by checkpoint.py)
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = _seeded_generator(device, self._seed)
        return self._generators[key]

    # ----------------------------------------------------------------------------------- step
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``p``'s state, made (zeros) where it has none yet."""
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _end_step(self) -> None:
        """Called once after every group's ``_step_group``; nothing by default."""

    def _check_states(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """``ValueError`` (:meth:`_check_state_fits`) before the step changes anything where a
        parameter to update no longer fits its state. Nothing by default: Adapprox checks where
        it forms its buckets, which every group does before any work starts."""

    def _check_state_fits(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """``ValueError`` before the step changes anything where ``p``'s state no longer fits it:
        its shape changed since the state was made (``p.data = …`` of another shape, a transpose
        among them). Stepping on would raise deep inside the step, or silently read the state
        in the wrong layout, as a transposed AdaMeM matrix did."""
        problems = self._state_problems(p, state)
        if problems:
            raise ValueError(
                f"{type(self).__name__}.step: the state of {self._param_name(p)} does not fit its shape "
                f"{tuple(p.shape)}: {'; '.join(problems)}. Did the parameter change shape since its state "
                "was made? `opt.state[p] = {}` makes its state anew at the next step."
            )

    def _check_no_aliases(self, params: list[torch.Tensor]) -> None:
        """``ValueError`` before anything changes where two parameters to update are the same
        memory as tensors of one shape and dtype (``b.data = a.data``: two Parameter objects over
        one storage, as weights tied by hand). They fall into one bucket, whose update computes
        each from the same old weights and writes them in turn: the last write wins, and the
        other parameter's gradient is lost, silently (torch's AdamW applies both updates; on
        the Triton kernels the two writes race). Views of other shapes fall into other buckets,
        stepped one after the other, as AdamW steps them. Contiguous parameters of one shape and
        dtype that share only some of their memory (views of one buffer at overlapping
        offsets) are refused alike: the same bucket, the same lost update (strided views that
        overlap in part are not looked for). DTensors are skipped (their ``data_ptr`` is 0)."""
        ptrs = list(map(torch.Tensor.data_ptr, params))
        if len(set(ptrs)) == len(ptrs) and not _spans_overlap(params, ptrs):
            return
        seen: dict[tuple, torch.Tensor] = {}
        for p, ptr in zip(params, ptrs, strict=True):
            if is_dtensor(p):
                continue
            other = seen.setdefault((ptr, p.device, tuple(p.shape), p.dtype), p)
            if other is not p:
                raise ValueError(
                    f"{type(self).__name__}.step: {self._param_name(other)} and {self._param_name(p)} are the "
                    "same memory (one storage, as after `b.data = a.data`): stepped together, one of their updates "
                    "would be lost. Tie them as one Parameter (`b.weight = a.weight`), or give each its own storage "
                    "(`b.data = a.data.clone()`); no parameter was updated."
                )
        pair = _overlapping_pair(params, ptrs)
        if pair is not None:
            raise ValueError(
                f"{type(self).__name__}.step: {self._param_name(pair[0])} and {self._param_name(pair[1])} share part "
                "of their memory (overlapping views of one buffer): stepped together, the update of the shared "
                "elements from one of them would be lost. Give each its own memory; no parameter was updated."
            )

    def _match_state_dtypes(self, p: torch.Tensor, state: dict[str, Any]) -> bool:
        """``p``'s state in the dtypes a state made or loaded for ``p`` now has
        (:meth:`_state_dtype`), where ``p``'s dtype changed since it was made (``model.double()``,
        ``model.to(torch.bfloat16)``, ``p.data = p.data.half()`` after some steps): as a
        checkpoint saved and loaded there would have them, so that the run and its resume take
        the same bits. Kept as they were, an fp64 parameter stepped in fp32, and a bucket that
        held states of both dtypes failed deep in the step (``bmm``'s "expected scalar type",
        a Triton table's "needs one shape, dtype, device") after its step counts had moved.
        Returns whether it cast anything."""
        cast = False
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                want = self._state_dtype(p, key, value)
                if value.dtype != want:
                    state[key], cast = value.to(want), True
        return cast

    def _state_dtype(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.dtype:
        """The dtype ``p``'s state entry ``key`` is kept in: by default float64 for a float64
        parameter and float32 otherwise (factors, second moments), other dtypes unchanged."""
        if not value.is_floating_point():
            return value.dtype
        return compute_dtype(p)

    def _run_ahead(
        self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> list[tuple[list[torch.Tensor], torch.Tensor | list[float]]]:
        """Work started before the non-finite check because it also answers it: ``(params,
        values)`` pairs, ``values`` ``(len(params),)`` on the device (or already read, as a
        list) and NaN exactly where a parameter's gradient holds inf or NaN (+inf is no bad
        gradient: a finite one whose sum of squares overflowed); those gradients are not read
        again for the check. Nothing a user sees may change until the check passes: a failed
        check calls :meth:`_discard_run_ahead`. Nothing by default."""
        return []

    def _discard_run_ahead(self) -> None:
        """Undoes :meth:`_run_ahead` (some gradient was not finite)."""

    def _run_ahead_failed(self) -> None:
        """:meth:`_run_ahead` or the check raised (out of memory, Ctrl-C): undoes what it can.
        Nothing by default."""

    def _grads_to_update(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The group's parameters with a (non-empty) gradient, checked: dense (else ``RuntimeError``),
        floating point (``TypeError``), of the parameter's shape (``RuntimeError``).
        Hundreds of parameters a step: the checks are ``map``s over C methods."""
        params = list(group["params"])
        grads = list(map(_grad, params))
        # Every parameter with a non-empty gradient is the usual case: no Python loop for it.
        if not (all(map(operator.is_not, grads, repeat(None))) and all(map(torch.Tensor.numel, params))):
            params = [p for p, g in zip(params, grads, strict=True) if g is not None and p.numel() > 0]
            grads = list(map(_grad, params))
        # Both: a parameter's grad_dtype may let its gradient have another dtype. The shapes: the
        # .grad setter refuses another shape, but p.grad.data = … and p.grad.set_(…) do not, and
        # AdaMeM reshaped such a gradient (a transposed one, its entries scrambled) and stepped on it.
        if (
            any(map(_is_sparse, grads)) or not all(map(torch.Tensor.is_floating_point, [*params, *grads]))
            or not all(map(torch.Tensor.is_same_size, params, grads))
        ):  # fmt: skip
            name = type(self).__name__
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients ({self._param_name(p)})")
                if not (p.is_floating_point() and p.grad.is_floating_point()):
                    raise TypeError(
                        f"{name} needs floating-point parameters and gradients; {self._param_name(p)} is "
                        f"{p.dtype} with a {p.grad.dtype} gradient"
                    )
                if p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"{name}: the gradient of {self._param_name(p)} has shape {tuple(p.grad.shape)}, the "
                        f"parameter {tuple(p.shape)}; no parameter was updated"
                    )
        return params

    def _nonfinite(
        self, params: list[torch.Tensor], known: list[tuple[list[torch.Tensor], torch.Tensor | list[float]]] = ()
    ) -> list[bool]:
        """One flag per parameter: does its gradient hold inf or NaN, or an entry above
        :meth:`_gradient_limit`? ``known``: the ``(params, values)`` pairs of
        :meth:`_run_ahead` (where a value is not a max-norm, only whether it is NaN counts).
        One host sync per device."""
        if not params:
            return []
        # (parameters, values) pairs: a non-finite max-norm, or a NaN run-ahead sum, marks a bad gradient.
        checks = list(known)
        limited = type(self)._gradient_limit is not SketchOptimizer._gradient_limit
        if sum(len(ps) for ps, _ in known) < len(params):  # some gradients have no values yet
            checks += self._max_norm_checks(params, known, limited)
        flags = [False] * len(params)
        position = None
        # Read as they are and tested on the host: no isfinite launches per check.
        for c, ((ps, _), values) in enumerate(zip(checks, to_host([values for _, values in checks]), strict=True)):
            bad = self._bad_gradients(ps, values, c < len(known), limited)
            if bad is None:  # the usual case: nothing per parameter
                continue
            position = position or {id(p): i for i, p in enumerate(params)}
            for p, b in zip(ps, bad, strict=True):
                flags[position[id(p)]] = b
        return flags

    def _max_norm_checks(
        self,
        params: list[torch.Tensor],
        known: list[tuple[list[torch.Tensor], torch.Tensor | list[float]]],
        limited: bool,
    ) -> list[tuple[list[torch.Tensor], torch.Tensor | list[float]]]:
        """``(params, values)`` pairs for the gradients ``known`` does not cover, per device: their
        max-norms, or for DTensor gradients (FSDP2) NaN where a rank's rows hold a bad entry."""
        covered = {id(p) for ps, _ in known for p in ps}
        by_device: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            if id(p) not in covered:
                by_device[(p.grad.device, getattr(p.grad, "device_mesh", None))].append(p)
        checks = []
        for ps in by_device.values():
            grads = [p.grad for p in ps]
            if is_dtensor(grads[0]):  # FSDP2: each rank checks its rows, one all-reduce
                bad = nonfinite_flags(grads, [self._gradient_limit(p) for p in ps] if limited else None)
                checks.append((ps, [float("nan") if b else 0.0 for b in bad]))
            else:
                checks.append((ps, _max_norms(grads)))
        return checks

    def _bad_gradients(
        self, ps: list[torch.Tensor], values: list[float], ran_ahead: bool, limited: bool
    ) -> list[bool] | None:
        """One flag per parameter of ``ps`` from its value on the host, or None where none is bad.
        ``ran_ahead``: other sums, NaN where a gradient is bad, not compared with the limit."""
        if ran_ahead:
            return list(map(math.isnan, values)) if any(map(math.isnan, values)) else None
        if all(map(math.isfinite, values)) and not limited:
            return None
        return [
            not (math.isfinite(v) and (not limited or v <= self._gradient_limit(p)))
            for p, v in zip(ps, values, strict=True)
        ]

    def _unscale(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> torch.Tensor | None:
        """Where ``torch.amp.GradScaler.step`` calls :meth:`step` (``_step_supports_amp_scaling``):
        the gradients multiplied in place by its ``1/scale`` (fp32, as its own ``unscale_``
        computes it: the same bits), unless ``scaler.unscale_(opt)`` already did (no
        ``grad_scale`` then); returns its ``found_inf`` (a device tensor, > 0 where a gradient
        overflowed), else None. The step's own non-finite check sees those gradients too, so
        the flag is read only where it finds one, and a scaler's overflow then skips the whole
        step, as the scaler would, whatever ``nonfinite`` says."""
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            inv = scale.double().reciprocal().float()
            by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
            for _, params in groups:
                for p in params:
                    by_device[p.grad.device].append(p.grad)
            for device, grads in by_device.items():
                torch._foreach_mul_(grads, inv.to(device))
        return getattr(self, "found_inf", None)

    def _gradient_limit(self, p: torch.Tensor) -> float:
        """The largest gradient entry (in magnitude) the update can take; inf here."""
        return math.inf

    def _param_name(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return names[pi] if names else f"param_groups[{gi}]['params'][{pi}]"
        return "<unknown parameter>"

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with autocast_off():
            self._take_step()
        return loss

    def _share_seed(self) -> None:
        """Rank 0's seed where the process group came after the constructor (a drawn seed, see
        ``__init__``): at the first step, before any sketch. Eager under ``torch.compile``
        (``_EAGER_UNDER_COMPILE``): it sets attributes of the optimizer, which the dynamo of
        torch 2.10 and 2.11 refuses in a compiled step (an AssertionError: pytorch#171590) and
        that of 2.14 drops silently (the seed was never shared), and it broadcasts a Python
        object, which dynamo cannot trace."""
        if self._seed_unshared:
            self._seed, self._seed_unshared = shared_seed(self._seed), False

    def _take_step(self) -> None:
        self._check_groups()
        self._forget_removed_groups()
        self._share_seed()
        groups = [(group, self._grads_to_update(group)) for group in self.param_groups]
        self._check_states(groups)
        found_inf = self._unscale(groups)
        try:
            known = self._run_ahead(groups)
            # Every group's flags from one host sync per device (not one per group).
            all_flags = self._nonfinite([p for _, params in groups for p in params], known)
        except BaseException:
            self._run_ahead_failed()
            raise
        if any(all_flags):
            self._discard_run_ahead()  # rare: the step starts over, without the bad gradients
            if found_inf is not None and found_inf.item():  # the scaler's overflow: it skips the step
                return
        all_flags = iter(all_flags)
        work = []
        for group, params in groups:
            flags = list(islice(all_flags, len(params)))
            if group["nonfinite"] == "raise" and any(flags):
                p = params[flags.index(True)]
                what = "non-finite gradient (inf or NaN)"
                if bool(torch.isfinite(p.grad).all()):
                    what = f"gradient entries above {self._gradient_limit(p):.3g}, which would overflow its update,"
                raise FloatingPointError(
                    f"{type(self).__name__}: {what} in {self._param_name(p)}; no parameter was updated. "
                    "Pass nonfinite='skip' to skip such parameters instead."
                )
            work.append((group, params, flags))
        for group, params, flags in work:
            ok = params
            if any(flags):
                ok = []
                for p, bad in zip(params, flags, strict=True):
                    if bad:
                        # .get: a state set directly (``opt.state[p] = …``, made or converted by hand)
                        # may have no count; a KeyError here came after the earlier groups' updates.
                        state = self._init_state(p, group)
                        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
                    else:
                        ok.append(p)
            self._step_group(group, ok)
        self._end_step()


_NBYTES = operator.attrgetter("nbytes")


def _spans_overlap(params: list[torch.Tensor], ptrs: list[int]) -> bool:
    """Might two of ``params`` share memory? Whether any two ranges ``[data_ptr, data_ptr +
    nbytes)`` overlap (``ptrs`` their ``data_ptr``s; 0, a DTensor's or an empty tensor's,
    skipped): exact for contiguous tensors, a first sieve for strided ones. If any two ranges
    overlap, two neighbours in start order do."""
    # maps: no Python frame per parameter
    spans = sorted(zip(ptrs, map(operator.add, ptrs, map(_NBYTES, params)), strict=True))
    if ptrs and min(ptrs) == 0:
        spans = [span for span in spans if span[0]]
    return any(map(operator.lt, [start for start, _ in spans[1:]], [end for _, end in spans[:-1]]))


def _overlapping_pair(params: list[torch.Tensor], ptrs: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two contiguous ``params`` of one shape, dtype and device whose bytes overlap (views of one
    buffer at overlapping offsets), or None. Strided views are not compared: theirs may
    interleave without sharing an element (column blocks of one fused weight)."""
    spans = sorted(
        (ptr, ptr + p.nbytes, i)
        for i, (p, ptr) in enumerate(zip(params, ptrs, strict=True))
        if ptr and p.is_contiguous()
    )
    for k, (_, end, i) in enumerate(spans):
        for start, _, j in spans[k + 1 :]:
            if start >= end:
                break
            a, b = params[i], params[j]
            if (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device):
                return a, b
    return None
