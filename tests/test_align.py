"""Forced alignment of a clip's words through the speech tokenizer's phone CTC head (omnitok.tokenizers.align)."""

from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omnitok.errors import OmnitokError
from omnitok.sequence import Audio, MediaEncoder
from omnitok.tokenizers.align import align_words, ctc_viterbi, match_words, phone_words, word_onsets_from_path


def _peaky(frames: list[int], n_classes: int) -> np.ndarray:
    """Log-posteriors that say class ``frames[t]`` at frame t with confidence (0: blank)."""
    lp = np.full((len(frames), n_classes), np.log(0.01))
    lp[np.arange(len(frames)), frames] = np.log(0.9)
    return lp


def test_viterbi_follows_the_posteriors_and_needs_frames_enough():
    lp = _peaky([0, 1, 1, 0, 2, 0, 0, 1, 0], 3)
    assert ctc_viterbi(lp, [1, 2, 1]).tolist() == [-1, 0, 0, -1, 1, -1, -1, 2, -1]
    # a repeated label is two phones only with a blank between them
    assert ctc_viterbi(_peaky([1, 0, 1], 2), [1, 1]).tolist() == [0, -1, 1]
    assert ctc_viterbi(_peaky([1, 1], 2), [1, 1]) is None  # no room for the blank
    assert ctc_viterbi(_peaky([1], 3), [1, 2]) is None
    assert ctc_viterbi(_peaky([0, 0], 3), []) is None
    # against the posteriors where it must: every target said once, in order
    path = ctc_viterbi(_peaky([0, 0, 0, 0, 0], 3), [2, 1])
    assert [int(p) for p in path if p >= 0] == sorted(int(p) for p in path if p >= 0) and {0, 1} <= set(path.tolist())
    with pytest.raises(OmnitokError, match="expected \\[frames, classes\\]"):
        ctc_viterbi(np.zeros(4), [1])


def test_text_words_meet_espeaks_merged_words():
    text = "A small red circle in the center"
    phonemes = "ɐ s_m_ˈɔː_l ɹ_ˈɛ_d s_ˈɜː_k_əl ɪ_n_ð_ə s_ˈɛ_n_t_ɚ"  # eSpeak says "in the" as one word
    groups = match_words([len(w) for w in text.split()], [len(w.split("_")) for w in phonemes.split()])
    assert groups == [(0, 1, 0, 1), (1, 1, 1, 1), (2, 1, 2, 1), (3, 1, 3, 1), (4, 2, 4, 1), (6, 1, 5, 1)]
    assert match_words([3, 4], [2, 2]) == [(0, 1, 0, 1), (1, 1, 1, 1)]
    assert match_words([], [2]) is None and match_words([2], []) is None


def test_onsets_cut_mid_silence_and_inside_a_merged_word():
    # phones: w1 = [p0], w2 = [p1 p2 p3 p4] saying two text words ("in the" -> ɪ n ð ə); blanks between words
    frames = np.array([0, 0, -1, -1, 1, 2, 3, -1, 4, -1])  # p0 at 0-1, a two-frame gap, then p1.. at 4..
    onsets = word_onsets_from_path(frames, "a in the", [1, 4])
    # "a" at 0; "in" where p1 starts (4) less half the gap (frames 2-3): 3; "the" at its first phone p3 (6), no gap
    assert onsets == pytest.approx((0.0, 0.3, 0.6))
    assert word_onsets_from_path(frames, "a in the", [1, 4], gap_share=0.0) == pytest.approx((0.0, 0.4, 0.6))
    assert word_onsets_from_path(frames, "", [1, 4]) is None


