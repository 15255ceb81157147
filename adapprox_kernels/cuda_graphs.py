"""CUDA graphs of repeated optimizer work: capture a call once, then replay it as one launch.

A factored bucket's step launches many small kernels (the S-RSI products, CholeskyQR, sums, the
update) whose host cost is several times their GPU time at GPT-2 scale (a cold eager step at
345M, k = 1: 113 ms of host time, 28 ms of device time, 2,164 launches;
bench/results/profile_step_cuda_h100_cold.txt, H100). Once a bucket's step
repeats with the same shapes, ranks and hyperparameters, on tensors at the same addresses, its
launches are captured in a CUDA graph and replayed.

A graphed call ``fn(*inputs) -> outputs`` must keep this contract:

* ``inputs`` are the tensors that change from step to step: before each replay they are
  copied into the graph's own buffers, which the capture read;
* every other tensor ``fn`` reads or writes sits at the same address whenever the key is the
  same (callers put the data pointers in the key); cached device constants it uses are kept
  alive with the graph (:func:`~adapprox_kernels.transfer.keeping_constants`);
* ``fn`` does not wait for the GPU (no op that reads a device tensor on the host: the test
  ``test_graphed_calls_never_wait_for_the_device`` checks the optimizer's calls for them on a
  CPU) and launches on the current stream;
* the returned ``outputs`` belong to the graph: the next replay overwrites them.

Calls whose results are not needed at once are queued with :meth:`CallGraphs.defer` and run
together as a batch, one call under one key (a replay's host cost, launching the graph and
copying its inputs, hardly grows with its length): the optimizer runs every bucket's update as
one batch, and each bucket's S-RSI with the dense buckets' sums passes queued before it (S-RSI
is not batched further: the GPU runs one bucket's while the host prepares the next). While a
bucket's ranks move, a batch's key changes every few steps: until a batch has come up
``eager_runs`` times, its calls run one by one, each through its own graph.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from ._stacklevel import _outside_stacklevel
from .transfer import forget_constants, keeping_constants

Outputs = tuple  # of tensors, None, or (for a batch of deferred calls) tuples of those
_signature = operator.attrgetter("shape", "dtype", "device")  # (t.shape, t.dtype, t.device)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the buffers the capture read
    outputs: Outputs
    constants: list[torch.Tensor]  # cached device tensors the graph reads

    def __post_init__(self) -> None:
        # Input positions by dtype: a foreach copy whose tensors share one dtype is one fused
        # launch, a mixed list (fp32 factors with a bool rank mask) one copy per tensor.
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(self.inputs):
            by_dtype.setdefault(t.dtype, []).append(i)
        self.copy_groups = [([self.inputs[i] for i in idxs], idxs) for idxs in by_dtype.values()]

    def load(self, inputs: Sequence[torch.Tensor]) -> None:
        """Copies this replay's ``inputs`` into the buffers the capture read."""
        for buffers, idxs in self.copy_groups:
            torch._foreach_copy_(buffers, [inputs[i] for i in idxs])


