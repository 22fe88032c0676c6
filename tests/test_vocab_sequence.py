from dataclasses import replace

import numpy as np
import pytest

from omnitok.errors import OmnitokError
from omnitok.sequence import Audio, Image, LossPolicy, Text, Video, decode, encode, prompt, read_aloud_chunks
from omnitok.tokenizers.text import TextTokenizer
from omnitok.vocab import BASE_SPECIALS, CodeRange, Vocabulary, parse_style_token, style_token

STYLES = {"voice": ["us_m1", "gb_f2"], "pitch": ["low", "mid", "high"], "rate": ["slow", "normal", "fast"]}


@pytest.fixture(scope="module")
def text_tok() -> TextTokenizer:
    corpus = ["a large red circle in the top left", "there is a small blue star at the center"] * 50
    return TextTokenizer.train(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def vocab(text_tok) -> Vocabulary:
    return Vocabulary.build(text_tok.vocab_size, {"image": 64, "speech": [16, 16]}, STYLES)


def test_layout_text_then_specials_then_codebooks(vocab, text_tok):
    assert vocab.text_size == text_tok.vocab_size
    assert vocab.special(BASE_SPECIALS[0]) == vocab.text_size
    img = vocab.code_range("image")
    s0, s1 = vocab.code_range("speech", 0), vocab.code_range("speech", 1)
    assert img.start == vocab.text_size + len(vocab.specials)
    assert s0.start == img.stop and s1.start == s0.stop and vocab.size == s1.stop
    assert vocab.kind(0) == "text" and vocab.kind(img.start) == "image" and vocab.kind(s1.start) == "speech"
    assert vocab.kind(vocab.special(style_token("pitch", "high"))) == "special"


def test_style_tokens_parse_back(vocab):
    assert parse_style_token(style_token("voice", "us_f1")) == ("voice", "us_f1")
    assert parse_style_token("<|assistant|>") is None and parse_style_token("<speech>") is None
    styles = vocab.styles()
    assert {field: sorted(values) for field, values in styles.items()} == {
        field: sorted(values) for field, values in STYLES.items()
    }
    for field, values in styles.items():  # in id order
        assert [vocab.special(style_token(field, v)) for v in values] == sorted(
            vocab.special(style_token(field, v)) for v in values
        )


def test_codes_round_trip_per_level(vocab):
    codes = np.array([[1, 15], [0, 3], [7, 7]])
    ids = vocab.codes_to_ids("speech", codes)
    assert ids.tolist() == [
        vocab.code_range("speech", 0).start + 1,
        vocab.code_range("speech", 1).start + 15,
        vocab.code_range("speech", 0).start,
        vocab.code_range("speech", 1).start + 3,
        vocab.code_range("speech", 0).start + 7,
        vocab.code_range("speech", 1).start + 7,
    ]
    assert np.array_equal(vocab.ids_to_codes("speech", ids), codes)
    img = np.arange(64)
    assert np.array_equal(vocab.ids_to_codes("image", vocab.codes_to_ids("image", img)), img)


def test_out_of_range_codes_and_ids_are_named(vocab):
    with pytest.raises(OmnitokError, match="image code 64 at position 0"):
        vocab.codes_to_ids("image", [64])
    with pytest.raises(OmnitokError, match="no 'video' codebook"):
        vocab.codes_to_ids("video", [1])
    with pytest.raises(OmnitokError, match="not a speech level-1 code"):
        vocab.ids_to_codes("speech", [vocab.code_range("speech", 0).start] * 2)
    with pytest.raises(OmnitokError, match="outside the vocabulary"):
        vocab.kind(vocab.size)


def test_save_load_and_validation(vocab, tmp_path):
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path) == vocab
    d = vocab.to_json()
    d["codebooks"][1]["start"] -= 3
    with pytest.raises(OmnitokError, match="overlaps the previous range"):
        Vocabulary.from_json(d)
    d = vocab.to_json()
    d["codebooks"][0]["start"] += 1
    with pytest.raises(OmnitokError, match="gap"):
        Vocabulary.from_json(d)
    d = vocab.to_json()
    d["specials"].append(d["specials"][0])
    with pytest.raises(OmnitokError, match="duplicate special"):
        Vocabulary.from_json(d)
    d = vocab.to_json()
    d["format"] = "something"
    with pytest.raises(OmnitokError, match="format"):
        Vocabulary.from_json(d)
    with pytest.raises(OmnitokError, match="overlaps"):
        Vocabulary(10, list(BASE_SPECIALS), [CodeRange("image", 0, 10, 5)])


