"""`per_example_gradients: mixed_ghost`: the clipped sum of per-example gradients without a
per-example weight gradient of the whole model (book-keeping with mixed ghost norms; Bu et al.,
"Differentially Private Optimization on Large Model at Small Cost", ICML 2023).

One forward pass records, for every module that owns trainable parameters, its input; one
backward pass records the gradient of Σ_i L_i (L_i: example i's mean loss over its K rows) with
respect to each such module's output. It is `torch.autograd.grad` to those outputs, so autograd
computes no parameter gradient at all. From the two, each layer gives every example's squared
gradient norm by the cheaper of
- the ghost norm, ‖G_iᵀA_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩, about T²(d + p) operations, or
- instantiation, G_iᵀA_i itself, about T·d·p (for a convolution by its own weight-gradient
  kernel grouped by example, as fast as the batched weight gradient on a CPU),
where A_i (T × d) are the example's inputs and G_i (T × p) its output gradients over its T
positions: K rows × the layer's spatial positions. The K rows are folded here, before clipping.
The norms give the clip factors c_i = min(1, C / (‖g_i‖ + 1e-6)), Opacus' own. Each layer's
clipped sum Σ_i c_i G_iᵀA_i is then the instantiated gradients weighted by c_i, or, for a ghost
layer, one weight-gradient product on the book-kept output gradients scaled per example, so no
second backward pass is needed. `p.grad` gets that sum and
Opacus' `DPOptimizerFastGradientClipping` adds the noise, as for the other modes.

Hand-written because no kept library does it for these layers: Opacus' fast gradient clipping
(`GradSampleModuleFastGradientClipping`) has ghost norms for linear layers only and takes a second
backward pass; fastDP (the paper's code) is not a dependency here. Modules: Conv2d (groups 1),
Linear, GroupNorm and Embedding, which covers the shipped UNets with and without attention, and
peft's LoRA adapters (their A and B are Linear or Conv2d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)


@dataclass
class _Calls:
    """One module's inputs and outputs over the forward pass (a module may run more than once)."""

    module: nn.Module
    params: dict[str, nn.Parameter]  # its trainable parameters, by their own name
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)


def trainable_modules(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, _Calls]:
    """The modules owning the trainable parameters; refuses a module type this mode cannot clip."""
    owned: dict[str, _Calls] = {}
    wanted = {id(p) for p in params.values()}
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in wanted}
        if not own:
            continue
        if not isinstance(module, SUPPORTED) or _unsupported(module):
            raise ValueError(
                f"per_example_gradients: mixed_ghost cannot clip the trainable parameters of "
                f"{name or 'the model'} ({type(module).__name__}); use vmap"
            )
        owned[name] = _Calls(module, own)
    if sum(len(c.params) for c in owned.values()) != len(params):
        raise ValueError("per_example_gradients: mixed_ghost found a trainable parameter outside a module")
    return owned


def _unsupported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups != 1 or module.padding_mode != "zeros"
    if isinstance(module, nn.Embedding):
        return module.max_norm is not None or module.sparse
    if isinstance(module, nn.GroupNorm):
        return not module.affine
    return False


def clipped_sum(
    model: nn.Module,
    calls: dict[str, _Calls],
    row_loss: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    n: int,
    k: int,
    max_grad_norm: float,
) -> tuple[float, torch.Tensor]:
    """Set `p.grad` of every trainable parameter to Σ_i c_i g_i over the n examples (k rows each,
    consecutive) and return (the mean row loss, the per-example norms ‖g_i‖)."""
    handles = [c.module.register_forward_hook(_recorder(c)) for c in calls.values()]
    try:
        losses = row_loss(model, *rows)
    finally:
        for h in handles:
            h.remove()
    outputs = [o for c in calls.values() for o in c.outputs]
    grads = torch.autograd.grad(losses.float().view(n, k).mean(1).sum(), outputs, allow_unused=True)
    it = iter(grads)
    for c in calls.values():
        c.grads = [torch.zeros_like(o) if g is None else g for o, g in zip(c.outputs, it, strict=False)]
    squared = torch.zeros(n, device=losses.device)
    layers = [_layer(c, n, k) for c in calls.values()]
    for layer in layers:
        squared += layer.norms_squared()
    norms = squared.sqrt()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for layer in layers:
        layer.set_clipped_grads(factors)
    for c in calls.values():
        c.inputs, c.outputs, c.grads = [], [], []
    return float(losses.detach().float().mean()), norms


