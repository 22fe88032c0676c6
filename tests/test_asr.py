"""The speech instrument: text normalisation, corpus WER, and pocketsphinx on eSpeak speech."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import resample_poly

from omnitok.errors import OmnitokError
from omnitok.eval.asr import Transcriber, normalize_text, wer
from omnitok.world.speech import SAMPLE_RATE, Speaker, Style

CORPUS = [
    "A small red circle is in the top left.",
    "There is a big blue square at the center.",
    "A tiny green triangle is on the right side and a large yellow star is at the bottom.",
    "The picture shows two objects: a purple diamond and an orange circle.",
    "The red circle is partly hidden behind the blue square.",
    "A large orange star in the lower right and a small purple square in the upper left.",
]


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber(CORPUS)


@pytest.fixture(scope="module")
def speaker() -> Speaker:
    return Speaker()


def test_normalize_text() -> None:
    assert normalize_text("  A small, RED circle!  ") == "a small red circle"
    assert normalize_text("It's the \u201cleft-hand\u201d side; 'quoted'.") == "it's the left hand side quoted"
    assert normalize_text("two\tobjects\n") == "two objects"
    assert normalize_text("...") == ""


def test_wer_on_known_pairs() -> None:
    assert wer(["the cat sat"], ["The cat, sat!"]) == 0.0
    assert wer(["a b c d"], ["a x c"]) == pytest.approx(0.5)  # one substitution, one deletion
    # corpus WER pools the edits: 1 error over 2 + 4 words, not the mean of 0.5 and 0
    assert wer(["a b", "c d e f"], ["a", "c d e f"]) == pytest.approx(1 / 6)
    assert wer(["a b", ""], ["a b", "extra words"]) == pytest.approx(1.0)  # insertions only
    with pytest.raises(OmnitokError, match="pair up"):
        wer(["a"], ["a", "b"])
    with pytest.raises(OmnitokError, match="no words"):
        wer([""], ["a"])
    with pytest.raises(OmnitokError, match="single str"):
        wer("a b", "a b")


def test_domain_lm_transcribes_espeak_speech(transcriber: Transcriber, speaker: Speaker) -> None:
    refs = [CORPUS[1], CORPUS[2], CORPUS[0]]
    styles = [Style("us_m1", "mid", "normal"), Style("gb_f2", "mid", "slow"), Style("us_f1", "mid", "normal")]
    hyps = [transcriber.transcribe(speaker.synthesize(t, s), SAMPLE_RATE) for t, s in zip(refs, styles, strict=True)]
    assert wer(refs, hyps) <= 0.2, hyps
    assert transcriber.vocabulary is not None and "triangle" in transcriber.vocabulary


def test_many_clips_in_worker_processes_hear_what_one_at_a_time_hears(
    transcriber: Transcriber, speaker: Speaker
) -> None:
    clips = [speaker.synthesize(t, Style("us_m1", "mid", "normal")) for t in CORPUS[:3]]
    clips.insert(1, np.zeros(16000, np.float32))  # silence: heard as nothing, not sent to a worker
    one_by_one = [transcriber.transcribe(c, SAMPLE_RATE) for c in clips]
    assert one_by_one[1] == "" and all(one_by_one[i] for i in (0, 2, 3))
    assert transcriber.transcribe_many(clips, SAMPLE_RATE, workers=2) == one_by_one  # a pool of two
    assert transcriber.transcribe_many(clips, SAMPLE_RATE, workers=1) == one_by_one  # here, in order
    assert transcriber.transcribe_many([], SAMPLE_RATE) == []
    with pytest.raises(OmnitokError, match="mono audio"):
        transcriber.transcribe_many([np.zeros((2, 100), np.float32)], SAMPLE_RATE)


def test_resamples_and_is_deterministic(transcriber: Transcriber, speaker: Speaker) -> None:
    audio = speaker.synthesize(CORPUS[1], Style("us_m1", "mid", "normal"))
    at_16k = transcriber.transcribe(audio, SAMPLE_RATE)
    assert at_16k == transcriber.transcribe(audio, SAMPLE_RATE)
    at_24k = transcriber.transcribe(resample_poly(audio, 3, 2).astype(np.float32), 24000)
    assert wer([CORPUS[1]], [at_24k]) <= 0.2
    pcm16 = np.round(audio * 32767).astype(np.int16)
    assert wer([CORPUS[1]], [transcriber.transcribe(pcm16, SAMPLE_RATE)]) <= 0.2


def test_a_transcription_does_not_depend_on_what_was_heard_before(speaker: Speaker) -> None:
    # A reference clip's transcription must not change with the (generated) audio scored before it. This voice,
    # style and text are one that a single long-lived pocketsphinx decoder heard differently after loud noise.
    transcriber = Transcriber(CORPUS)
    clip = speaker.synthesize(CORPUS[1], Style("sc_f2", "high", "fast"))
    noise = (np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 0.3).astype(np.float32)
    first = transcriber.transcribe(clip, SAMPLE_RATE)
    for other in (noise, speaker.synthesize(CORPUS[2], Style("us_m1", "low", "slow")), noise):
        transcriber.transcribe(other, SAMPLE_RATE)
        assert transcriber.transcribe(clip, SAMPLE_RATE) == first


def test_silence_gives_empty_text(transcriber: Transcriber) -> None:
    assert transcriber.transcribe(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE) == ""


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.array([0.0, np.nan, 0.1], np.float32), 16000, "NaN"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.zeros((16000, 2), np.float32), 16000, "mono"),
        (np.zeros(16000, np.float32), 0, "sample_rate"),
        (np.zeros(16000, np.int32), 16000, "int16"),
        ([0.0] * 100, 16000, "numpy array"),
    ],
)
def test_bad_audio_is_refused(transcriber: Transcriber, audio, rate: int, message: str) -> None:
    with pytest.raises(OmnitokError, match=message):
        transcriber.transcribe(audio, rate)


def test_words_missing_from_the_dictionary_are_reported() -> None:
    with pytest.raises(OmnitokError, match="zorbly") as err:
        Transcriber(["a zorbly red circle", "the circle is 3 wide"])
    assert "2 corpus word(s)" in str(err.value) and "3, zorbly" in str(err.value)
    t = Transcriber(["a zorbly red circle"], pronunciations={"zorbly": "Z AO R B L IY"})
    assert t.vocabulary == frozenset({"a", "zorbly", "red", "circle"})
    with pytest.raises(OmnitokError, match="QQ"):
        Transcriber(["a zorbly red circle"], pronunciations={"zorbly": "Z QQ"})


def test_empty_corpus_is_refused() -> None:
    with pytest.raises(OmnitokError, match="no words"):
        Transcriber(["...", ""])
    with pytest.raises(OmnitokError, match="single str"):
        Transcriber("a red circle")  # type: ignore[arg-type]


def test_general_lm_is_available() -> None:
    t = Transcriber()
    assert t.vocabulary is None and not t.domain