def test_text_tokenizer_round_trip_and_save(text_tok, tmp_path):
    s = "a tiny purple diamond on the right side! ünïcödé"
    assert text_tok.decode(text_tok.encode(s)) == s
    text_tok.save(tmp_path)
    assert TextTokenizer.load(tmp_path).encode(s) == text_tok.encode(s)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(OmnitokError, match=r"not a valid tokenizer\.json"):
        TextTokenizer.load(tmp_path / "bad")
    with pytest.raises(OmnitokError, match="not found"):
        TextTokenizer.load(tmp_path / "nowhere")


def _chat(rng):
    return [
        Text("describe this", role="user"),
        Image(codes=rng.integers(0, 64, 16), role="user"),
        Text("a red circle", role="assistant"),
        Audio(
            codes=rng.integers(0, 16, (5, 2)),
            role="assistant",
            style={"voice": "gb_f2", "pitch": "high", "rate": "slow"},
        ),
    ]


def test_sft_mask_trains_only_the_assistant(vocab, text_tok, rng):
    enc = encode(_chat(rng), vocab, text_tok)
    ids, mask = enc.ids, enc.mask
    start = int(np.flatnonzero(ids == vocab.special("<|assistant|>"))[0])
    assert mask[: start + 1].sum() == 0, "prompt and the role marker are not targets"
    assert mask[start + 1 :].all(), "assistant content, closers, end of turn and eos are targets"
    assert ids[0] == vocab.special("<|bos|>") and ids[-1] == vocab.special("<|eos|>")


def test_pretraining_and_per_modality_masks(vocab, text_tok, rng):
    doc = [Text("step one"), Image(codes=rng.integers(0, 64, 16)), Text("step two")]
    enc = encode(doc, vocab, text_tok, LossPolicy.pretraining())
    assert enc.mask[1:].all() and enc.mask[0] == 0
    no_img = encode(doc, vocab, text_tok, LossPolicy.pretraining(["text"]))
    img_ids = (enc.ids >= vocab.code_range("image").start) & (enc.ids < vocab.code_range("image").stop)
    assert no_img.mask[img_ids].sum() == 0 and no_img.mask[~img_ids][1:].sum() > 0


def test_decode_inverts_encode(vocab, text_tok, rng):
    sample = [*_chat(rng), Video(frames=[rng.integers(0, 64, 16) for _ in range(3)], role="assistant")]
    segs = decode(encode(sample, vocab, text_tok).ids, vocab, text_tok)
    assert [type(s).__name__ for s in segs] == ["Text", "Image", "Text", "Audio", "Video"]
    assert [s.role for s in segs] == ["user", "user", "assistant", "assistant", "assistant"]
    assert segs[2].text == "a red circle"
    assert np.array_equal(segs[1].codes, sample[1].codes)
    assert np.array_equal(segs[3].codes, sample[3].codes) and segs[3].style == sample[3].style
    assert all(np.array_equal(a, b) for a, b in zip(segs[4].frames, sample[4].frames, strict=True))


