"""Count what would make the host wait for the device, on a machine with or without a GPU.

A GPU step stays ahead of its GPU only if the host never waits: no read-back of a device tensor
(`.item()`, `.tolist()`, `bool(t)`, ...), no data-dependent-shape op on one (`nonzero`, `bincount`,
boolean-mask indexing, ...: the host must learn the output size), and no pageable host->device
copy (`.to(device)` of a host tensor). `SyncAudit` is a torch function mode that records each of
these as it happens, plus every host tensor used directly in an op with a device tensor (on a GPU
that op fails with a device mismatch, or copies behind the caller's back).

On cuda, "device tensor" means a cuda tensor. On a CPU-only machine `DeviceTensor` stands for device
memory: a CPU tensor whose op results stay `DeviceTensor`s, so the same code path can be audited
without a GPU. `to_device_memory(module)` moves a model (its parameters, buffers and gradients) there.
Hand-written because no library audits host/device traffic on a CPU; torch's own
`torch.cuda.set_sync_debug_mode` needs a GPU (use both there).
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class DeviceTensor(torch.Tensor):
    """A CPU tensor that stands for memory on an accelerator (results of ops on it stay wrapped)."""


def to_device_memory(obj):
    """A tensor as a DeviceTensor, or a module whose parameters, buffers and (future) gradients are
    DeviceTensors, changed in place so optimizers and EMA copies that hold them see the change."""
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(DeviceTensor)

    def wrap_grad(p):  # gradients are made by autograd in C++: wrap each as it is accumulated
        p.grad = p.grad.as_subclass(DeviceTensor)

    for module in obj.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not isinstance(p, DeviceTensor):
                torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().as_subclass(DeviceTensor), p.requires_grad))
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(wrap_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and not isinstance(b, DeviceTensor):
                module._buffers[name] = b.as_subclass(DeviceTensor)
    return obj


# reading a device tensor's value on the host
READ_BACKS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__",
              "__array__", "__repr__", "__format__", "__str__", "__contains__", "equal", "allclose", "is_nonzero"}
# ops whose output size depends on the data (the host has to read it to allocate)
DATA_DEPENDENT = {"nonzero", "argwhere", "unique", "unique_consecutive", "bincount", "masked_select",
                  "repeat_interleave", "histogram"}
# ops that build a device tensor from host data: each is a copy (pageable when the data is not pinned)
FROM_HOST_DATA = {"tensor", "as_tensor", "asarray", "new_tensor"}


@dataclass
class SyncAudit(TorchFunctionMode):
    """Record host/device synchronisation hazards while active (`with SyncAudit() as audit:`).

    Attributes are lists of op names (plus shapes for copies), in the order they happened."""

    emulated: bool = True  # device tensors are DeviceTensors (no GPU); False: cuda tensors, a real GPU run
    read_backs: list = field(default_factory=list)
    data_dependent: list = field(default_factory=list)
    host_in_device_op: list = field(default_factory=list)
    host_to_device_copies: list = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        self._paused = 0
        self._where: list[str] = []

    @property
    def syncs(self) -> list:
        """Everything that would make the host wait, or fail, on a GPU (copies aside)."""
        return self.read_backs + self.data_dependent + self.host_in_device_op

    def __enter__(self):
        if not self.emulated:  # on a GPU, torch also raises at every synchronizing call it knows of
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        if not self.emulated:
            torch.cuda.set_sync_debug_mode(0)
        return super().__exit__(*exc)

    @contextmanager
    def paused(self):
        """Not audited: the places where a sync is intended (a log interval)."""
        self._paused += 1
        if not self.emulated:
            torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            self._paused -= 1
            if not self.emulated and not self._paused:
                torch.cuda.set_sync_debug_mode("error")

    def _names_device(self, device) -> bool:
        """Whether a `device=` argument means the accelerator. On cuda: a cuda device. Emulated, where the
        run's device is the CPU too: a torch.device object (what code that follows the run's device
        passes, e.g. `device=images.device`), not the string "cpu", which code writes to mean the host
        (timm keeps its optimizer step counters there on purpose)."""
        if device is None:
            return False
        if self.emulated:
            return isinstance(device, torch.device)
        return torch.device(device).type == "cuda"

    @staticmethod
    def on_device(t) -> bool:
        return isinstance(t, torch.Tensor) and (t.is_cuda or isinstance(t, DeviceTensor))

    def where(self) -> list[str]:
        """file:line (function) of the code that caused each recorded sync, outside torch."""
        return self._where

    def _record(self, kind: list, what) -> None:
        kind.append(what)
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and f.filename != __file__]
        self._where.append(f"{what}: {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else str(what))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self._paused:
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = [t for t in tensors if self.on_device(t)]
        host = [t for t in tensors if not self.on_device(t) and t.dim() > 0]  # 0-dim host tensors are scalars
        to_device = False
        if device:
            if name in READ_BACKS:
                self._record(self.read_backs, name)
            if name in DATA_DEPENDENT and not (name == "repeat_interleave" and not isinstance(args[1], torch.Tensor)):
                self._record(self.data_dependent, name)
            if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:2])):
                self._record(self.data_dependent, f"{name} with a boolean mask")
            if name == "where" and len(args) + len(kwargs) == 1:
                self._record(self.data_dependent, "where(condition)")
            if name == "copy_" and not self.on_device(args[1]):
                self._record(self.host_to_device_copies, (name, tuple(args[1].shape)))
            elif name in FROM_HOST_DATA:
                to_device = True
                self._record(self.host_to_device_copies, (name, tuple(tensors[-1].shape) if len(tensors) > 1 else ()))
            elif host and name not in ("to", "cuda"):
                self._record(self.host_in_device_op, (name, [tuple(t.shape) for t in host]))
        elif name in ("to", "cuda") and tensors:
            target = torch._C._nn._parse_to(*args[1:], **kwargs)[0] if name == "to" else None
            if self._names_device(target if name == "to" else "cuda"):
                to_device = True
                self._record(self.host_to_device_copies, (name, tuple(tensors[0].shape)))
        elif name in FROM_HOST_DATA and self._names_device(kwargs.get("device")):
            to_device = True
            self._record(self.host_to_device_copies, (name, ()))
        elif not tensors and self._names_device(kwargs.get("device")):
            to_device = True  # a factory (empty, zeros, arange, ...) on the device: no copy
        out = func(*args, **kwargs)
        if to_device and self.emulated and isinstance(out, torch.Tensor) and not isinstance(out, DeviceTensor):
            out = out.as_subclass(DeviceTensor)
        return out

