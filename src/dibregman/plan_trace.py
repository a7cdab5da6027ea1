"""Activation memory of one forward pass, counted on the meta device: the bytes of the tensors autograd saves for
the backward pass (`torch.autograd.graph.saved_tensors_hooks`), each storage once, parameters and buffers left out.
The meta device runs no kernels and holds no data, so this costs nothing even for FLUX at 1024 px.

What the count models, and how:
- Attention: `F.scaled_dot_product_attention` is replaced by a fused kernel's footprint (flash / memory-efficient
  attention on CUDA, flash attention on the CPU): it keeps q, k, v, the output (laid out heads-last, as flash
  attention returns it) and the log-sum-exp [B, heads, L] in fp32, never the L x L matrix (the meta device
  would take the math path and keep that matrix). Networks that write their attention out (our DDPM++ U-Net:
  einsum + softmax) are counted as written.
- bf16 autocast (`bf16=True`): a `TorchFunctionMode` applies CUDA autocast's casting rules to the ops that carry
  the memory (matmuls, convolutions, attention in bf16; normalisations and softmax in fp32). A parameter cast to
  bf16 and kept for the backward (autocast's weight cache) is counted apart (`weights`): FSDP2's mixed precision
  holds its bf16 parameters in the all-gather buffers instead.
- Activation checkpointing: the blocks of `plan_models.UNIT_CLASSES` are the checkpointed units. With it on, the
  forward keeps what is saved outside the units and each unit's inputs; the backward recomputes one unit at a time
  and adds that unit's saved tensors (the largest one is the peak).
Not counted: temporaries a kernel frees before it returns, the gradient buffers of the backward's working set, and
allocator rounding; `bench/plan_check.py` measures how far the count is from a measured peak.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .plan_models import UNIT_CLASSES


@dataclass(frozen=True)
class Trace:
    """Bytes a forward pass keeps for the backward pass, split as activation checkpointing needs them."""

    outside: int  # saved outside any checkpointed unit (activations)
    inside: int  # saved inside the units, all of them (activations)
    unit_inputs: int  # the units' input tensors not already in `outside` (what checkpointing keeps)
    unit_max: int  # the largest one unit saves (what one recomputation adds back)
    weights: int  # parameters cast to bf16 and kept (autocast's weight copies)

    def activations(self, checkpointing: bool, recompute: bool = True) -> int:
        """Saved activation bytes with activation checkpointing off (everything) or on (outside + inputs, + the
        largest unit recomputed during the backward unless recompute=False: the end of the forward)."""
        if checkpointing and self.unit_max:
            return self.outside + self.unit_inputs + (self.unit_max if recompute else 0)
        return self.outside + self.inside

    def __add__(self, other: Trace) -> Trace:
        return Trace(
            self.outside + other.outside,
            self.inside + other.inside,
            self.unit_inputs + other.unit_inputs,
            max(self.unit_max, other.unit_max),
            self.weights + other.weights,
        )

    def times(self, k: int) -> Trace:
        """k independent passes of this one (the recompute peak stays one unit's)."""
        return Trace(k * self.outside, k * self.inside, k * self.unit_inputs, self.unit_max, k * self.weights)


ZERO = Trace(0, 0, 0, 0, 0)


class _FusedAttention(torch.autograd.Function):
    """The footprint of a fused attention kernel: out [B, heads, L, Dv] laid out as [B, L, heads, Dv] (as flash
    attention returns it, so merging the heads is a view); keeps q, k, v, out and lse [B, heads, L] (fp32)."""

    @staticmethod
    def forward(ctx, q, k, v):
        if q.dim() == 4:
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the planner never runs a backward pass
        raise NotImplementedError("the planner's attention only counts memory")


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


_LOWER = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear", "matmul", "__matmul__",
          "mm", "bmm", "baddbmm", "addmm", "einsum", "_fused_sdpa", "scaled_dot_product_attention"}  # fmt: skip
_FP32 = {"group_norm", "layer_norm", "rms_norm", "softmax", "log_softmax", "norm", "softplus", "exp", "pow",
         "rsqrt", "mse_loss", "cumsum", "sum"}  # fmt: skip