def test_decode_is_lenient_with_broken_generations(vocab, text_tok):
    img0 = vocab.code_range("image").start
    sp0 = vocab.code_range("speech", 0).start
    ids = [vocab.special("<|assistant|>"), vocab.special("<image>"), img0, img0 + 1, sp0, *text_tok.encode("hi")]
    segs = decode(ids, vocab, text_tok)
    assert isinstance(segs[0], Image) and segs[0].codes.tolist() == [0, 1]
    assert isinstance(segs[1], Text) and segs[1].text == "hi"
    truncated = decode([vocab.special("<speech>"), sp0, sp0 + 16 + 1, sp0 + 2], vocab, text_tok)
    assert truncated[0].codes.tolist() == [[0, 1]]


def test_prompt_ends_with_the_role_to_answer(vocab, text_tok):
    ids = prompt([Text("hello", role="user")], vocab, text_tok)
    assert ids[-1] == vocab.special("<|assistant|>") and vocab.special("<|eos|>") not in ids


def test_bad_samples_are_named(vocab, text_tok):
    with pytest.raises(OmnitokError, match="empty sample"):
        encode([], vocab, text_tok)
    with pytest.raises(OmnitokError, match="no codes"):
        encode([Image(pixels=np.zeros((64, 64, 3), np.uint8))], vocab, text_tok)
    with pytest.raises(OmnitokError, match="role"):
        encode([Text("x", role="narrator")], vocab, text_tok)
    with pytest.raises(OmnitokError, match="special token"):
        encode([Audio(codes=np.zeros((2, 2), int), style={"voice": "nobody"})], vocab, text_tok)


class _CountingTokenizer:
    """Codes from the input's content, and a count of the items each call was asked to encode."""

    def __init__(self) -> None:
        self.items = 0

    def encode(self, pixels):
        self.items += len(pixels)
        return np.asarray(pixels).reshape(len(pixels), -1)[:, :4].astype(np.int64) % 7

    def encode_batch(self, clips, rate):
        self.items += len(clips)
        return [np.asarray(c[:3] * 100).astype(np.int64) % 5 for c in clips]


def test_media_encoder_encodes_a_shared_array_once():
    from omnitok.sequence import MediaEncoder

    rng = np.random.default_rng(0)
    picture, other = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    clip = rng.standard_normal(800).astype(np.float32)
    samples = [  # one world sample's picture and clip in several tasks, as pretokenization builds them
        [Text("caption it", role="user"), Image(pixels=picture, role="user")],
        [Image(pixels=picture, role="assistant")],
        [Image(pixels=picture.copy()), Image(pixels=other)],  # equal content, another array: encoded on its own
        [Audio(samples=clip, sample_rate=16000)],
        [Audio(samples=clip, sample_rate=16000, style={"voice": "v"})],
    ]
    images, speech = _CountingTokenizer(), _CountingTokenizer()
    MediaEncoder(images, speech)(samples)
    assert (images.items, speech.items) == (3, 1)
    first = samples[0][1].codes
    assert np.array_equal(samples[1][0].codes, first) and np.array_equal(samples[2][0].codes, first)
    assert not np.array_equal(samples[2][1].codes, first)
    assert np.array_equal(samples[4][0].codes, samples[3][0].codes) and samples[3][0].codes is not None


