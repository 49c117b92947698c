"""Count the aten ops a piece of work dispatches, by part: what a GPU step pays the host for, one
dispatch each (a view launches no kernel; a foreach op launches one per chunk of its tensors).

A `TorchDispatchMode` sees every op below autograd, backward's included, and after autocast's casts;
which ops a piece of code dispatches hardly depends on the device (autocast's lists of ops to cast do
differ between cpu and cuda), so a CPU counts about what a GPU would dispatch on the same code path (where
a library picks another path on cuda, force it: fastrsb asks for the foreach optimizers and EMA everywhere).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode

OUTSIDE = "other"  # the part of an op dispatched outside every `part(name)`


class OpCount(TorchDispatchMode):
    """`with OpCount() as count:` counts each dispatched op under the innermost `count.part(name)`;
    `count.ops[part]` maps op names (aten.convolution, aten._foreach_add_, ...) to calls."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self._part = OUTSIDE

    @contextmanager
    def part(self, name: str):
        outer, self._part = self._part, name
        try:
            yield
        finally:
            self._part = outer

    def total(self, part: str | None = None) -> int:
        """Ops dispatched in `part`, or in all parts."""
        return sum(sum(self.ops[p].values()) for p in ([part] if part else list(self.ops)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self._part][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
