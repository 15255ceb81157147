"""Where the package's warnings point: at the user's line, not at a frame of the package's or
torch's own (hooks, wrappers)."""

from __future__ import annotations

import os
import sys

import torch

# Where the package's and torch's own frames are (see _outside_stacklevel).
_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for its caller's ``warnings.warn`` that names the first frame outside
    this package and torch: the user's call, however many hooks and wrappers lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level
