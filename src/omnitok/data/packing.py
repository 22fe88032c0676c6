"""Mixture sampling and sequence packing: from token shards to fixed-shape training batches.

Packing puts several whole documents into one row of ``seq_len`` tokens instead of padding each document to
the longest in its batch, so nearly every position the model computes is a real token. Documents must not see
each other: each row carries a document id per position, from which the trainer builds a block-diagonal causal
mask (or, with flash attention, lets the position ids, which restart at 0 for every document, do it).

Sampling is planned for a whole *global* batch (every rank, every micro-step of one optimizer step) from a
generator seeded by ``(seed, step)``; each rank then materialises only its rows. So ranks draw disjoint data
without talking to each other, a 2-rank run sees exactly the rows of a 1-rank run with twice the micro-batch,
and resuming needs only the small :meth:`MixtureSampler.state_dict`.

Choices, documented because they change what the model sees:

- Mixture weights are probabilities of drawing a *document* from a task, not shares of tokens.
- Within a task, documents are visited in a fresh random permutation per epoch (without replacement).
- A document longer than ``seq_len`` is truncated to its first ``seq_len`` tokens (counted in ``truncated``).
- Rows are filled first-fit in draw order. A document that fits in no row is not dropped: it waits (is
  *pending*) and opens the next step's batch. A step's batch closes after ``rows`` such misses (so the pending
  documents always fit the next batch), which keeps padding low without biasing the mixture toward short
  documents.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omnitok.errors import OmnitokError

IGNORE = -100
_STREAM = 0x6F6D6E69  # separates the sampler's random stream from any other user of the same seed

Doc = tuple[str, int]  # (task, document index)


class MixtureSampler:
    """Decides which documents fill the rows of each global batch."""

    def __init__(
        self,
        lengths: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        seq_len: int,
        seed: int,
    ) -> None:
        tasks = [t for t, w in weights.items() if w > 0]
        if not tasks:
            raise OmnitokError("mixture has no task with a positive weight")
        for t in tasks:
            if t not in lengths or len(lengths[t]) == 0:
                raise OmnitokError(f"mixture task {t!r} has no documents")
        self.tasks = tasks
        p = np.array([weights[t] for t in tasks], dtype=np.float64)
        self.probs = p / p.sum()
        self.lengths = {t: np.minimum(np.asarray(lengths[t], dtype=np.int64), seq_len) for t in tasks}
        self.seq_len = seq_len
        self.seed = seed
        self.drawn: dict[str, int] = dict.fromkeys(tasks, 0)  # documents taken from each task so far
        self.pending: list[Doc] = []  # drawn last step, did not fit, go first next step
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    def _next_doc(self, task: str) -> Doc:
        n = len(self.lengths[task])
        epoch, k = divmod(self.drawn[task], n)
        if self._perm.get(task, (-1,))[0] != epoch:
            g = np.random.default_rng([self.seed, _STREAM, zlib.crc32(task.encode()), epoch])
            self._perm[task] = (epoch, g.permutation(n))
        self.drawn[task] += 1
        return task, int(self._perm[task][1][k])

    def plan(self, step: int, rows: int) -> list[list[Doc]]:
        """The documents of each of ``rows`` rows for optimizer step ``step`` (advances the sampler state)."""
        rng = np.random.default_rng([self.seed, _STREAM, step])
        plan: list[list[Doc]] = [[] for _ in range(rows)]
        free = np.full(rows, self.seq_len, dtype=np.int64)
        queue, self.pending = self.pending, []
        misses = 0
        choices = np.empty(0, dtype=np.int64)
        while misses < rows and free.max() > 0:
            if queue:
                doc = queue.pop(0)
            else:
                if len(choices) == 0:
                    choices = rng.choice(len(self.tasks), size=64, p=self.probs)
                task, choices = self.tasks[int(choices[0])], choices[1:]
                doc = self._next_doc(task)
            n = self.lengths[doc[0]][doc[1]]
            fits = np.flatnonzero(free >= n)
            if len(fits):
                plan[fits[0]].append(doc)
                free[fits[0]] -= n
            else:
                self.pending.append(doc)
                misses += 1
        self.pending.extend(queue)
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": dict(self.drawn), "pending": [[t, i] for t, i in self.pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for task, n in state["drawn"].items():
            if task in self.drawn:
                self.drawn[task] = int(n)
        self.pending = [(str(t), int(i)) for t, i in state["pending"] if t in self.drawn]


@dataclass
class Batch:
    """Packed rows, in the Hugging Face convention: ``labels`` align with ``input_ids`` (the model shifts)."""

    input_ids: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64, IGNORE where no loss
    position_ids: torch.Tensor  # [B, L] int64, restart at 0 for every document
    doc_ids: torch.Tensor  # [B, L] int64, 0, 1, ... per document in a row; padding is one more segment
    real_tokens: int  # non-padding positions
    targets: int  # positions with a label
    truncated: int  # tokens cut from documents longer than seq_len

    @property
    def padding_tokens(self) -> int:
        return self.input_ids.numel() - self.real_tokens


def pack_rows(
    rows: Sequence[Sequence[Doc]],
    sources: Mapping[str, Any],  # task -> TokenDataset (anything indexable to (ids, mask))
    seq_len: int,
    pad_id: int = 0,
) -> Batch:
    """Materialise planned rows into tensors.

    The label of a document's first token is ``IGNORE``: the position before it belongs to another document
    (or is the row start), and nothing may be learned across that boundary.
    """
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.full((b, seq_len), IGNORE, dtype=np.int64)
    position_ids = np.zeros((b, seq_len), dtype=np.int64)
    doc_ids = np.zeros((b, seq_len), dtype=np.int64)
    real = truncated = 0
    for r, row in enumerate(rows):
        pos = 0
        for d, (task, index) in enumerate(row):
            ids, mask = sources[task][index]
            if len(ids) > seq_len:
                truncated += len(ids) - seq_len
                ids, mask = ids[:seq_len], mask[:seq_len]
            n = len(ids)
            if pos + n > seq_len:
                raise OmnitokError(f"packing plan overflows row {r}: {pos} + {n} > seq_len {seq_len}")
            sl = slice(pos, pos + n)
            input_ids[r, sl] = ids
            labels[r, sl] = np.where(mask.astype(bool), ids, IGNORE)
            labels[r, pos] = IGNORE
            position_ids[r, sl] = np.arange(n)
            doc_ids[r, sl] = d
            pos += n
        real += pos
        # Padding is its own segment (attending only to itself), so no query row of the mask is empty.
        position_ids[r, pos:] = np.arange(seq_len - pos)
        doc_ids[r, pos:] = len(row)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        doc_ids=torch.from_numpy(doc_ids),
        real_tokens=real,
        targets=int((labels != IGNORE).sum()),
        truncated=truncated,
    )


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` boolean mask, True where query ``i`` may attend key ``j``: same document and ``j <= i``."""
    length = doc_ids.shape[-1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal).unsqueeze(1)
