"""What the package's optimizers (Adapprox, AdaMeM) share around their update rules.

:class:`SketchOptimizer` is a ``torch.optim.Optimizer`` with

* its own sketch RNG: one ``torch.Generator`` per device, seeded from ``seed``, saved in
  ``state_dict()["sketch_rng"]`` so that a resumed run draws the same sketches;
* a ``load_state_dict`` that keeps each state tensor's own dtype (torch.optim would cast
  floating state to the parameter's dtype: fp32 factors of a bf16 parameter must stay fp32);
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
import os
import sys
import warnings
from collections import defaultdict
from itertools import islice, repeat
from typing import Any

import torch
from torch.optim import Optimizer

from .distributed import check_same_seed, group_size, is_dtensor, local, nonfinite_flags, process_rank, shared_seed
from .reference import mix32
from .transfer import rounding_keys_tensor, update_scalars

NONFINITE_POLICIES = ("raise", "skip")
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


# Where the package's and torch's own frames are (see _outside_stacklevel).
_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for its caller's ``warnings.warn`` that names the first frame outside
    this package and torch: the user's call, however many hooks and wrappers lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A new generator of ``device`` seeded with ``seed`` (the sketch RNG of that device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def check(ok: bool, msg: str) -> None:
    """``raise ValueError(msg)`` unless ``ok``: the hyperparameter checks."""
    if not ok:
        raise ValueError(msg)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def is_int(v: Any) -> bool:
    """An int of any kind (NumPy's too, which a checkpoint rewritten by other tools may hold),
    but not a bool (``isinstance(True, int)`` holds)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# A larger rank or width clips to the same min(m, n) (no matrix is 2**31 wide both ways); no run takes 2**31 steps.
INT_OPTION_MAX = 2**31 - 1
# Past 1000 S-RSI iterations even a 0.99 singular-value ratio is below fp32 (0.99**2000 ~ 2e-9): 10**30 hung.
POWER_ITERS_MAX = 1000


def is_int_in(v: Any, low: int, high: int = INT_OPTION_MAX) -> bool:
    """An int (:func:`is_int`) in ``[low, high]``: the int options' check."""
    return is_int(v) and low <= v <= high


def is_real(v: Any) -> bool:
    """An int or float finite in float32, not a bool, nor a tensor: the step reads
    hyperparameters as Python numbers, on the host, and multiplies by them in float32 (an lr
    of 1e39 passed as finite, and the step raised after it had moved the state)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT32_MAX


def is_sequence(v: Any, length: int) -> bool:
    """A tuple or list of ``length`` items (``betas``, ``sigmoid``)."""
    return isinstance(v, (tuple, list)) and len(v) == length


def lr_value(lr: Any) -> Any:
    """The number an lr tensor holds, for the checks (reading a CUDA tensor syncs); any other
    value as it is. torch.optim takes a one-element floating tensor as lr (torch.compile's
    recipe for schedulers: filled in place, it compiles nothing anew), and so do these
    optimizers; ``ValueError`` for another tensor."""
    if not torch.is_tensor(lr):
        return lr
    check(lr.numel() == 1, f"Invalid learning rate: a tensor of {lr.numel()} elements (need one)")
    check(lr.is_floating_point(), f"Invalid learning rate: a tensor of {lr.dtype} (need a floating dtype)")
    return float(lr)


def check_shared(h: dict[str, Any], betas: int) -> None:
    """The options both optimizers have: ``lr`` (a number or a one-element tensor),
    ``betas`` (``betas`` of them), ``eps``, ``nonfinite`` and ``clip_threshold``."""
    lr = lr_value(h["lr"])
    check(is_real(lr) and lr >= 0.0, f"Invalid learning rate: {lr!r} (need a finite float >= 0)")
    names = ", ".join(f"beta{i + 1}" for i in range(betas))
    check(is_sequence(h["betas"], betas), f"betas must be ({names}), got {h['betas']!r}")
    for i, b in enumerate(h["betas"]):
        check(is_real(b) and 0.0 <= b < 1.0, f"Invalid beta parameter at index {i}: {b!r} (need 0 <= beta < 1)")
    # ε = 0 would divide a zero gradient entry by a zero V entry (0/0), and the RMS then turns
    # the whole matrix's update into NaN; so would an ε that rounds to 0 in float32 (or to a
    # subnormal, which GPUs may flush to 0).
    tiny = torch.finfo(torch.float32).tiny
    check(
        is_real(h["eps"]) and h["eps"] >= tiny,
        f"Invalid epsilon value: {h['eps']!r} (need a finite eps >= {tiny:.3g}, float32's smallest normal number)",
    )
    check_kinds(h, choices={"nonfinite": NONFINITE_POLICIES})
    # Used in float32: a threshold that rounds to 0 divides 0 by 0 on a zero gradient.
    clip = h["clip_threshold"]
    check(
        clip is None or (is_real(clip) and clip >= tiny),
        f"Invalid clip_threshold: {clip!r} (need None or a finite value >= {tiny:.3g}, float32's smallest normal)",
    )


def check_kinds(
    h: dict[str, Any],
    ints: dict[str, int | tuple[int, int]] | None = None,
    reals: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    choices: dict[str, tuple] | None = None,
) -> None:
    """``h[name]`` is an int in ``ints[name]`` (``(low, high)``, or ``low`` up to
    :data:`INT_OPTION_MAX`), a finite real ``>= 0`` (``reals``), a bool (``flags``) or one of
    ``choices[name]``."""
    for name, bounds in (ints or {}).items():
        low, high = bounds if isinstance(bounds, tuple) else (bounds, INT_OPTION_MAX)
        check(is_int_in(h[name], low, high), f"Invalid {name}: {h[name]!r} (need an int in [{low}, {high}])")
    for name in reals:
        check(is_real(h[name]) and h[name] >= 0.0, f"Invalid {name} value: {h[name]!r} (need a finite value >= 0)")
    for name in flags:
        check(isinstance(h[name], bool), f"Invalid {name}: {h[name]!r} (need a bool)")
    for name, options in (choices or {}).items():
        check(h[name] in options, f"Invalid {name}: {h[name]!r}; choose one of {options}")


def _holding(sharded: bool, rank: dict[str, int] | None) -> str:
    """What a parameter's state holds, in words: whole tensors, or which rank's shards."""
    if not sharded:
        return "whole tensors"
    if rank is None:
        return "DTensor shards of an unrecorded rank"
    return f"DTensor shards of rank {rank['rank']} of {rank['world_size']}"


def as_python(v: Any) -> Any:
    """NumPy scalars (``np.float32(1e-3)``, ``np.int64(8)``, also inside ``betas``) as the
    Python numbers they hold, which the checks and the step expect; anything else as it is."""
    if isinstance(v, (tuple, list)):
        return type(v)(map(as_python, v))
    if isinstance(v, numbers.Number) and type(v) not in (int, float, complex) and hasattr(v, "item"):  # np.float64 too
        return v.item()
    return v


def as_tuple(v: Any) -> Any:
    """A list as a tuple (hashable, as it goes into the graph keys); anything else as it is, for
    the checks to name."""
    return tuple(v) if isinstance(v, list) else v


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
        mins, maxs = zip(*map(torch.aminmax, grads))
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


class SketchOptimizer(Optimizer):
    """Base class; subclasses implement ``_init_state`` and ``_step_group``."""

    # A drawn seed that no process group has shared yet (none existed at construction): the
    # first step takes rank 0's. A class attribute, for copies unpickled from older pickles.
    _seed_unshared = False
    # Methods that run eagerly inside torch.compile(opt.step) (see keep_eager).
    # _forget_removed_groups: torch 2.8's dynamo cannot trace id() of a dict (a graph break from
    # the step that first fills the memo, whose new frame then recompiled a step later).
    # _share_seed: sets attributes of the optimizer (see its docstring).
    _EAGER_UNDER_COMPILE: tuple[str, ...] = (
        "_init_state", "_check_groups", "_forget_removed_groups", "_share_seed", "_rounding_keys_tensor",
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
                v is not w and (type(v) is not type(w) or torch.is_tensor(v) or v != w) for v, w in zip(values, was)
            )
            if not (changed or torch.is_tensor(lr)):
                continue
            missing = [name for name, v in zip(names, values) if v is _MISSING] if changed else []
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.step: param_groups[{i}] has no {missing[0]!r} (deleted from the group?): "
                    f"set it again (this optimizer's default is {self.defaults[missing[0]]!r}); nothing was updated"
                )
            try:
                if torch.is_tensor(lr):  # its value may have changed in place: NaN trained on
                    value = lr_value(lr)
                    check(is_real(value) and value >= 0.0, f"Invalid learning rate: {value!r} (a tensor; need a finite float >= 0)")
                    lr_values[id(lr)] = value
                if changed:
                    # Another option written as a tensor is refused, as the constructor refuses
                    # it (it trained on, and its checkpoint did not load). A tensor lr is checked
                    # by the value read above (not read again: a CUDA one would sync again).
                    own = {k: as_tuple(as_python(v)) for k, v in zip(names, values)}
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
            for k, v in zip(names, values):
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
    ) -> list[int] | None:
        """Each parameter's key of stochastic rounding this step (``bf16_stochastic_round``; see
        ``reference.rounding_noise``, which hashes it): a hash of the seed, the group's position
        and the parameter's position in the group, plus its own step count (mod 2³²). So no
        parameter draws the same bits on two steps, whichever others share its bucket or skipped
        a step, and two parameters share a stream only by chance; every backend, data-parallel
        rank (whatever its device) and resumed run draws the same ones (seed, order and step
        counts are saved). None where the group rounds to nearest or the bucket is not bf16."""
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
        if not all(s >= 0 and params[s] is p for s, p in zip(slots, bucket)):  # the list was edited in place
            slot_of, prefixes = self._key_prefixes(group, fresh=True)
            slots = [slot_of[id(p)] for p in bucket]
        return [(prefixes[s] + state["step"]) & 0xFFFFFFFF for s, state in zip(slots, states)]

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

    # ----------------------------------------------------------------------------- sketch RNG
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = _seeded_generator(device, self._seed)
        return self._generators[key]

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
        hook = self.register_state_dict_post_hook(SketchOptimizer._add_own_entries, prepend=True)
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
          moments; ``adapprox_kernels.distributed.load_optimizer_state`` reshards.
        * Saved tensors keep the precision this optimizer keeps them in (:meth:`_state_dtype`),
          not the parameter's dtype that torch.optim casts every floating tensor to; and they
          are copied, where torch.optim keeps the given tensors of matching dtype and device:
          the dict handed in (a checkpoint kept in memory) never changes with the run.
        * The options that say how to run, not what to compute (``_RUN_OPTIONS``, e.g. the
          backend), stay this optimizer's: a GPU run's checkpoint resumes on a CPU.

        These happen between the user's hooks: after every pre-hook (which may rewrite the
        dict) and before every post-hook (which may rewrite the state)."""
        run_options = [{k: g[k] for k in self._RUN_OPTIONS if k in g} for g in self.param_groups]
        pre = self.register_load_state_dict_pre_hook(SketchOptimizer._take_saved_state)
        post = self.register_load_state_dict_post_hook(SketchOptimizer._restore_saved_state, prepend=True)
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
            for idx, p in zip(saved_ids, params):
                self._check_saved_state(p, state_dict["state"].get(idx))
                self._check_saved_shards(p, state_dict["state"].get(idx), saved_on)
        tensors = [(p, state_dict["state"].get(idx, {})) for idx, p in zip(saved_ids, params)] if same_groups else []
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
        (was, g, j), now = next((s, o) for s, o in zip(saved, ours) if s[0] != o)
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
        for group, options in zip(self.param_groups, run_options):
            group.update(options)
        if rng is not None:  # (seed, generators), made by _checked_rng
            self._seed, self._generators = rng
            self._seed_unshared = False  # the checkpoint's seed, common to the ranks, is kept

    def _complete_loaded_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Brings ``p``'s loaded ``state`` to the live form a step reads, before the user's
        post-hooks see it. Nothing by default."""

    def _state_dtype(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.dtype:
        """The dtype ``p``'s state entry ``key`` is kept in: by default float64 for a float64
        parameter and float32 otherwise (factors, second moments), other dtypes unchanged."""
        if not value.is_floating_point():
            return value.dtype
        return compute_dtype(p)

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
        for p, ptr in zip(params, ptrs):
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

    def _saved_shapes(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
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

    def _run_ahead(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Work started before the non-finite check because it also answers it: ``(params,
        values)`` pairs, ``values`` ``(len(params),)`` on the device (or already read, as a
        list) and NaN exactly where a parameter's gradient holds inf or NaN (+inf is no bad
        gradient: a finite one whose sum of squares overflowed); those
        gradients are not read again for the check. Nothing a user sees may change until the check passes: a failed check calls
        :meth:`_discard_run_ahead`. Nothing by default."""
        return []

    def _discard_run_ahead(self) -> None:
        """Undoes :meth:`_run_ahead` (some gradient was not finite)."""

    def _run_ahead_failed(self) -> None:
        """:meth:`_run_ahead` or the check raised (out of memory, Ctrl-C): undoes what it can.
        Nothing by default."""

    def _grads_to_update(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The group's parameters with a (non-empty) gradient, checked: dense, floating point.
        Hundreds of parameters a step: the checks are ``map``s over C methods."""
        params = list(group["params"])
        grads = list(map(_grad, params))
        # Every parameter with a non-empty gradient is the usual case: no Python loop for it.
        if not (all(map(operator.is_not, grads, repeat(None))) and all(map(torch.Tensor.numel, params))):
            params = [p for p, g in zip(params, grads) if g is not None and p.numel() > 0]
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
        self, params: list[torch.Tensor], known: list[tuple[list[torch.Tensor], torch.Tensor]] = ()
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
        for c, ((ps, _), values) in enumerate(zip(checks, to_host([values for _, values in checks]))):
            bad = self._bad_gradients(ps, values, c < len(known), limited)
            if bad is None:  # the usual case: nothing per parameter
                continue
            position = position or {id(p): i for i, p in enumerate(params)}
            for p, b in zip(ps, bad):
                flags[position[id(p)]] = b
        return flags

    def _max_norm_checks(
        self, params: list[torch.Tensor], known: list[tuple[list[torch.Tensor], torch.Tensor]], limited: bool
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

    def _bad_gradients(self, ps: list[torch.Tensor], values: list[float], ran_ahead: bool, limited: bool) -> list[bool] | None:
        """One flag per parameter of ``ps`` from its value on the host, or None where none is bad.
        ``ran_ahead``: other sums, NaN where a gradient is bad, not compared with the limit."""
        if ran_ahead:
            return list(map(math.isnan, values)) if any(map(math.isnan, values)) else None
        if all(map(math.isfinite, values)) and not limited:
            return None
        return [not (math.isfinite(v) and (not limited or v <= self._gradient_limit(p))) for p, v in zip(ps, values)]

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
                for p, bad in zip(params, flags):
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
    spans = sorted(zip(ptrs, map(operator.add, ptrs, map(_NBYTES, params))))  # maps: no Python frame per parameter
    if ptrs and min(ptrs) == 0:
        spans = [span for span in spans if span[0]]
    return any(map(operator.lt, [start for start, _ in spans[1:]], [end for _, end in spans[:-1]]))


def _overlapping_pair(params: list[torch.Tensor], ptrs: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two contiguous ``params`` of one shape, dtype and device whose bytes overlap (views of one
    buffer at overlapping offsets), or None. Strided views are not compared: theirs may
    interleave without sharing an element (column blocks of one fused weight)."""
    spans = sorted((ptr, ptr + p.nbytes, i) for i, (p, ptr) in enumerate(zip(params, ptrs)) if ptr and p.is_contiguous())
    for k, (_, end, i) in enumerate(spans):
        for start, _, j in spans[k + 1 :]:
            if start >= end:
                break
            a, b = params[i], params[j]
            if (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device):
                return a, b
    return None