class _FakeHead(torch.nn.Module):
    """A 'tokenizer' whose codes are the CTC classes themselves: its head says code c at every frame coded c."""

    def __init__(self, phones: list[str]) -> None:
        super().__init__()
        self.config = SimpleNamespace(phones=phones, keep_stress=False)

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(codes, len(self.config.phones) + 1).float()

    def ctc_logits(self, zq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return 8 * zq * mask


def test_align_words_reads_the_clip_through_the_head():
    tok = _FakeHead(["a", "b", "c", "d"])
    # "ab cd": b_ˈa said at frames 1-2, c_d at 5-7, with a blank between (the stress mark is dropped, as trained)
    codes = np.array([0, 2, 1, 0, 0, 3, 4, 4, 0, 0])
    assert phone_words("b_ˈa c_d_x", tok.config.phones, keep_stress=False) == [[2, 1], [3, 4]]  # x: unknown, left out
    assert align_words(tok, codes, "ab cd", "b_ˈa c_d") == pytest.approx((0.05, 0.4))
    assert align_words(tok, codes, "ab cd", "x y") is None  # no phone the head knows
    assert align_words(tok, codes[:1], "ab cd", "b_ˈa c_d") is None  # too short to say them
    assert align_words(SimpleNamespace(), codes, "ab cd", "b_a c_d") is None  # no phone head
    with pytest.raises(OmnitokError, match="one clip's codes"):
        align_words(tok, codes.reshape(2, 5), "ab cd", "b_ˈa c_d")


def test_media_encoder_aligns_clips_read_aloud_without_onsets():
    tok = _FakeHead(["a", "b", "c", "d"])
    tok.encode_batch = lambda clips, rate: [np.array([0, 2, 1, 0, 0, 3, 4, 4, 0, 0]) for _ in clips]
    wav = np.zeros(1600, np.float32)

    def clip(**kw):
        return Audio(samples=wav, sample_rate=16000, words="ab cd", phonemes="b_a c_d", role="assistant", **kw)

    timed, given, plain = clip(), clip(word_onsets=(0.0, 0.5)), Audio(samples=wav.copy(), sample_rate=16000)
    MediaEncoder(None, tok)([[timed], [given], [plain]])
    assert timed.word_onsets == pytest.approx((0.05, 0.4))
    assert given.word_onsets == (0.0, 0.5) and plain.word_onsets is None  # the world's onsets win; no words, none
    unknown = clip()
    unknown.phonemes = "x y"  # no phone the head knows: cut by characters, and counted so pretokenize can say so
    enc = MediaEncoder(None, tok)
    enc([[clip()], [unknown]])
    assert unknown.word_onsets is None and enc.aligned == {"aligned": 1, "by_characters": 1}
    off = clip()
    MediaEncoder(None, tok, align_words=False)([[off]])
    assert off.codes is not None and off.word_onsets is None  # cut by characters, as before


def test_align_words_on_the_real_tokenizer_class():
    """The speech tokenizer's own head and codes (random weights): one onset a word, in order, inside the clip."""
    from omnitok.tokenizers.speech import SpeechTokenizer, SpeechTokenizerConfig
    from omnitok.tokenizers.speech_train import tiny_arch

    torch.manual_seed(0)
    tok = SpeechTokenizer(SpeechTokenizerConfig(**tiny_arch() | {"phones": ["a", "b", "ˈɛ"]})).eval()
    codes = tok.encode(np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32))
    onsets = align_words(tok, codes, "a bee ab", "a b_ˈɛ a_b")
    assert onsets is not None and len(onsets) == 3
    assert all(0 <= x <= y <= 1 for x, y in pairwise(onsets))


def test_pretokenize_cuts_a_world_without_onsets_where_the_tokenizer_aligns_its_words(tmp_path, monkeypatch):
    """World records without ``word_onsets`` (a user's corpus, a world built before they were recorded): the TTS
    documents are cut where the speech tokenizer aligns the words, unless --no-align-words; clips it cannot align are
    named in a warning."""
    from omnitok.data.pretokenize import pretokenize
    from omnitok.data.shards import TokenDataset
    from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from omnitok.tokenizers.speech import SpeechTokenizer, SpeechTokenizerConfig, phone_units
    from omnitok.tokenizers.speech_train import tiny_arch
    from omnitok.world import build
    from omnitok.world.read import iter_samples

    speak = build._Context.speak

    def without_onsets(self, text):  # type: ignore[no-untyped-def]
        wav, rec = speak(self, text)
        del rec["word_onsets"]
        return wav, rec

    monkeypatch.setattr(build._Context, "speak", without_onsets)
    kinds = {"scene": 1.0, "spoken_qa": 0.0, "video": 0.0, "edit": 0.0, "construction": 0.0, "caption_filter": 0.0}
    build.build_world(
        tmp_path / "w", build.WorldConfig(n=10, seed=0, samples_per_shard=20, kind_ratios=kinds), workers=1
    )
    recs = [s["meta"]["speech"] for s in iter_samples(tmp_path / "w", "train", "scene")]
    assert recs and all("word_onsets" not in r and r["phonemes"] for r in recs)
    ImageTokenizer(ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4))).save(
        tmp_path / "img"
    )
    torch.manual_seed(0)
    phones = sorted({u for r in recs for u in phone_units(r["phonemes"])})
    SpeechTokenizer(SpeechTokenizerConfig(**tiny_arch() | {"phones": phones})).save(tmp_path / "sp")
    SpeechTokenizer(SpeechTokenizerConfig(**tiny_arch() | {"phones": ["?"]})).save(tmp_path / "deaf")

    def tts_docs(out, speech="sp", **kw):  # type: ignore[no-untyped-def]
        pretokenize(tmp_path / "w", tmp_path / out, tmp_path / "img", tmp_path / speech, tasks=["tts"],
                    splits=["train"], text_vocab_size=300, **kw)  # fmt: skip
        ds = TokenDataset(tmp_path / out, "train", "tts")
        return [ds[i][0].tolist() for i in range(len(ds))]

    aligned, by_chars = tts_docs("aligned"), tts_docs("chars", align_words=False)
    assert len(aligned) == len(by_chars) == len(recs)
    assert sorted(map(len, aligned)) == sorted(map(len, by_chars))  # the same tokens, the spans cut elsewhere
    assert aligned != by_chars
    with pytest.warns(UserWarning, match=f"{len(recs)} of {len(recs)} clips read aloud .* cut by characters"):
        deaf = tts_docs("deaf_tokens", speech="deaf")
    assert deaf == tts_docs("deaf_chars", speech="deaf", align_words=False)  # a head that knows no phone aligns none
