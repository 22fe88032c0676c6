"""Random logits under the modality automaton always decode into well-formed segments."""

import numpy as np
import pytest
import torch

from omnitok.constraints import DONE, IMAGE_CODE, OUTSIDE, SPEAK, ModalityConstraint
from omnitok.errors import OmnitokError
from omnitok.sequence import Audio, Image, Video, decode
from omnitok.vocab import Vocabulary

STYLES = {"voice": ["a", "b"], "pitch": ["low", "high"], "rate": ["slow", "fast"]}


class ByteText:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(256, {"image": 32, "speech": [8, 8, 8]}, STYLES)


def _run(constraint: ModalityConstraint, vocab, steps: int, seed: int, bias: dict[int, float]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    batch = 16
    st = constraint.initial(batch)
    rows: list[list[int]] = [[] for _ in range(batch)]
    settled = [0] * batch  # length of each row's prefix that ends outside any span (spans still open are cut)
    for _ in range(steps):
        logits = torch.randn(batch, vocab.size, generator=g)
        for i, b in bias.items():
            logits[:, i] += b
        tok = torch.distributions.Categorical(logits=constraint.apply(logits, st)).sample()
        for r in range(batch):
            rows[r].append(int(tok[r]))
        st = constraint.advance(st, tok)
        for r in range(batch):
            if int(st["state"][r]) in (OUTSIDE, DONE):
                settled[r] = len(rows[r])
    return [row[:n] for row, n in zip(rows, settled, strict=True)]


def test_sampled_sequences_are_well_formed(vocab):
    c = ModalityConstraint(vocab, image_tokens=16, max_speech_frames=12, max_video_frames=3)
    # push the sampler towards opening spans so all automaton paths are exercised
    bias = {vocab.special(t): 6.0 for t in ("<image>", "<speech>", "<video>", "<frame>", "</speech>")}
    bias[vocab.special("<|eos|>")] = 1.0
    seen: set[str] = set()
    for seed in range(3):
        for ids in _run(c, vocab, 200, seed, bias):
            segs = decode(ids, vocab, ByteText())
            seen |= {type(s).__name__ for s in segs}
            for s in segs:
                if isinstance(s, Image):
                    assert len(s.codes) == 16
                if isinstance(s, Audio):
                    assert s.codes.ndim == 2 and s.codes.shape[1] == 3 and len(s.codes) <= 12
                if isinstance(s, Video):
                    assert 1 <= len(s.frames) <= 3 and all(len(f) == 16 for f in s.frames)
            eos = vocab.special("<|eos|>")
            if eos in ids:
                tail = ids[ids.index(eos) + 1 :]
                assert all(t == vocab.special("<|pad|>") for t in tail)
    assert {"Image", "Audio", "Video", "Text"} <= seen


def test_output_restrictions(vocab):
    text_only = ModalityConstraint(vocab, outputs=["text"])
    m = text_only.mask(text_only.initial(1))[0]
    assert m[:256].all() and not m[vocab.special("<image>")] and not m[vocab.special("<speech>")]
    img = ModalityConstraint(vocab, image_tokens=16, outputs=["image"])
    m = img.mask(img.initial(1))[0]
    assert not m[:256].any() and m[vocab.special("<image>")]
    with pytest.raises(OmnitokError, match="image_tokens"):
        ModalityConstraint(vocab, outputs=["image"])


def test_prompt_state_and_forced_tokens(vocab):
    c = ModalityConstraint(vocab, image_tokens=4)
    img0 = vocab.code_range("image").start
    prompt = torch.tensor(
        [
            [
                vocab.special("<|user|>"),
                vocab.special("<image>"),
                img0,
                img0,
                img0,
                img0,
                vocab.special("</image>"),
                vocab.special("<|end|>"),
                vocab.special("<|assistant|>"),
            ]
        ]
    )
    st = c.after_prompt(prompt)
    assert int(st["state"][0]) == OUTSIDE
    st = c.after_prompt(torch.tensor([[vocab.special("<image>"), img0, img0, img0, img0]]))
    assert int(c.force(st)[0]) == vocab.special("</image>")
    st = c.advance(c.initial(1), torch.tensor([vocab.special("<|eos|>")]))
    assert int(st["state"][0]) == DONE and int(c.force(st)[0]) == vocab.special("<|pad|>")


def test_speech_without_speech_codebook_is_not_offered():
    v = Vocabulary.build(256, {"image": 32})
    c = ModalityConstraint(v, image_tokens=4)
    assert not c.mask(c.initial(1))[0, v.special("<speech>")]
    assert np.isfinite(c.apply(torch.zeros(1, v.size), c.initial(1))[0, 0].item())


def test_a_reply_of_one_media_modality_holds_one_span(vocab):
    """After the requested picture or speech closes, only end of turn and EOS are left; the prompt's spans and
    replies that may hold text are not limited."""
    img0 = vocab.code_range("image").start
    picture = [vocab.special("<image>"), *[img0] * 4, vocab.special("</image>")]
    c = ModalityConstraint(vocab, image_tokens=4, outputs=["image"])
    # an edit request: the user's picture and text, then the forced opener of the reply's picture
    prompt = [vocab.special("<|user|>"), *picture, 65, 66, vocab.special("<|end|>"), vocab.special("<image>")]
    st = c.after_prompt(torch.tensor([prompt]))
    assert int(st["state"][0]) == IMAGE_CODE
    for _ in range(4):
        st = c.advance(st, torch.tensor([img0]))
    st = c.advance(st, torch.tensor([vocab.special("</image>")]))
    allowed = c.mask(st)[0].nonzero().flatten().tolist()
    assert allowed == sorted([vocab.special("<|end|>"), vocab.special("<|eos|>")])
    st = c.advance(c.advance(st, torch.tensor([vocab.special("<|end|>")])), torch.tensor([vocab.special("<|eos|>")]))
    assert int(st["state"][0]) == DONE
    speech = ModalityConstraint(vocab, outputs=["speech"])
    st = speech.after_prompt(torch.tensor([[vocab.special("<speech>")]]))
    for level in range(vocab.levels("speech")):
        st = speech.advance(st, torch.tensor([vocab.code_range("speech", level).start]))
    st = speech.advance(st, torch.tensor([vocab.special("</speech>")]))
    assert not speech.mask(st)[0, vocab.special("<speech>")] and speech.mask(st)[0, vocab.special("<|eos|>")]
    both = ModalityConstraint(vocab, image_tokens=4, outputs=["text", "image"])
    st = both.after_prompt(torch.tensor([picture]))
    assert int(st["state"][0]) == OUTSIDE and both.mask(st)[0, vocab.special("<image>")]


def test_a_prompt_replayed_at_once_is_the_prompt_advanced_id_by_id(vocab):
    """after_prompt (a batch of prompts replayed on plain ints) ends where advancing each id with prompt=True does,
    row by row, whatever the ids (random specials, codes and text, so spans open, fill, close and break off)."""
    c = ModalityConstraint(vocab, image_tokens=5, max_speech_frames=4, max_video_frames=2)
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor(sorted(vocab.specials.values()))
    for _ in range(20):
        ids = torch.randint(vocab.size, (4, 60), generator=g)
        spans = torch.rand(ids.shape, generator=g) < 0.3  # a third of the ids specials: spans open often
        ids[spans] = specials[torch.randint(len(specials), (int(spans.sum()),), generator=g)]
        at_once = c.after_prompt(ids)
        st = c.initial(4)
        for j in range(ids.shape[1]):
            st = c.advance(st, ids[:, j].int(), prompt=True)  # the ids' dtype does not matter
        rows = [c.after_prompt(ids[i : i + 1]) for i in range(4)]
        for k in ("state", "count", "frames"):
            assert torch.equal(at_once[k], st[k]) and at_once[k].dtype == torch.long
            assert torch.equal(at_once[k], torch.cat([r[k] for r in rows]))
    # an empty batch keeps its shape
    assert c.after_prompt(torch.zeros((0, 3), dtype=torch.long))["state"].shape == (0,)


def test_a_script_forces_its_ids_and_leaves_each_span_to_the_model(vocab):
    """The read-aloud layout's decoding: placed words, spans the model speaks and closes, then the end; a row
    without a script beside it decodes freely."""
    c = ModalityConstraint(vocab, outputs={"text", "speech"})
    opener, closer = vocab.special("<speech>"), vocab.special("</speech>")
    end, eos = vocab.special("<|end|>"), vocab.special("<|eos|>")
    words = [ord("h"), ord("i")]
    script = [SPEAK, *words, opener, SPEAK, end, eos]
    s = c.scripted([script, None])
    assert c.scripts is None  # the original automaton is unchanged
    prompt = torch.tensor([[vocab.special("<|assistant|>"), opener], [vocab.special("<|assistant|>"), opener]])
    st = s.after_prompt(prompt)
    assert st["script"].tolist() == [0, 0]
    g = torch.Generator().manual_seed(0)
    rows: list[list[int]] = [[], []]
    for _ in range(60):
        logits = torch.randn(2, vocab.size, generator=g)
        logits[:, closer] += 4.0  # the model closes its spans within a few frames
        logits[:, c.style_ids] -= 100.0  # and writes no style tokens of its own (the automaton would allow them)
        tok = torch.distributions.Categorical(logits=s.apply(logits, st)).sample()
        for r in range(2):
            rows[r].append(int(tok[r]))
        st = s.advance(st, tok)
        if int(st["state"][0]) == DONE:
            break
    first = rows[0]
    assert first.count(closer) == 2 and first[-2:] == [end, eos]
    k = first.index(closer)
    assert all(vocab.kind(t) == "speech" for t in first[:k]) and k % 3 == 0 and k > 0  # whole frames, at least one
    assert first[k + 1 : k + 4] == [*words, opener]
    second = first[k + 4 : first.index(closer, k + 1)]
    assert second and all(vocab.kind(t) == "speech" for t in second) and len(second) % 3 == 0
    assert int(st["script"][0]) == len(script)
    segs = decode([opener, *first], vocab, ByteText())
    assert [type(x).__name__ for x in segs] == ["Audio", "Text", "Audio"] and segs[1].text == "hi"
    with pytest.raises(OmnitokError, match="2 scripts for a batch of 3"):
        s.initial(3)
    with pytest.raises(OmnitokError, match="script of row 0"):
        c.scripted([[vocab.size]])
    with pytest.raises(OmnitokError, match="SPEAK needs speech"):
        ModalityConstraint(vocab, outputs={"text"}).scripted([[SPEAK]])
