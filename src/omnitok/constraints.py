"""The modality state machine that keeps generated ids well-formed.

A model that has learned the format still samples the odd impossible token; one stray text id inside an
image span makes the whole picture undecodable. So decoding is constrained per row by a small automaton:

- outside a span: text ids, the openers of the modalities this request may produce, end of turn, EOS;
- inside ``<image>``: exactly the tokenizer's grid of image codes, then ``</image>`` is forced;
- inside ``<speech>``: style tokens first (optional), then speech codes cycling through the codec's levels
  (level q at position q mod Q), ``</speech>`` only on a frame boundary, forced at ``max_speech_frames``;
- inside ``<video>``: ``<frame>`` + one image grid, repeated, then ``</video>``;
- a reply without text (``outputs`` of one media modality, e.g. a requested picture) holds one span: once it
  closes only end of turn and EOS are left, so a model that would open a second one cannot leave a cut-off span.

States are small integers and each has a precomputed boolean mask over the vocabulary, so applying the
constraint to a batch is one gather and one ``masked_fill``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from omnitok.errors import OmnitokError
from omnitok.vocab import END, EOS, FRAME, PAD, SPAN_TOKENS, Vocabulary

OUTSIDE, IMAGE_CODE, IMAGE_CLOSE, SPEECH_START, VIDEO_FRAME, VIDEO_CODE, DONE, ENDING = range(8)
SPEECH_CODE0 = 8  # SPEECH_CODE0 + q: the next speech token must be a level-q code


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
        self.table = self._build_table()

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
        return {"state": zeros.clone(), "count": zeros.clone(), "frames": zeros.clone()}

    def mask(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, V] boolean: which ids each row may produce next."""
        m = self.table.to(st["state"].device)[st["state"]].clone()
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
        s, count, frames = st["state"].clone(), st["count"].clone(), st["frames"].clone()
        t = tokens.to(s.device)
        ids = self.ids

        def at(state: int) -> torch.Tensor:
            return st["state"] == state

        # outside: openers enter spans, EOS ends the row
        o = at(OUTSIDE)
        s[(o | at(ENDING)) & (t == ids["eos"])] = DONE
        s[o & (t == ids["open_image"])] = IMAGE_CODE
        s[o & (t == ids["open_speech"])] = SPEECH_START
        s[o & (t == ids["open_video"])] = VIDEO_FRAME
        entered = o & ((t == ids["open_image"]) | (t == ids["open_speech"]) | (t == ids["open_video"]))
        count[entered] = 0
        frames[entered] = 0
        # image codes: count to the grid, then the closer
        ic = at(IMAGE_CODE)
        count[ic] += 1
        s[ic & (count >= self.image_tokens)] = IMAGE_CLOSE
        after_span = ENDING if self.one_span and not prompt else OUTSIDE
        s[at(IMAGE_CLOSE)] = after_span
        # speech: optional style tokens, then codes cycling through levels
        if self.levels:
            is_style = torch.zeros_like(t, dtype=torch.bool)
            if self.style_ids:
                is_style = torch.isin(t, torch.tensor(self.style_ids, device=t.device))
            in_speech = at(SPEECH_START) | ((st["state"] >= SPEECH_CODE0) & (st["state"] < SPEECH_CODE0 + self.levels))
            closing = in_speech & (t == ids["close_speech"])
            coding = in_speech & ~closing & ~(at(SPEECH_START) & is_style)
            count[coding] += 1
            s[coding] = SPEECH_CODE0 + (count[coding] % self.levels)
            s[closing] = after_span
        # video: <frame> opens a grid of image codes
        vf = at(VIDEO_FRAME)
        s[vf & (t == ids["frame"])] = VIDEO_CODE
        frames[vf & (t == ids["frame"])] += 1
        count[vf & (t == ids["frame"])] = 0
        s[vf & (t == ids["close_video"])] = after_span
        vc = at(VIDEO_CODE)
        count[vc] += 1
        s[vc & (count >= self.image_tokens)] = VIDEO_FRAME
        return {"state": s, "count": count, "frames": frames}

    def after_prompt(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """State after a (possibly span-opening) prompt, e.g. one ending in ``<image>`` or a style prefix."""
        st = self.initial(prompt_ids.shape[0], prompt_ids.device)
        for j in range(prompt_ids.shape[1]):
            st = self.advance(st, prompt_ids[:, j], prompt=True)
        return st
