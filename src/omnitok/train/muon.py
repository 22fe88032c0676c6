"""Muon whose Newton–Schulz orthogonalisation runs in a dtype the hardware is fast at.

``torch.optim.Muon`` orthogonalises every update in bfloat16, as the reference implementation does for GPUs. On a
CPU without bf16 matmul instructions (no AMX, no AVX512-BF16) those matmuls are converted in software: on a 2-core
Xeon of that kind the demo's LM trained at 1,509 positions/s with torch's Muon, 2,218 with this one in float32 and
3,137 with AdamW (docs/BENCHMARKS.md, "Muon on a CPU without bf16 matmuls"); the five Newton–Schulz steps took
0.67 s of each 1.5 s step in bf16, 0.20 s in float32. This subclass keeps torch's optimizer
(arguments, checks, param groups, ``momentum_buffer`` state, so checkpoints load either way) and only chooses the
dtype of the orthogonalisation; with ``ns_dtype=torch.bfloat16`` its update is torch's, bit for bit (tested).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def orthogonalize(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The quintic Newton–Schulz iteration of Muon: ``g``'s singular values pushed towards 1, in ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller square
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Scale of an orthogonalised update: Keller Jordan's ``original`` or Moonshot's ``match_rms_adamw``."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with ``ns_dtype``: bfloat16 where bf16 matmuls are fast, float32 elsewhere."""

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if torch.is_complex(p) or grad.is_sparse:  # as torch's Muon refuses them
                    raise RuntimeError("Muon supports neither complex parameters nor sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