class _Autocast(TorchFunctionMode):
    """CUDA autocast's casting rules for the ops that carry the memory, on any device (the meta device has no
    autocast): float inputs of `_LOWER` ops in bf16, of `_FP32` ops in fp32. Records which casts were parameters."""

    def __init__(self, params: set[int], hold: bool = True):  # hold: keep the parameters' casts (see `_cast`)
        super().__init__()
        self.params, self.weight_copies, self.held, self.hold = params, set(), [], hold

    def _cast(self, x, dtype):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype) for v in x)
        if not (torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float64 and x.dtype != dtype):
            return x
        y = x.to(dtype)
        if id(x) in self.params and self.hold:
            self.weight_copies.add(y.untyped_storage()._cdata)
            self.held.append(y)  # alive until the count ends: no later storage reuses its key
        return y

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        dtype = torch.bfloat16 if name in _LOWER else torch.float32 if name in _FP32 else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _patched_sdpa():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def trace(net: nn.Module, run, *, bf16: bool = False, fused_attention: bool = True) -> Trace:
    """Count what `run()` (a forward pass of `net` with gradients) keeps for its backward pass; see the module
    docstring. The caller builds `net` on the meta device (any device works; the meta device costs nothing).
    fused_attention=False keeps the device's own attention kernel (a measurement on the CPU)."""
    excluded = {_key(t) for t in [*net.parameters(), *net.buffers()]}
    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, the unit that saved it first or None)
    inputs: dict[int, int] = {}  # storage -> bytes of the units' inputs
    held: list[torch.Tensor] = []  # the units' inputs, alive until the count ends (storage keys stay unique)
    active: list[int] = []
    mode = _Autocast({id(p) for p in net.parameters()}) if bf16 else contextlib.nullcontext()

    def pack(t: torch.Tensor):
        k = _key(t)
        if k not in excluded:
            owner = active[0] if active else None
            size, first = saved.get(k, (t.untyped_storage().nbytes(), owner))
            saved[k] = (size, None if owner is None else first)
        return t

    def pre(module, args, kwargs):
        if not active:
            for x in [*args, *kwargs.values()]:
                if torch.is_tensor(x) and x.is_floating_point() and _key(x) not in excluded:
                    inputs[_key(x)] = x.untyped_storage().nbytes()
                    held.append(x)
        active.append(id(module))

    def post(module, args, kwargs, out):
        active.pop()

    blocks = [m for m in net.modules() if type(m).__name__ in UNIT_CLASSES]
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in blocks]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in blocks]
    try:
        attention = _patched_sdpa() if fused_attention else contextlib.nullcontext()
        with attention, mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    copies = mode.weight_copies if bf16 else set()
    acts = {k: v for k, v in saved.items() if k not in copies}
    per_unit: dict[int, int] = {}
    for size, owner in acts.values():
        if owner is not None:
            per_unit[owner] = per_unit.get(owner, 0) + size
    outside = sum(size for size, owner in acts.values() if owner is None)
    kept = sum(size for k, size in inputs.items() if k not in acts or acts[k][1] is not None)
    return Trace(
        outside=outside,
        inside=sum(per_unit.values()),
        unit_inputs=kept if per_unit else 0,
        unit_max=max(per_unit.values(), default=0),
        weights=sum(saved[k][0] for k in copies if k in saved),
    )


class _Live(TorchDispatchMode):
    """Bytes alive among the tensors the ops create: a storage counts from the op that makes it until the last
    tensor on it is gone (`weakref.finalize`); `peak` is the highest total. Storages in `known` are not counted."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.refs, self.now, self.peak = known, {}, 0, 0

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _key(t) not in self.known:
                entry = self.refs.setdefault(_key(t), [t.untyped_storage().nbytes(), 0])
                if entry[1] == 0:
                    self.now += entry[0]
                    self.peak = max(self.peak, self.now)
                entry[1] += 1
                weakref.finalize(t, self._release, _key(t))
        return out


def working_set(net: nn.Module, shape: tuple[int, ...], batch: int, *, bf16: bool = False) -> int:
    """Peak bytes alive during a forward pass of D(x, sigma) without gradients (the teacher's and psi's passes at
    x_t): the U-Net's skip connections, the largest layer's input and output, the result. Under bf16 a weight's
    cast counts while its op runs (autocast's cached copies of trainable weights are the planner's own row)."""
    device = next(net.parameters()).device
    x, sigma = torch.zeros(batch, *shape, device=device), torch.ones(batch, device=device)
    live = _Live({_key(t) for t in [*net.parameters(), *net.buffers(), x, sigma]})
    mode = _Autocast(set(), hold=False) if bf16 else contextlib.nullcontext()  # weight casts: transient here
    with torch.no_grad(), _patched_sdpa(), mode, live:
        net(x, sigma)
    return live.peak


def trace_denoiser(net: nn.Module, shape: tuple[int, ...], batch: int, *, features: bool = False,
                   input_grad: bool = False, bf16: bool = False, fused_attention: bool = True) -> Trace:  # fmt: skip
    """`trace` of D(x, sigma) (or `features(x, sigma)`) at `batch` samples of `shape` on the device of `net`;
    input_grad: x requires a gradient (the GAN term's path into the generator)."""
    device = next(net.parameters()).device
    x = torch.zeros(batch, *shape, device=device, requires_grad=input_grad)
    sigma = torch.ones(batch, device=device)
    fn = net.features if features else net
    return trace(net, lambda: fn(x, sigma), bf16=bf16, fused_attention=fused_attention)


__all__ = ["Trace", "ZERO", "trace", "trace_denoiser", "working_set"]