class CallGraphs:
    """Runs a keyed call eagerly the first ``eager_runs`` times its key comes up (a key unseen
    for ``forget_after`` steps starts over: ranks in transition are not worth a capture), then
    captures it and replays it from then on. Holds graphs of at most ``capacity`` calls (a batch
    of deferred calls counts as its calls) besides those run in this step or the last: the least
    recently run are dropped first, but a step that needs more keeps them all, rather than drop
    some and capture them again every step; a dropped key starts over. ``counts`` tallies
    ``eager`` / ``captured`` / ``replayed`` calls and ``failed`` captures (a key whose capture
    failed runs eagerly for good, after one warning)."""

    def __init__(self, eager_runs: int = 2, forget_after: int = 16, capacity: int = 32):
        self.eager_runs, self.forget_after, self.capacity = eager_runs, forget_after, capacity
        self.counts: Counter = Counter()
        # key -> [graph or None where its capture failed, calls it holds, last use]; "last use"
        # counts runs, for the least recently used (a key of an update batch holds every
        # parameter's address: a dict lookup hashes and compares all of it, so a replay looks
        # its key up once and keeps no LRU order that would take more lookups)
        self._graphs: dict[Hashable, list] = {}
        self._uses = 0
        # _uses when the last step began and when this one did: graphs run since are kept.
        self._last_step_from = self._step_from = 0
        self._step = 0
        self._seen: dict[Hashable, tuple[int, int]] = {}  # key -> (last step seen, eager runs)
        self._queue: list[Deferred] = []  # deferred calls not run yet

    def next_step(self) -> None:
        """Marks the end of an optimizer step (after the step's queued calls have run)."""
        if self._queue:
            raise RuntimeError("CallGraphs.next_step: deferred calls were never run")
        self._step += 1
        self._last_step_from, self._step_from = self._step_from, self._uses
        self._seen = {k: v for k, v in self._seen.items() if v[0] >= self._step - self.forget_after}

    def defer(self, key: Hashable, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor]) -> Deferred:
        """Queues ``fn(*inputs)`` (the contract of :meth:`run`) to run with the other queued calls
        at the next :meth:`flush`, which reading the returned handle's ``outputs`` triggers."""
        call = Deferred(self, key, fn, list(inputs))
        self._queue.append(call)
        return call

    def flush(self) -> None:
        """Runs every queued call, in queue order, as one batch: its key is the calls' keys and
        the way their inputs alias (an input several calls share, such as one group's
        ``[α, 1 − α·λ, β1, 1 − β1]``, is loaded once). Until the batch has come up
        ``eager_runs`` times, the calls run one by one, through their own graphs."""
        calls, self._queue = self._queue, []
        if not calls:
            return
        if len(calls) == 1:
            (call,) = calls
            call.outputs = self.run(call.key, call.fn, call.inputs)
            return
        unique: dict[int, int] = {}  # id(tensor) -> position in the batch's inputs
        inputs: list[torch.Tensor] = []
        where = []  # per call, the positions of its inputs
        for call in calls:
            for t in call.inputs:
                if id(t) not in unique:
                    unique[id(t)] = len(inputs)
                    inputs.append(t)
            where.append(tuple(unique[id(t)] for t in call.inputs))
        fns = [call.fn for call in calls]

        def batch(*args: torch.Tensor) -> Outputs:
            return tuple(fn(*(args[i] for i in idxs)) for fn, idxs in zip(fns, where, strict=True))

        key = self._signed(("batch", tuple(call.key for call in calls), tuple(where)), inputs)
        entry = self._graphs.get(key)
        if entry is not None or self._seen.get(key, (0, 0))[1] >= self.eager_runs:
            outputs = self._run_signed(key, batch, inputs, len(calls), entry)
        else:
            self._seen[key] = (self._step, self._seen.get(key, (0, 0))[1] + 1)
            outputs = [self.run(call.key, call.fn, call.inputs) for call in calls]
        for call, out in zip(calls, outputs, strict=True):
            call.outputs = out

    def discard_queued(self) -> None:
        """Forgets the queued calls: updates queued before a failed non-finite check, or calls
        left by a step that raised."""
        self._queue.clear()

    def run(self, key: Hashable, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor]) -> Outputs:
        """``fn(*inputs)``: eagerly, captured, or replayed (see the class docstring)."""
        return self._run_signed(self._signed(key, inputs), fn, inputs, 1)

    @staticmethod
    def _signed(key: Hashable, inputs: Sequence[torch.Tensor]) -> Hashable:
        return key, tuple(map(_signature, inputs))

    def _run_signed(
        self,
        key: Hashable,
        fn: Callable[..., Outputs],
        inputs: Sequence[torch.Tensor],
        calls: int,
        entry: list | None = None,
    ) -> Outputs:
        """``entry``: the key's, where the caller has looked it up already."""
        if entry is None:
            entry = self._graphs.get(key)
        if entry is not None:
            captured = entry[0]
            self._uses += 1
            entry[2] = self._uses
            if captured is None:
                self.counts["eager"] += 1
                return fn(*inputs)
            captured.load(inputs)
            captured.graph.replay()
            self.counts["replayed"] += 1
            return captured.outputs
        runs = self._seen.get(key, (0, 0))[1] + 1
        self._seen[key] = (self._step, runs)
        if runs <= self.eager_runs:
            self.counts["eager"] += 1
            return fn(*inputs)
        return self._capture(key, fn, inputs, calls)

    def _capture(
        self, key: Hashable, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor], calls: int
    ) -> Outputs:
        static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        # Not torch.cuda.graph(): its entry empties the allocator's cache, which moves the
        # gradients that the next backward allocates, and so every other bucket's key.
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        try:
            with keeping_constants() as constants, torch.cuda.stream(side):
                graph.capture_begin()
                try:
                    outputs = fn(*static)
                finally:
                    graph.capture_end()
            current.wait_stream(side)
        except Exception as err:  # noqa: BLE001 - any capture failure means: stay eager
            current.wait_stream(side)
            forget_constants()  # those first made inside the capture hold nothing
            warnings.warn(
                f"CUDA graph capture failed, this step shape runs eagerly: {err}",
                RuntimeWarning,
                stacklevel=_outside_stacklevel(),  # the user's step call, not this line
            )
            self._store(key, None, calls)
            self.counts["failed"] += 1
            return fn(*inputs)
        except BaseException:  # Ctrl-C inside the capture: forget its constants too, and stop
            current.wait_stream(side)
            forget_constants()
            raise
        self._store(key, _Captured(graph, static, outputs, constants), calls)
        graph.replay()  # capturing ran nothing: this step's work happens now
        self.counts["captured"] += 1
        return outputs

    def _store(self, key: Hashable, captured: _Captured | None, calls: int) -> None:
        self._uses += 1
        self._graphs[key] = [captured, calls, self._uses]
        self._seen.pop(key, None)
        # Failed captures hold nothing and stay (their keys run eagerly for good).
        held = sum(calls for graph, calls, _ in self._graphs.values() if graph is not None)
        if held <= self.capacity:
            return
        stale = [item for item in self._graphs.items() if item[1][0] is not None and item[1][2] <= self._last_step_from]
        for old, (_, calls, _) in sorted(stale, key=lambda item: item[1][2]):
            if held <= self.capacity:
                break
            del self._graphs[old]
            held -= calls

    def __len__(self) -> int:
        return sum(c is not None for c, _, _ in self._graphs.values())


class Deferred:
    """A call queued by :meth:`CallGraphs.defer`; ``outputs`` runs the queue first if needed."""

    def __init__(self, graphs: CallGraphs, key: Hashable, fn: Callable[..., Outputs], inputs: list[torch.Tensor]):
        self.key, self.fn, self.inputs = key, fn, inputs
        self._graphs = graphs
        self._outputs: Outputs | None = None

    @property
    def outputs(self) -> Outputs:
        if self._outputs is None:
            self._graphs.flush()
        return self._outputs

    @outputs.setter
    def outputs(self, value: Outputs) -> None:
        self._outputs = value
