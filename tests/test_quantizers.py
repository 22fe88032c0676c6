"""Our quantizers agree with vector-quantize-pytorch's on the same inputs (codes are interchangeable)."""

from __future__ import annotations

import pytest
import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.quantizers import FSQ, EMAVectorQuantizer, ResidualFSQ, codebook_usage

vqp = pytest.importorskip("vector_quantize_pytorch")

LEVELS = [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5], [7, 5, 5, 5, 5], [3, 4]]


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("variant", ["plain", "hard_clamp", "symmetric"])
def test_fsq_matches_reference(levels: list[int], variant: str) -> None:
    torch.manual_seed(0)
    z = torch.randn(3, 50, len(levels)) * 2
    kw_ref = {"hard_clamp": {"bound_hard_clamp": True}, "symmetric": {"preserve_symmetry": True}}.get(variant, {})
    kw = {"hard_clamp": {"hard_clamp": True}, "symmetric": {"symmetric": True}}.get(variant, {})
    ref = vqp.FSQ(levels=levels, **kw_ref)
    ours = FSQ(levels, **kw)
    q_ref, i_ref = ref(z)
    q, i = ours(z)
    assert torch.equal(i, i_ref.long())
    assert torch.allclose(q, q_ref, atol=1e-6)
    assert torch.allclose(ours.indices_to_codes(i), ref.indices_to_codes(i_ref), atol=1e-6)
    assert ours.codebook_size == ref.codebook_size


def test_fsq_round_trip_and_gradient() -> None:
    fsq = FSQ([8, 5, 5, 5])
    ids = torch.arange(fsq.codebook_size)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(ids)), ids)
    z = torch.randn(10, 4, requires_grad=True)
    q, _ = fsq(z)
    q.sum().backward()
    assert z.grad is not None and (z.grad != 0).all()  # straight-through: gradient reaches the input


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4]])
def test_residual_fsq_matches_reference(levels: list[int]) -> None:
    torch.manual_seed(1)
    z = torch.randn(2, 40, len(levels)) * 2
    ref = vqp.ResidualFSQ(levels=levels, num_quantizers=3, dim=len(levels))
    ours = ResidualFSQ(levels, 3)
    q_ref, i_ref = ref(z)
    q, i = ours(z)
    assert torch.equal(i, i_ref.long())
    assert torch.allclose(q, q_ref, atol=1e-6)
    assert torch.allclose(ours.indices_to_codes(i), q, atol=1e-6)
    # each extra stage reduces the error
    errs = [
        (ResidualFSQ(levels, n)(z)[0] - torch.tanh(z / ours.soft_clamp) * ours.soft_clamp).abs().mean()
        for n in (1, 2, 3)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_ema_vq_matches_reference() -> None:
    # Assignment, output and commitment loss must agree with the library's on the same codebook, so codes are
    # interchangeable. Its EMA smoothing is not compared: the library replaced the Laplace smoothing of
    # VQ-VAE / Sonnet by another rule in 1.34, and ours keeps the published one (checked below).
    torch.manual_seed(2)
    ref = vqp.VectorQuantize(dim=8, codebook_size=32, decay=0.8, commitment_weight=0.25, rotation_trick=False)
    ours = EMAVectorQuantizer(8, 32, decay=0.8, dead_code_threshold=0, commitment_weight=0.25)
    ref.train()
    ours.train()
    for _ in range(3):  # several steps: the codebook moves, the outputs must still agree on it
        with torch.no_grad():
            ours.embed.copy_(ref._codebook.embed[0])
        x = torch.randn(2, 50, 8)
        q_ref, i_ref, l_ref = ref(x)
        q, i, loss = ours(x)
        assert torch.equal(i, i_ref)
        assert torch.allclose(q, q_ref, atol=1e-5)
        assert torch.allclose(loss, l_ref, atol=1e-6)


def test_ema_vq_update_is_the_published_rule() -> None:
    # van den Oord et al. 2017, appendix A.1, with Sonnet's Laplace smoothing of the cluster sizes.
    torch.manual_seed(4)
    decay, eps, k = 0.8, 1e-5, 16
    vq = EMAVectorQuantizer(4, k, decay=decay, eps=eps, dead_code_threshold=0)
    vq.train()
    for _ in range(3):
        x = torch.randn(40, 4)
        size, avg = vq.cluster_size.clone(), vq.embed_avg.clone()
        _, ind, _ = vq(x)
        onehot = torch.nn.functional.one_hot(ind, k).float()
        size = decay * size + (1 - decay) * onehot.sum(0)
        avg = decay * avg + (1 - decay) * onehot.t() @ x
        n = size.sum()
        smoothed = (size + eps) / (n + k * eps) * n
        assert torch.allclose(vq.cluster_size, size, atol=1e-6)
        assert torch.allclose(vq.embed_avg, avg, atol=1e-6)
        assert torch.allclose(vq.embed, avg / smoothed[:, None], atol=1e-5)


def test_ema_vq_restarts_dead_codes() -> None:
    torch.manual_seed(3)
    vq = EMAVectorQuantizer(4, 16, decay=0.5, dead_code_threshold=1.0)
    with torch.no_grad():
        vq.embed[1:] += 100.0  # all but code 0 are far from the data: they would never be chosen
    x = torch.randn(64, 4) * 0.1
    for _ in range(4):
        vq(x)
    _, ind, _ = vq(x)
    assert ind.unique().numel() > 1  # restarted codes moved onto the data and now get used


def test_quantizer_shape_errors() -> None:
    with pytest.raises(OmnitokError, match="levels"):
        FSQ([8, 1])
    with pytest.raises(OmnitokError, match="4 channels"):
        FSQ([8, 5, 5, 5])(torch.zeros(2, 3))
    with pytest.raises(OmnitokError, match="channels last"):
        EMAVectorQuantizer(4, 8)(torch.zeros(2, 3))


def test_codebook_usage() -> None:
    u = codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert u["fraction_used"] == 0.5 and u["codes_used"] == 4
    assert abs(u["perplexity"] - 4.0) < 1e-9
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)
