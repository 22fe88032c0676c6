"""Where each word of a clip starts, from the speech tokenizer's own phone CTC head (forced alignment).

The read-aloud layout (``omnitok.sequence``) cuts a TTS clip where each chunk's first word starts. The toy world
asks eSpeak, which knows where it put every word; a corpus of recorded speech has no synthesiser to ask, and cut by
characters the layout puts almost half its boundaries more than a third of a word off (docs/BENCHMARKS.md "Cutting
a clip at its words"). The speech tokenizer already carries what an aligner needs: a CTC head trained to read
eSpeak's phonemes off the codes, and every clip's record carries those phonemes (the tokenizer trains on them).
So the clip's codes, its phonemes and its words give the onsets, with nothing more to train or download: a Viterbi
path of the phone sequence through the head's frame posteriors, then each word of the text placed on the phones.

Two things make it more than a textbook CTC alignment:

* eSpeak's words are not the text's. It speaks some short words with their neighbour as one word ("in the" ->
  ``ɪ_n_ð_ə``), so the phonemes hold fewer words than the text. Text words are matched to phoneme words by a
  monotone alignment that keeps each group's phones-per-character near the clip's own ratio, and inside a merged
  word a text word starts at the phone its characters point to.
* A CTC head fires once per phone, late or early by a frame or two, and leaves the frames between words blank. A
  word's onset is placed where its first phone's run starts, moved back over the blank frames before it by
  ``gap_share`` of their length: the silence between two words belongs partly to each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from omnitok.errors import OmnitokError

# Share of the blank frames between a word and the one before it that is given to the word: 0.5 cuts mid-silence,
# which against eSpeak's own onsets cut +1 ms late on average where 0 cut 21 ms late and 1 cut 17 ms early
# (docs/BENCHMARKS.md "Word onsets for clips without a synthesiser").
GAP_SHARE = 0.5
# How far a group's phones-per-character may stray from the clip's before a merge (or split) is preferred, in the
# alignment of text words to eSpeak's words: the cost of any group that is not one word to one word.
_MERGE_COST = 0.35
_MAX_GROUP = 3
# (text words, phoneme words) a group may hold: one to one, or one side a single word and the other up to three
_GROUPS = [(1, 1)] + [(k, 1) for k in range(2, _MAX_GROUP + 1)] + [(1, k) for k in range(2, _MAX_GROUP + 1)]


def ctc_viterbi(log_probs: np.ndarray, targets: Sequence[int], blank: int = 0) -> np.ndarray | None:
    """The best CTC path of ``targets`` through frame log-posteriors ``log_probs`` [T, C].

    Returns, per frame, the index of the target it emits, or -1 for a blank frame; None when the clip has too few
    frames to say the targets (each needs a frame, and a repeated one a blank between)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise OmnitokError(f"log_probs: expected [frames, classes], got shape {list(lp.shape)}")
    tgt = np.asarray(targets, dtype=np.int64)
    n_t, n_l = lp.shape[0], len(tgt)
    if n_l == 0 or n_t < n_l + int(np.sum(tgt[1:] == tgt[:-1])):
        return None
    n_s = 2 * n_l + 1
    ext = np.full(n_s, blank, dtype=np.int64)
    ext[1::2] = tgt
    # a state may be entered from two back only past a blank and between different labels
    skip = np.zeros(n_s, dtype=bool)
    skip[3::2] = tgt[1:] != tgt[:-1]
    score = np.full(n_s, -np.inf)
    score[:2] = lp[0, ext[:2]]
    back = np.zeros((n_t, n_s), dtype=np.int8)  # 0: stayed, 1: from one back, 2: from two back
    for t in range(1, n_t):
        one = np.concatenate(([-np.inf], score[:-1]))
        two = np.where(skip, np.concatenate(([-np.inf, -np.inf], score[:-2])), -np.inf)
        cand = np.stack([score, one, two])
        back[t] = np.argmax(cand, axis=0)
        score = cand[back[t], np.arange(n_s)] + lp[t, ext]
    s = n_s - 1 if score[n_s - 1] >= score[n_s - 2] else n_s - 2
    if not np.isfinite(score[s]):
        return None
    path = np.empty(n_t, dtype=np.int64)
    for t in range(n_t - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    return np.where(path % 2 == 1, (path - 1) // 2, -1)


def match_words(text_chars: Sequence[int], phone_counts: Sequence[int]) -> list[tuple[int, int, int, int]] | None:
    """Text words (their character counts) onto eSpeak's words (their phone counts), in order.

    Returns groups ``(first text word, text words, first phoneme word, phoneme words)`` covering both; a group is
    one to one, one phoneme word saying several text words (eSpeak's "in the"), or several phoneme words one text
    word. The groups are chosen so each keeps phones-per-character near the clip's; None when the two cannot be
    matched (a side is empty)."""
    n, m = len(text_chars), len(phone_counts)
    if n == 0 or m == 0:
        return None
    ratio = np.log((sum(phone_counts) + 1) / (sum(text_chars) + 1))
    tc = np.concatenate(([0], np.cumsum(text_chars)))
    pc = np.concatenate(([0], np.cumsum(phone_counts)))
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    back: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(n + 1):
        for j in range(m + 1):
            if not np.isfinite(cost[i, j]):
                continue
            for a, b in _GROUPS:
                if i + a > n or j + b > m:
                    continue
                chars, phones = tc[i + a] - tc[i], pc[j + b] - pc[j]
                c = cost[i, j] + (np.log((phones + 1) / (chars + 1)) - ratio) ** 2 + (_MERGE_COST if a + b > 2 else 0.0)
                if c < cost[i + a, j + b]:
                    cost[i + a, j + b] = c
                    back[(i + a, j + b)] = (a, b)
    if not np.isfinite(cost[n, m]):
        return None
    groups, i, j = [], n, m
    while i or j:
        a, b = back[(i, j)]
        i, j = i - a, j - b
        groups.append((i, a, j, b))
    return groups[::-1]


def word_onsets_from_path(
    frames: np.ndarray, words: str, phone_words: Sequence[int], gap_share: float = GAP_SHARE
) -> tuple[float, ...] | None:
    """Onsets of ``words``' white-space words as fractions of the clip, from a CTC path (``ctc_viterbi``) over the
    phones of eSpeak's words (``phone_words``: how many phones each says). None when the words cannot be placed."""
    text_words = words.split()
    chars = [len(re.sub(r"\W", "", w)) or 1 for w in text_words]  # "circle." says no more than "circle"
    groups = match_words(chars, phone_words)
    if groups is None:
        return None
    n_t = len(frames)
    emitting = np.flatnonzero(frames >= 0)
    first = np.full(sum(phone_words), n_t, dtype=np.int64)  # the frame each phone's run starts
    last = np.full(sum(phone_words), -1, dtype=np.int64)
    np.minimum.at(first, frames[emitting], emitting)
    np.maximum.at(last, frames[emitting], emitting)
    starts = np.concatenate(([0], np.cumsum(phone_words)))  # each phoneme word's first phone

    def onset_of_phone(p: int) -> float:
        prev_end = last[p - 1] + 1 if p > 0 else 0  # the blank frames [prev_end, first[p]) lie before the phone
        return first[p] - gap_share * max(0, first[p] - prev_end)

    onsets: list[float] = []
    for ti, a, pj, b in groups:
        lo, hi = starts[pj], starts[pj + b]
        onsets.append(onset_of_phone(lo))
        if a > 1:  # one eSpeak word says several text words: each starts at the phone its characters point to
            upto = np.cumsum(chars[ti : ti + a])
            for k in range(1, a):
                p = lo + round((hi - lo) * upto[k - 1] / upto[-1])
                onsets.append(onset_of_phone(min(max(p, lo + k), hi - 1)) if hi - lo > k else onsets[-1])
    out = np.maximum.accumulate(np.clip(np.asarray(onsets) / n_t, 0.0, 1.0))
    return tuple(float(o) for o in out)


def phone_words(phonemes: str, phones: Sequence[str], keep_stress: bool) -> list[list[int]]:
    """eSpeak's IPA words as CTC indices of the tokenizer's inventory (index 0 is the blank); phones outside it are
    left out, as the tokenizer's training left them out."""
    from omnitok.tokenizers.speech import phone_units

    index = {p: i + 1 for i, p in enumerate(phones)}
    return [[index[u] for u in phone_units(word, keep_stress) if u in index] for word in phonemes.split()]


def align_words(tokenizer: Any, codes: np.ndarray, words: str, phonemes: str) -> tuple[float, ...] | None:
    """Where each white-space word of ``words`` starts in a clip, as fractions of it, from its ``codes`` and eSpeak
    ``phonemes`` of the same words, through ``tokenizer``'s phone CTC head; None where they cannot be aligned (a
    tokenizer without the head, no phones it knows, a clip too short for its phones), and the caller cuts by
    characters as before."""
    import torch

    if not words.split() or not hasattr(tokenizer, "ctc_logits"):
        return None
    per_word = phone_words(phonemes, tokenizer.config.phones, tokenizer.config.keep_stress)
    per_word = [w for w in per_word if w]
    if not per_word:
        return None
    c = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    if c.ndim != 1 or c.numel() == 0:
        raise OmnitokError(f"codes: expected one clip's codes [frames], got shape {list(c.shape)}")
    with torch.no_grad():
        zq = tokenizer.codes_to_latents(c[None])
        logits = tokenizer.ctc_logits(zq, torch.ones(1, c.numel(), 1))[0]
        log_probs = logits.float().log_softmax(-1).numpy()
    frames = ctc_viterbi(log_probs, [p for w in per_word for p in w])
    if frames is None:
        return None
    return word_onsets_from_path(frames, words, [len(w) for w in per_word])