def _recorder(c: _Calls):
    def hook(module, args, output):
        c.inputs.append(args[0].detach())
        c.outputs.append(output)

    return hook


def _layer(c: _Calls, n: int, k: int):
    if isinstance(c.module, nn.GroupNorm):
        return _GroupNorm(c, n, k)
    if isinstance(c.module, nn.Embedding):
        return _Embedding(c, n, k)
    if isinstance(c.module, nn.Conv2d) and not _conv_ghost_is_cheaper(c, k):
        return _ConvInstantiated(c, n, k)
    return _Dense(c, n, k)


def _per_example(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[n·k rows, T, …] → [n, k·T, …]: an example's positions over its k rows."""
    return t.reshape(n, k * t.shape[1], *t.shape[2:])


def _ghost_is_cheaper(t: int, d: int, p: int) -> bool:
    """Ghost norm, T²(d + p) operations, against instantiation, T·d·p."""
    return t * (d + p) < d * p


def _conv_ghost_is_cheaper(c: _Calls, k: int) -> bool:
    """`_ghost_is_cheaper` for a convolution, with T = k × its output positions."""
    m = c.module
    t = k * sum(g[0, 0].numel() for g in c.grads)
    return _ghost_is_cheaper(t, m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels)


class _ConvInstantiated:
    """Conv2d, each example's weight gradient formed by the convolution's own weight-gradient
    kernel, grouped by example (the K rows of an example are its batch): as fast as the batched
    weight gradient on a CPU, where unfold and a batched product were 20× slower."""

    def __init__(self, c: _Calls, n: int, k: int) -> None:
        m, self.c = c.module, c
        self.w = None
        self.b = None
        for a, g in zip(c.inputs, c.grads, strict=True):
            a, g = _by_example(a.float(), n, k), _by_example(g.float(), n, k)
            w = torch.nn.grad.conv2d_weight(
                a, (n * m.out_channels, m.in_channels, *m.kernel_size), g,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=n,
            ).view(n, *m.weight.shape)  # fmt: skip
            b = g.view(k, n, m.out_channels, -1).sum((0, 3))
            self.w = w if self.w is None else self.w + w
            self.b = b if self.b is None else self.b + b

    def norms_squared(self) -> torch.Tensor:
        w = self.w.flatten(1).pow(2).sum(1) if "weight" in self.c.params else 0.0
        return w + (self.b.pow(2).sum(1) if "bias" in self.c.params else 0.0)

    def set_clipped_grads(self, factors: torch.Tensor) -> None:
        for name, per in (("weight", self.w), ("bias", self.b)):
            p = self.c.params.get(name)
            if p is not None:
                p.grad = torch.einsum("n,n...->...", factors, per).to(p.dtype)


def _by_example(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[n·k, C, H, W] → [k, n·C, H, W]: example i's channels are group i, its rows the batch."""
    return t.view(n, k, *t.shape[1:]).transpose(0, 1).reshape(k, n * t.shape[1], *t.shape[2:])


class _Dense:
    """Linear and Conv2d (via unfold) as tokens: A [n, T, d] inputs, G [n, T, p] output grads."""

    def __init__(self, c: _Calls, n: int, k: int) -> None:
        self.c, self.n = c, n
        tokens = [self._tokens(a, g) for a, g in zip(c.inputs, c.grads, strict=True)]
        self.a = _per_example(torch.cat([a for a, _ in tokens], 1), n, k)
        self.g = _per_example(torch.cat([g for _, g in tokens], 1), n, k)

    def _tokens(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.c.module
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(a.float(), m.kernel_size, m.dilation, m.padding, m.stride)  # [rows, d, L]
            return cols.transpose(1, 2), g.float().flatten(2).transpose(1, 2)
        return a.float().reshape(len(a), -1, a.shape[-1]), g.float().reshape(len(g), -1, g.shape[-1])

    def norms_squared(self) -> torch.Tensor:
        t, d, p = self.a.shape[1], self.a.shape[2], self.g.shape[2]
        if _ghost_is_cheaper(t, d, p):  # ghost norm: the T×T Gram matrices
            w = (self.a @ self.a.transpose(1, 2) * (self.g @ self.g.transpose(1, 2))).sum((1, 2))
        else:  # instantiate each example's weight gradient
            w = (self.g.transpose(1, 2) @ self.a).pow(2).sum((1, 2))
        if "bias" in self.c.params:
            w = w + self.g.sum(1).pow(2).sum(1)
        return w

    def set_clipped_grads(self, factors: torch.Tensor) -> None:
        g = (self.g * factors[:, None, None]).flatten(0, 1)  # [n·T, p]
        weight = self.c.params.get("weight")
        if weight is not None:
            weight.grad = (g.T @ self.a.flatten(0, 1)).reshape(weight.shape).to(weight.dtype)
        bias = self.c.params.get("bias")
        if bias is not None:
            bias.grad = g.sum(0).to(bias.dtype)


class _GroupNorm:
    """Per-example gradients are per channel ([n, C]): cheap to instantiate."""

    def __init__(self, c: _Calls, n: int, k: int) -> None:
        m, self.c = c.module, c
        self.per: dict[str, torch.Tensor] = {}
        for a, g in zip(c.inputs, c.grads, strict=True):
            g = g.float()
            normed = F.group_norm(a.float(), m.num_groups, eps=m.eps)
            rows = {"weight": (g * normed).flatten(2).sum(2), "bias": g.flatten(2).sum(2)}
            for name, r in rows.items():
                r = r.view(n, k, -1).sum(1)
                self.per[name] = self.per[name] + r if name in self.per else r

    def norms_squared(self) -> torch.Tensor:
        return sum(self.per[name].pow(2).sum(1) for name in self.c.params)

    def set_clipped_grads(self, factors: torch.Tensor) -> None:
        for name, p in self.c.params.items():
            p.grad = (self.per[name] * factors[:, None]).sum(0).to(p.dtype)


class _Embedding:
    """An example's gradient is its output gradients added into the rows of its indices."""

    def __init__(self, c: _Calls, n: int, k: int) -> None:
        self.c, self.m = c, c.module
        idx = [i.reshape(len(i), -1) for i in c.inputs]
        grads = [g.float().reshape(len(g), -1, g.shape[-1]) for g in c.grads]
        self.idx = _per_example(torch.cat(idx, 1), n, k)  # [n, T]
        self.g = _per_example(torch.cat(grads, 1), n, k)  # [n, T, d]
        if self.m.padding_idx is not None:  # the padding row gets no gradient
            self.g = self.g * (self.idx != self.m.padding_idx)[..., None]

    def norms_squared(self) -> torch.Tensor:
        same = (self.idx[:, :, None] == self.idx[:, None, :]).float()
        return (same * (self.g @ self.g.transpose(1, 2))).sum((1, 2))

    def set_clipped_grads(self, factors: torch.Tensor) -> None:
        weight = self.c.params["weight"]
        g = (self.g * factors[:, None, None]).reshape(-1, self.g.shape[-1])
        grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weight.grad = grad.index_add_(0, self.idx.reshape(-1), g).to(weight.dtype)
