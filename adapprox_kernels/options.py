"""The checks of the optimizers' options: each ``check_*`` raises ``ValueError`` naming the
first bad value (the constructor, ``add_param_group``, the step's check of changed groups and
``load_state_dict``'s of the saved ones all call them), and the NumPy numbers and lists a user
or a checkpoint may bring, as the Python values the step and the state take."""

from __future__ import annotations

import numbers
from typing import Any

import torch

NONFINITE_POLICIES = ("raise", "skip")


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
