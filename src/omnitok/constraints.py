"""The modality state machine that keeps generated ids well-formed.

A model that has learned the format still samples the odd impossible token; one stray text id inside an
image span makes the whole picture undecodable. So decoding is constrained per row by a small automaton:

- outside a span: text ids, the openers of the modalities this request may produce, end of turn, EOS;
- inside ``<image>``: exactly the tokenizer's grid of image codes, then ``</image>`` is forced;
- inside ``<speech>``: style tokens first (optional), then speech codes cycling through the codec's levels
  (level q at position q mod Q), ``</speech>`` only on a frame boundary, forced at ``max_speech_frames``;
- inside ``<video>``: ``<frame>`` + one image grid, repeated, then ``</video>``;
- a reply without text (``outputs`` of one media modality, e.g. a requested picture) holds one span: once it
  closes only end of turn and EOS are left, so a model that would open a second one cannot leave a cut-off span;
- a row with a *script* (:meth:`ModalityConstraint.scripted`) is given its reply's ids one by one where the script
  names them, and left to the model at each ``SPEAK``: a text read aloud in the read-aloud layout
  (``omnitok.sequence``) places the request's words and lets the LM speak each chunk until it closes the span.

States are small integers and each has a precomputed boolean mask over the vocabulary, so applying the
constraint to a batch is one gather and one ``masked_fill``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch

from omnitok.errors import OmnitokError
from omnitok.vocab import END, EOS, FRAME, PAD, SPAN_TOKENS, Vocabulary

OUTSIDE, IMAGE_CODE, IMAGE_CLOSE, SPEECH_START, VIDEO_FRAME, VIDEO_CODE, DONE, ENDING = range(8)
SPEECH_CODE0 = 8  # SPEECH_CODE0 + q: the next speech token must be a level-q code
SPEAK = -1  # in a script: the model speaks here, up to and including the </speech> it samples


class ModalityConstraint:
    """Per-row automaton; ``mask(states)`` gives allowed ids, ``advance`` consumes the sampled ids."""

    def __init__(
        self,
        vocab: Vocabulary,
        image_tokens: int | None = None,
        outputs: Iterable[str] = ("text", "image", "speech", "video"),
        max_speech_frames: int = 1500,
        max_video_frames: int = 8,
    ) -> None:
        self.vocab = vocab
        self.outputs = set(outputs)
        unknown = self.outputs - {"text", "image", "speech", "video"}
        if unknown:
            raise OmnitokError(f"unknown output modalities {sorted(unknown)}")
        for m in ("image", "speech"):
            if m in self.outputs and m not in vocab.modalities:
                self.outputs.discard(m)
        if "video" in self.outputs and "image" not in vocab.modalities:
            self.outputs.discard("video")
        if {"image", "video"} & self.outputs and not image_tokens:
            raise OmnitokError("image_tokens (the image tokenizer's tokens per image) is needed to generate images")
        self.image_tokens = int(image_tokens or 0)
        self.one_span = "text" not in self.outputs
        self.levels = vocab.levels("speech") if "speech" in vocab.modalities else 1
        self.max_speech_frames = max_speech_frames
        self.max_video_frames = max_video_frames
        self.ids = {
            name: vocab.special(tok)
            for name, tok in {
                "end": END,
                "eos": EOS,
                "pad": PAD,
                "frame": FRAME,
                **{f"open_{m}": o for m, (o, _) in SPAN_TOKENS.items()},
                **{f"close_{m}": c for m, (_, c) in SPAN_TOKENS.items()},
            }.items()
        }
        self.style_ids = [i for n, i in vocab.specials.items() if n.startswith("<|") and ":" in n]
        self._styles = set(self.style_ids)
        self._openers = {self.ids[f"open_{m}"]: state for m, state in
                         (("image", IMAGE_CODE), ("speech", SPEECH_START), ("video", VIDEO_FRAME))}  # fmt: skip
        self.table = self._build_table()
        self.scripts: list[list[int] | None] | None = None

    def scripted(self, scripts: Sequence[Sequence[int] | None]) -> ModalityConstraint:
        """This automaton for a batch whose row i follows ``scripts[i]`` (None: free), sharing the tables.

        A script lists the reply's ids after the prompt: an id is forced (the only one allowed), ``SPEAK`` leaves a
        speech span the prompt or the script opened to the model until it samples ``</speech>``. Past its end a row
        is free again (scripts end with end of turn and EOS to end the row). Forced ids go through the automaton
        like sampled ones, so a script must be well-formed (its spans opened before they are spoken).
        """
        for i, sc in enumerate(scripts):
            bad = sc is not None and any(t != SPEAK and not 0 <= t < self.vocab.size for t in sc)
            if bad or (sc is not None and SPEAK in sc and "speech" not in self.outputs):
                raise OmnitokError(f"script of row {i}: ids must be SPEAK or in [0, {self.vocab.size}), and SPEAK "
                                   "needs speech among the outputs")  # fmt: skip
        out = copy.copy(self)
        out.scripts = [None if sc is None else list(sc) for sc in scripts]
        return out

    def _build_table(self) -> torch.Tensor:
        v = self.vocab
        n_states = SPEECH_CODE0 + self.levels
        table = torch.zeros(n_states, v.size, dtype=torch.bool)
        outside = table[OUTSIDE]
        if "text" in self.outputs:
            outside[: v.text_size] = True
        for m in ("image", "speech", "video"):
            if m in self.outputs:
                outside[self.ids[f"open_{m}"]] = True
        outside[self.ids["end"]] = outside[self.ids["eos"]] = True
        table[ENDING, self.ids["end"]] = table[ENDING, self.ids["eos"]] = True
        if "image" in v.modalities:
            img = torch.from_numpy(v.allowed_ids("image"))
            table[IMAGE_CODE, img] = True
            table[VIDEO_CODE, img] = True
        table[IMAGE_CLOSE, self.ids["close_image"]] = True
        table[VIDEO_FRAME, self.ids["frame"]] = True
        table[VIDEO_FRAME, self.ids["close_video"]] = True
        table[DONE, self.ids["pad"]] = True
        if "speech" in v.modalities:
            table[SPEECH_START, self.style_ids] = True
            for q in range(self.levels):
                codes = torch.from_numpy(v.allowed_ids("speech", q))
                table[SPEECH_CODE0 + q, codes] = True
                if q == 0:
                    table[SPEECH_START, codes] = True
            table[SPEECH_CODE0, self.ids["close_speech"]] = True  # only on a frame boundary
        return table

    def initial(self, batch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        st = {"state": zeros.clone(), "count": zeros.clone(), "frames": zeros.clone()}
        if self.scripts is not None:
            if len(self.scripts) != batch:
                raise OmnitokError(f"the automaton has {len(self.scripts)} scripts for a batch of {batch} rows")
            st["script"] = zeros.clone()  # each row's position in its script
        return st

    def mask(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, V] boolean: which ids each row may produce next."""
        m = self.table.to(st["state"].device)[st["state"]].clone()
        if "script" in st:
            for i, t in enumerate(self._scripted_next(st)):
                if t is not None:
                    m[i] = False
                    m[i, t] = True
        # after a full video, only </video> is left
        full_video = (st["state"] == VIDEO_FRAME) & (st["frames"] >= self.max_video_frames)
        if full_video.any():
            m[full_video, self.ids["frame"]] = False
        # a started video needs at least one frame before it may close
        no_frame = (st["state"] == VIDEO_FRAME) & (st["frames"] == 0)
        if no_frame.any():
            m[no_frame, self.ids["close_video"]] = False
        # speech that reached its length limit must close at the next frame boundary
        long_speech = (st["state"] == SPEECH_CODE0) & (st["count"] >= self.max_speech_frames * self.levels)
        if long_speech.any():
            m[long_speech] = False
            m[long_speech, self.ids["close_speech"]] = True
        return m

    def apply(self, logits: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits.masked_fill(~self.mask(st), float("-inf"))

    def force(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rows whose next token is determined (one allowed id): -1 where free, else that id."""
        m = self.mask(st)
        single = m.sum(-1) == 1
        return torch.where(single, m.float().argmax(-1), torch.full_like(st["state"], -1))

    def advance(
        self, st: dict[str, torch.Tensor], tokens: torch.Tensor, prompt: bool = False
    ) -> dict[str, torch.Tensor]:
        """Consume one sampled id per row; returns the new state (inputs are not modified).

        ``prompt``: the ids are the request's own (its pictures and speech), so a span that closes there does not
        count as the reply's one span.
        """
        rows = torch.stack([st["state"], st["count"], st["frames"], tokens.to(st["state"].device, torch.long)]).tolist()
        out = self._tensors([self._step(s, c, f, t, prompt) for s, c, f, t in zip(*rows, strict=True)], st["state"])
        if "script" in st:
            at = st["script"].tolist()
            close = self.ids["close_speech"]
            for i, (sc, t) in enumerate(zip(self.scripts or [], rows[3], strict=True)):
                if sc is not None and at[i] < len(sc) and (sc[at[i]] != SPEAK or t == close):
                    at[i] += 1  # a forced id consumed, or the span the model spoke closed
            out["script"] = torch.tensor(at, dtype=torch.long, device=st["state"].device)
        return out

    def _scripted_next(self, st: dict[str, torch.Tensor]) -> list[int | None]:
        """Per row: the id its script forces next, or None (no script, the model speaking, or the script done)."""
        at = st["script"].tolist()
        return [
            sc[at[i]] if sc is not None and at[i] < len(sc) and sc[at[i]] != SPEAK else None
            for i, sc in enumerate(self.scripts or [])
        ]

    def after_prompt(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """State after a (possibly span-opening) prompt, e.g. one ending in ``<image>`` or a style prefix."""
        ends = []
        for row in prompt_ids.tolist():
            s = c = f = 0  # OUTSIDE, as ``initial``
            for t in row:
                s, c, f = self._step(s, c, f, t, True)
            ends.append((s, c, f))
        st = self._tensors(ends, prompt_ids)
        if self.scripts is not None:
            st["script"] = torch.zeros_like(st["state"])
        return st

    def _step(self, s: int, count: int, frames: int, t: int, prompt: bool) -> tuple[int, int, int]:
        """One row's ``(state, count, frames)`` after id ``t``: the automaton's one transition function.

        Plain Python on ints, not tensor ops over the batch: a prompt is replayed id by id (a video caption's holds
        ~300 ids), and a dozen small tensor operations per id cost ~0.35 ms on a CPU, two thirds of the evaluation's
        video-captioning and ASR tasks (benchmarks/eval_cost.py; docs/BENCHMARKS.md).
        """
        ids = self.ids
        after_span = ENDING if self.one_span and not prompt else OUTSIDE
        if s in (OUTSIDE, ENDING):  # openers enter spans, EOS ends the row
            if t == ids["eos"]:
                return DONE, count, frames
            if s == OUTSIDE and t in self._openers:
                return self._openers[t], 0, 0
            return s, count, frames
        if s in (IMAGE_CODE, VIDEO_CODE):  # count codes to the grid; then the closer, or the next frame
            count += 1
            if count < self.image_tokens:
                return s, count, frames
            return (IMAGE_CLOSE if s == IMAGE_CODE else VIDEO_FRAME), count, frames
        if s == IMAGE_CLOSE:  # the closer itself, whichever id was sampled for it
            return after_span, count, frames
        if s == SPEECH_START or SPEECH_CODE0 <= s < SPEECH_CODE0 + self.levels:
            if t == ids["close_speech"]:
                return after_span, count, frames
            if s == SPEECH_START and t in self._styles:  # optional style tokens, then codes cycling the levels
                return s, count, frames
            count += 1
            return SPEECH_CODE0 + count % self.levels, count, frames
        if s == VIDEO_FRAME:  # <frame> opens a grid of image codes
            if t == ids["frame"]:
                return VIDEO_CODE, 0, frames + 1
            if t == ids["close_video"]:
                return after_span, count, frames
        return s, count, frames

    @staticmethod
    def _tensors(rows: list[tuple[int, int, int]], like: torch.Tensor) -> dict[str, torch.Tensor]:
        both = torch.tensor(rows, dtype=torch.long).reshape(len(rows), 3).T.to(like.device)
        return {"state": both[0].clone(), "count": both[1].clone(), "frames": both[2].clone()}