def test_read_aloud_layout_places_each_chunk_ahead_of_its_speech(vocab, text_tok, rng):
    words = "a large red circle in the top left"  # 8 words: chunks of 2 -> 4 spans
    clip = Audio(codes=rng.integers(0, 16, (23, 2)), role="assistant", style={"voice": "gb_f2"}, words=words)
    sample = [Text("Say this: " + words, role="user"), clip]
    enc = encode(sample, vocab, text_tok, read_aloud_words=2)
    start = int(np.flatnonzero(enc.ids == vocab.special("<|assistant|>"))[0]) + 1
    reply, mask = enc.ids[start:].tolist(), enc.mask[start:].tolist()
    chunks = read_aloud_chunks(words, 2)
    assert chunks == ["a large", " red circle", " in the", " top left"]
    opener, closer = vocab.special("<speech>"), vocab.special("</speech>")
    # the words: chunks 0 and 1 before the first span, then each next chunk before the following span
    want_words = [text_tok.encode(c) for c in chunks]
    expect_head = [*want_words[0], *want_words[1], opener, vocab.special(style_token("voice", "gb_f2"))]
    assert reply[: len(expect_head)] == expect_head
    spans, i = [], 0
    while opener in reply[i:]:
        lo = reply.index(opener, i)
        hi = reply.index(closer, lo)
        spans.append((lo, hi))
        i = hi + 1
    assert len(spans) == 4
    between = [reply[spans[k][1] + 1 : spans[k + 1][0]] for k in range(3)]
    assert between == [want_words[2], want_words[3], []]
    assert reply[spans[-1][1] + 1 :] == [vocab.special("<|end|>"), vocab.special("<|eos|>")]
    # the words are no target; every span token, end of turn and eos are
    for k, t in enumerate(reply):
        assert mask[k] == (0 if vocab.kind(t) == "text" else 1), (k, t)
    # the spans' codes, joined, are the clip's, cut on frame boundaries (2 levels) with every chunk speaking
    codes = [t for t in reply if vocab.kind(t) == "speech"]
    assert codes == vocab.codes_to_ids("speech", clip.codes).tolist()
    frames = [sum(vocab.kind(t) == "speech" for t in reply[lo:hi]) / 2 for lo, hi in spans]
    assert all(f >= 1 and f == int(f) for f in frames) and sum(frames) == 23
    # shared in proportion to the chunks' characters: the longest chunk (" red circle") gets the most
    assert frames[1] == max(frames)
    # the same sample with the layout off, or a clip too short for its chunks, is one span after the text
    plain = encode(sample, vocab, text_tok)
    assert plain.ids.tolist().count(opener) == 1
    short = replace(clip, codes=rng.integers(0, 16, (3, 2)))
    assert encode([sample[0], short], vocab, text_tok, read_aloud_words=2).ids.tolist().count(opener) == 1
    with pytest.raises(OmnitokError, match="read_aloud_words must be an int >= 1"):
        read_aloud_chunks(words, 0)


def test_read_aloud_layout_cuts_at_the_words_onsets(vocab, text_tok, rng):
    words = "a large red circle in the top left"  # chunks start at words 0, 2, 4, 6
    codes = rng.integers(0, 16, (20, 2))

    def frames_per_span(onsets):
        clip = Audio(codes=codes, role="assistant", words=words, word_onsets=onsets)
        reply = encode([Text("Say this: " + words, role="user"), clip], vocab, text_tok, read_aloud_words=2).ids
        opens = np.flatnonzero(reply == vocab.special("<speech>"))
        closes = np.flatnonzero(reply == vocab.special("</speech>"))
        is_code = np.array([vocab.kind(t) == "speech" for t in reply.tolist()])
        per_span = [int(is_code[lo:hi].sum()) // 2 for lo, hi in zip(opens, closes, strict=True)]
        assert sum(per_span) == 20  # every frame once
        return per_span

    # chunk k ends where chunk k+1's first word starts: 0.3 -> frame 6, 0.55 -> 11, 0.9 -> 18
    assert frames_per_span((0.0, 0.1, 0.3, 0.4, 0.55, 0.6, 0.9, 0.95)) == [6, 5, 7, 2]
    # a word eSpeak ran into the next (equal onsets) still leaves every chunk a frame
    assert frames_per_span((0.0, 0.1, 0.5, 0.5, 0.5, 0.6, 1.0, 1.0)) == [10, 1, 8, 1]
    for bad, why in (((0.0, 0.5), "expected 8"), ((0.0,) * 7 + (1.5,), r"in \[0, 1\]"), ((0.5,) + (0.1,) * 7, "non-")):
        with pytest.raises(OmnitokError, match="word_onsets") as err:
            frames_per_span(bad)
        assert err.match(why)
