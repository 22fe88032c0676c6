"""Attention over packed documents without a dense mask: each document attends only to itself.

The trainer packs several whole documents into each row (``omnitok.data.packing``). With a kernel that takes a
mask, every layer then computes a full ``L x L`` score matrix per head and masks most of it away: with documents of
~60-400 tokens in rows of 512, the block-diagonal part is a small fraction of it. On a CPU, attention was 42 % of
a training step of the toyworld model, most of it spent on scores masked away. This kernel gathers the documents
of a batch into groups of equal padded length and runs plain causal attention on each group, so the work grows
with the sum of the squared document lengths rather than with ``rows x L^2``. Flash attention on a GPU does the
same from the position ids (``cu_seqlens``) and needs none of this.

It is registered with transformers' ``AttentionInterface`` as ``omnitok_packed``; a model runs it only while the
trainer sets that implementation and passes ``document_spans``. Called without spans (a model used for anything
else while training), it is ordinary SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from omnitok.errors import OmnitokError

NAME = "omnitok_packed"
# Documents are padded up to a multiple of this: fewer kernel calls per layer against a little padded work.
GRANULARITY = 32


@dataclass(frozen=True)
class _Group:
    gather: torch.Tensor  # [N * L] flat positions (the extra zero row for padding) in document order
    real: torch.Tensor  # indices into the group's N * L slots that hold real positions
    dest: torch.Tensor  # the flat position of each real slot
    n: int
    length: int


class DocumentSpans:
    """Where the documents of a packed batch lie, grouped by padded length; built once per batch for all layers."""

    def __init__(
        self, doc_ids: torch.Tensor, granularity: int = GRANULARITY, device: torch.device | None = None
    ) -> None:
        """``doc_ids`` ``[rows, length]`` as packed; index tensors go to ``device`` (default: ``doc_ids``'s).

        Give the ids on the CPU and the model's device here: the grouping (``nonzero``, ``unique``) then never
        waits on a GPU.
        """
        if doc_ids.dim() != 2:
            raise OmnitokError(f"doc_ids: expected [rows, length], got shape {list(doc_ids.shape)}")
        rows, length = doc_ids.shape
        self.positions = rows * length
        dev, to = doc_ids.device, device or doc_ids.device
        flat = doc_ids.reshape(-1)
        # A document starts where the id changes or a new row begins (ids restart in every row).
        start = torch.ones_like(flat, dtype=torch.bool)
        start[1:] = flat[1:] != flat[:-1]
        start[::length] = True
        starts = start.nonzero().squeeze(1)
        lens = torch.diff(starts, append=torch.tensor([self.positions], device=dev))
        padded = (lens + granularity - 1) // granularity * granularity
        self.groups: list[_Group] = []
        for size in padded.unique().tolist():
            sel = (padded == size).nonzero().squeeze(1)
            offsets = torch.arange(size, device=dev)
            idx = starts[sel, None] + offsets[None, :]
            real = offsets[None, :] < lens[sel, None]
            gather = torch.where(real, idx, torch.full_like(idx, self.positions))
            self.groups.append(
                _Group(
                    gather.reshape(-1).to(to, non_blocking=True),
                    real.reshape(-1).nonzero().squeeze(1).to(to, non_blocking=True),
                    idx[real].to(to, non_blocking=True),
                    len(sel),
                    size,
                )
            )


def _causal_bias(length: int, device: torch.device) -> torch.Tensor:
    """``[length, length]``: 0 where a query may look, -inf above the diagonal (kept for the lengths rows reuse)."""
    if length <= 1024:
        return _cached_bias(length, device)
    return _make_bias(length, device)


def _make_bias(length: int, device: torch.device) -> torch.Tensor:
    upper = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, device=device).masked_fill_(upper, float("-inf"))


_cached_bias = lru_cache(maxsize=64)(_make_bias)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_spans: DocumentSpans | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]``.

    Returns ``[B, L, H, D]`` like the library's kernels. Scores are computed with matmuls rather than the CPU flash
    kernel: at these short lengths the matmuls were faster, its backward pass most of all.
    """
    if document_spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for feature in ("sliding_window", "softcap"):
        if kwargs.get(feature) is not None:
            raise OmnitokError(
                f"attention: 'packed' does not implement this model's {feature}; set the recipe's attention: mask"
            )
    b, h, length, d = query.shape
    h_kv = key.shape[1]
    if b * length != document_spans.positions:
        raise OmnitokError(f"document_spans: made for {document_spans.positions} positions, the batch has {b * length}")
    repeat = h // h_kv
    scale = d**-0.5 if scaling is None else scaling

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, heads, L, D] -> [B*L + 1, heads, D]; the last row pads
        x = x.transpose(1, 2).reshape(b * length, x.shape[1], d)
        return torch.cat([x, x.new_zeros(1, x.shape[1], d)])

    q, k, v = flat(query), flat(key), flat(value)
    outs, dests = [], []
    for g in document_spans.groups:
        n, n_len = g.n, g.length
        # Query heads that share a key/value head are stacked along the length axis, so K and V are not copied.
        qg = q.index_select(0, g.gather).view(n, n_len, h_kv, repeat, d).permute(0, 2, 3, 1, 4)
        kg = k.index_select(0, g.gather).view(n, n_len, h_kv, d).transpose(1, 2)
        vg = v.index_select(0, g.gather).view(n, n_len, h_kv, d).transpose(1, 2)
        scores = torch.matmul(qg.reshape(n, h_kv, repeat * n_len, d), kg.transpose(-1, -2))
        scores = scores.view(n, h_kv, repeat, n_len, n_len).float() * scale + _causal_bias(n_len, scores.device)
        probs = torch.softmax(scores, dim=-1).view(n, h_kv, repeat * n_len, n_len)
        if dropout > 0:
            probs = F.dropout(probs, p=dropout, training=True)
        out = torch.matmul(probs.to(vg.dtype), vg)  # [n, Hkv, repeat * L, D]
        out = out.view(n, h_kv, repeat, n_len, d).permute(0, 3, 1, 2, 4).reshape(n * n_len, h, d)
        outs.append(out.index_select(0, g.real))
        dests.append(g.dest)
    src = torch.cat(outs)
    result = src.new_zeros(b * length, h, d).index_copy(0, torch.cat(dests), src)
    return result.view(b, length, h, d), None


AttentionInterface.register(NAME, packed_attention)
