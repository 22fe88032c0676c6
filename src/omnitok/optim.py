"""The optimizers every trainer shares: AdamW built one way, and an optimizer's state as safetensors + JSON.

Why one module: the LM trainer and both tokenizer trainers build AdamW, and the tokenizers checkpoint its state.
Where the fused kernel is taken, and how loaded moments must be laid out for it, is one rule; written once here,
a later change to it (a device gaining a fused kernel, a new parameter layout) cannot reach one trainer and miss
another. Muon, used by the LM alone, stays in ``omnitok.train.muon``.
"""

from __future__ import annotations

from typing import Any

import torch


def adamw(params: Any, device: str | torch.device, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW as one fused kernel over every tensor where torch has one (CPU, CUDA), else its for-loop.

    Why: torch fuses AdamW by default on no device, and its for-loop runs ~10 small ops per tensor: on a 2-core
    Xeon the speech tokenizer's 202 tensors took 40-50 ms a step that way and 9-10 ms fused, the image
    tokenizer's 70 13-14 ms and 3-4 ms, an all-AdamW LM 28 ms and 5 ms (docs/BENCHMARKS.md). The update is the
    same up to float rounding, provided each gradient and moment is laid out like its parameter: the fused kernel
    walks them by the parameter's strides (autograd's gradients are; ``load_state`` makes loaded moments so).
    """
    return torch.optim.AdamW(params, fused=torch.device(device).type in ("cpu", "cuda"), **kwargs)


def save_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as tensors named ``{prefix}.{param}.{key}`` and the JSON rest (never pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
                meta_state[str(pid)][k] = "tensor"
            else:
                meta_state[str(pid)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": meta_state}


def load_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what ``save_state`` wrote, each moment laid out like its parameter again.

    Moments are saved contiguous; a fused AdamW reads them with its parameter's strides (the image tokenizer's
    convolutions are channels_last), so without the re-layout a resumed run would update those weights wrong.
    """
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: tensors[f"{prefix}.{pid}.{k}"] if v == "tensor" else v for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)
