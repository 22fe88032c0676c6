"""omnitok's Muon: torch's update with the orthogonalisation in a chosen dtype."""

from __future__ import annotations

import pytest
import torch

from omnitok.train.muon import Muon, orthogonalize


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((48, 16), (16, 48), (24, 24))]


def _steps(opt_cls, ns_dtype=None, steps=3, **kw):
    params = _params(0)
    extra = {} if ns_dtype is None else {"ns_dtype": ns_dtype}
    opt = opt_cls(params, lr=0.02, weight_decay=0.1, **kw, **extra)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kw", [{"adjust_lr_fn": "match_rms_adamw"}, {}, {"nesterov": False}])
def test_bf16_is_torch_bit_for_bit(kw):
    ours, _ = _steps(Muon, torch.bfloat16, **kw)
    ref, _ = _steps(torch.optim.Muon, **kw)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def test_float32_orthogonalises_like_bf16_and_moves_the_same_way():
    ours, _ = _steps(Muon, torch.float32, adjust_lr_fn="match_rms_adamw")
    ref, _ = _steps(torch.optim.Muon, adjust_lr_fn="match_rms_adamw")
    start = _params(0)
    for a, b, s in zip(ours, ref, start, strict=True):
        da, db = (a - s).flatten(), (b - s).flatten()
        assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.99
        assert (da.norm() / db.norm() - 1).abs() < 0.02
    # the iteration itself: singular values of the result lie near 1 (the quintic leaves them in ~[0.5, 1.5])
    x = torch.randn(64, 32)
    s = torch.linalg.svdvals(orthogonalize(x, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32))
    assert s.min() > 0.5 and s.max() < 1.5


def test_state_dict_loads_into_torchs_muon_and_back():
    """Checkpoints written before this class (torch.optim.Muon) resume with it, and the other way round."""
    _, ours = _steps(Muon, torch.float32)
    params = _params(0)
    ref = torch.optim.Muon(params, lr=0.02, weight_decay=0.1)
    ref.load_state_dict(ours.state_dict())
    again = Muon(_params(0), lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    again.load_state_dict(ref.state_dict())
    for p in ours.param_groups[0]["params"]:
        assert "momentum_buffer" in ours.state[p]
    bufs = [again.state[p]["momentum_buffer"] for p in again.param_groups[0]["params"]]
    assert all(
        torch.equal(a, ours.state[p]["momentum_buffer"])
        for a, p in zip(bufs, ours.param_groups[0]["params"], strict=True)
    )


def test_torchs_checks_still_apply():
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.01)


@pytest.mark.parametrize("fast", [True, False])
def test_trainer_orthogonalises_in_bf16_only_where_bf16_is_fast(monkeypatch, fast):
    from omnitok.train import loop
    from omnitok.train.recipe import OptimConfig

    monkeypatch.setattr(loop, "_bf16_is_fast", lambda cuda: fast)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg)
    opts = loop._optimizers(model, OptimConfig(name="muon", lr=1e-3), torch.device("cpu"))
    muon = [o for o in opts if isinstance(o, Muon)]
    assert len(muon) == 1 and muon[0].ns_dtype == (torch.bfloat16 if fast else torch.float32)


def test_adamw_is_one_fused_kernel_on_a_cpu_for_the_lm_and_the_tokenizers():
    # torch's CPU default is a for-loop of small ops per tensor: 4-5x slower a step for the tokenizers (BENCHMARKS)
    from transformers import LlamaConfig, LlamaForCausalLM

    from omnitok.optim import adamw
    from omnitok.train import loop
    from omnitok.train.recipe import OptimConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    for name in ("adamw", "muon"):
        opts = loop._optimizers(LlamaForCausalLM(cfg), OptimConfig(name=name, lr=1e-3), torch.device("cpu"))
        assert [o.defaults["fused"] for o in opts if isinstance(o, torch.optim.AdamW)] == [True]
    assert adamw([torch.nn.Parameter(torch.zeros(3))], "cpu", lr=1e-3).defaults["fused"] is True
    assert adamw([torch.nn.Parameter(torch.zeros(3))], "meta", lr=1e-3).defaults["fused"] is False
