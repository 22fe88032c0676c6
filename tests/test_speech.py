"""eSpeak NG speech for the toy world: tables, determinism, style control, phonemes, WAV files."""

from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest

from omnitok.errors import OmnitokError
from omnitok.world.speech import (
    PITCHES,
    RATES,
    SAMPLE_RATE,
    VOICES,
    Speaker,
    Style,
    _word_onsets,
    decode_wav,
    encode_wav,
    estimate_f0,
)

SENTENCE = "A small red circle is above the big blue square."


@pytest.fixture(scope="module")
def speaker() -> Speaker:
    return Speaker()


def test_tables_are_complete() -> None:
    assert len(VOICES) >= 8
    assert len({v.name for v in VOICES}) == len(VOICES)
    assert {v.gender for v in VOICES} == {"male", "female"}
    assert len({v.lang for v in VOICES}) >= 3
    assert {v.lang.split("-")[0] for v in VOICES} == {"en"}
    assert set(PITCHES) == {"low", "mid", "high"}
    assert PITCHES["low"] < PITCHES["mid"] < PITCHES["high"]
    assert all(0 <= p <= 100 for p in PITCHES.values())
    assert set(RATES) == {"slow", "normal", "fast"}
    assert RATES["slow"] < RATES["normal"] < RATES["fast"]
    assert all(80 <= r <= 450 for r in RATES.values())


def test_every_voice_speaks(speaker: Speaker) -> None:
    for voice in VOICES:
        audio = speaker.synthesize("red", Style(voice.name, "mid", "normal"))
        assert audio.size > 0.1 * SAMPLE_RATE, voice.name


@pytest.mark.parametrize("field", ["voice", "pitch", "rate"])
def test_bad_style_names_the_field(field: str) -> None:
    kwargs = {"voice": VOICES[0].name, "pitch": "mid", "rate": "normal", field: "nonsense"}
    with pytest.raises(OmnitokError, match=field) as err:
        Style(**kwargs)
    assert "nonsense" in str(err.value)


def test_output_format_and_duration(speaker: Speaker) -> None:
    audio = speaker.synthesize(SENTENCE, Style("us_m1", "mid", "normal"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.all(np.abs(audio) <= 1.0)
    assert np.sqrt(np.mean(audio**2)) > 0.02  # not silent
    seconds = audio.size / SAMPLE_RATE
    assert 1.5 < seconds < 6.0  # ten words at 170 words per minute


def test_word_onsets_mark_where_each_word_starts(speaker: Speaker) -> None:
    style = Style("us_m1", "mid", "normal")
    text = "A small red circle. Then a big blue square, on the left."
    audio, onsets = speaker.synthesize_timed(text, style)
    assert np.array_equal(audio, speaker.synthesize(text, style))  # the same clip, timed
    assert len(onsets) == len(text.split()) and onsets == sorted(onsets) and onsets[0] >= 0 and onsets[-1] < audio.size
    assert len(set(onsets)) == len(onsets)  # "on the", one word to eSpeak, gets two onsets
    # after the full stop eSpeak pauses: the 50 ms before "Then" are near silent, the 50 ms after it are not
    then = onsets[text.split().index("Then")]
    w = SAMPLE_RATE // 20
    rms = np.sqrt(np.mean(audio**2))
    assert np.sqrt(np.mean(audio[then - w : then] ** 2)) < 0.1 * rms < np.sqrt(np.mean(audio[then : then + w] ** 2))
    # words are timed at SAMPLE_RATE: a slow clip puts its last word later than a fast one
    slow = speaker.synthesize_timed(text, Style("us_m1", "mid", "slow"))[1]
    fast = speaker.synthesize_timed(text, Style("us_m1", "mid", "fast"))[1]
    assert slow[-1] > 1.3 * fast[-1]


def test_word_onsets_from_events() -> None:
    # (1-based character, native sample) per event; scale 0.5 (a 32 kHz library, 16 kHz clips)
    text = "red  circle , then"  # words start at characters 0, 5, 12, 14; 18 characters
    assert _word_onsets(text, [(1, 100), (6, 400), (15, 900)], 0.5, 1000) == [50, 200, 394, 450]  # "," has none:
    # placed by its characters between "circle" (5, 200) and "then" (14, 450)
    assert _word_onsets(text, [(1, 100), (15, 900)], 0.5, 1000) == [50, 193, 393, 450]  # two words spoken as one
    # the first event inside a word counts; a word before any event starts with the clip, after the last one
    # ends with it
    assert _word_onsets(text, [(6, 400), (8, 300)], 1.0, 1000) == [0, 400, 723, 815]
    assert _word_onsets(text, [], 1.0, 1000) == [0, 278, 667, 778]


def test_deterministic_whatever_came_before(speaker: Speaker) -> None:
    style = Style("gb_f2", "high", "normal")
    first = speaker.synthesize(SENTENCE, style)
    speaker.synthesize("Something else entirely, spoken fast.", Style("sc_m4", "low", "fast"))
    again = speaker.synthesize(SENTENCE, style)
    assert np.array_equal(first, again)
    assert encode_wav(first) == encode_wav(again)


def _worker_clip(args: tuple[str, str, str, str]) -> bytes:
    text, voice, pitch, rate = args
    return encode_wav(Speaker().synthesize(text, Style(voice, pitch, rate)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_same_bytes_in_worker_processes(speaker: Speaker, method: str) -> None:
    jobs = [(SENTENCE, "us_f1", "low", "slow"), ("The green star is behind it.", "rp_m6", "high", "fast")]
    expected = [encode_wav(speaker.synthesize(t, Style(v, p, r))) for t, v, p, r in jobs]
    with mp.get_context(method).Pool(1) as pool:
        got = pool.map(_worker_clip, jobs[::-1])[::-1]  # other order than here
    assert got == expected


def _voices_listed(speaker: Speaker) -> int:
    return ctypes.c_int.from_address(speaker._lib._voice_list[0][0]).value


def test_voice_list_is_scanned_once_per_data_directory(speaker: Speaker, tmp_path: Path) -> None:
    """A reset keeps eSpeak's list of voice files (selecting a voice by name would scan ~290 files again);
    a Speaker on another data directory scans its own, and every clip is what a fresh list gives."""
    if not speaker._lib._voice_list:
        pytest.skip("this libespeak-ng has no symbol table: every voice selection scans the directory")
    style = Style("rp_f5", "mid", "normal")
    first = speaker.synthesize(SENTENCE, style)
    # the same data under another path, with a voices/ folder of our own to add a voice file to
    other = tmp_path / "espeak-ng-data"
    other.mkdir()
    for entry in Path(speaker.data_path).iterdir():
        if entry.name != "voices":
            (other / entry.name).symlink_to(entry)
    (other / "voices").mkdir()
    for entry in (Path(speaker.data_path) / "voices").iterdir():
        (other / "voices" / entry.name).symlink_to(entry)
    elsewhere = Speaker(speaker.library, str(other))
    assert np.array_equal(elsewhere.synthesize(SENTENCE, style), first)
    listed = _voices_listed(elsewhere)
    assert listed > 100
    (other / "voices" / "extra").write_text("name extra\nlanguage en\n")
    assert np.array_equal(elsewhere.synthesize(SENTENCE, style), first)
    assert _voices_listed(elsewhere) == listed  # kept across the reset: the new file was not seen
    assert np.array_equal(speaker.synthesize(SENTENCE, style), first)  # back on the first directory: its own list
    assert _voices_listed(speaker) == listed
    assert np.array_equal(elsewhere.synthesize(SENTENCE, style), first)
    assert _voices_listed(elsewhere) == listed + 1  # scanned again after the other directory's turn


def test_speaker_pickles_as_its_paths(speaker: Speaker) -> None:
    clone = pickle.loads(pickle.dumps(speaker))
    assert (clone.library, clone.data_path) == (speaker.library, speaker.data_path)
    style = Style("us_m3", "low", "normal")
    assert np.array_equal(clone.synthesize("Blue.", style), speaker.synthesize("Blue.", style))


def test_slow_rate_is_longer_than_fast(speaker: Speaker) -> None:
    lengths = {rate: speaker.synthesize(SENTENCE, Style("us_f5", "mid", rate)).size for rate in RATES}
    assert lengths["slow"] > lengths["normal"] > lengths["fast"]
    assert lengths["slow"] > 1.4 * lengths["fast"]


@pytest.mark.parametrize("voice", ["us_m1", "gb_f2", "sc_m4"])
def test_pitch_classes_order_measured_f0(speaker: Speaker, voice: str) -> None:
    f0 = {p: estimate_f0(speaker.synthesize(SENTENCE, Style(voice, p, "normal")), SAMPLE_RATE) for p in PITCHES}
    assert f0["low"] * 1.15 < f0["mid"] and f0["mid"] * 1.15 < f0["high"], f0


def test_estimate_f0_on_known_signals() -> None:
    sr = 16000
    t = np.arange(sr) / sr
    for hz in (90.0, 150.0, 240.0):
        # a buzzy source (harmonics with falling amplitude) like a glottal pulse train
        x = sum(np.sin(2 * np.pi * hz * k * t) / k for k in range(1, 8))
        assert estimate_f0(x, sr) == pytest.approx(hz, rel=0.02)
    assert np.isnan(estimate_f0(np.zeros(sr), sr))
    with pytest.raises(OmnitokError, match="mono"):
        estimate_f0(np.zeros((2, sr)), sr)


def _yin_per_frame(x: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0) -> float:
    """The textbook YIN, one frame at a time (direct sums, a walk per frame): what estimate_f0 vectorises."""
    x = np.asarray(x, np.float64)
    tau_min, tau_max = max(2, int(sr / fmax)), int(np.ceil(sr / fmin))
    win, hop = tau_max, sr // 100
    frames = [x[i : i + win + tau_max + 1] for i in range(0, x.size - win - tau_max, hop)]
    frames = [f - f.mean() for f in frames]
    energy = np.array([np.sqrt((f[:win] ** 2).mean()) for f in frames])
    f0s = []
    for f in (f for f, e in zip(frames, energy, strict=True) if e > 0.1 * energy.max()):
        d = np.array([((f[:win] - f[tau : tau + win]) ** 2).sum() for tau in range(tau_max + 1)])
        cmnd = np.ones_like(d)
        cmnd[1:] = d[1:] / np.maximum(np.cumsum(d[1:]) / np.arange(1, tau_max + 1), 1e-12)
        below = [t for t in range(tau_min, tau_max + 1) if cmnd[t] < 0.15]
        if not below:
            continue
        t = below[0]
        while t < tau_max and cmnd[t + 1] < cmnd[t]:
            t += 1
        shift = 0.0
        if 0 < t < tau_max and cmnd[t - 1] - 2 * cmnd[t] + cmnd[t + 1] > 0:
            shift = 0.5 * (cmnd[t - 1] - cmnd[t + 1]) / (cmnd[t - 1] - 2 * cmnd[t] + cmnd[t + 1])
        f0s.append(sr / (t + shift))
    return float(np.median(f0s)) if f0s else float("nan")


def test_estimate_f0_equals_the_per_frame_yin(speaker: Speaker) -> None:
    """The vectorised estimator (FFT correlation, the walk to the minimum as an argmax) is the per-frame one."""
    rng = np.random.default_rng(0)
    speech = speaker.synthesize(SENTENCE, Style("gb_f2", "low", "fast"))
    t = np.arange(6000) / SAMPLE_RATE
    vibrato = np.sin(2 * np.pi * np.cumsum(180 + 40 * np.sin(2 * np.pi * 3 * t)) / SAMPLE_RATE)
    for x in (speech, vibrato + 0.3 * rng.standard_normal(t.size), rng.standard_normal(4000)):
        assert estimate_f0(x, SAMPLE_RATE) == pytest.approx(_yin_per_frame(x, SAMPLE_RATE), rel=1e-9, nan_ok=True)


def test_resample_filter_is_scipys_default() -> None:
    from scipy.signal import resample_poly

    from omnitok.world.speech import _resample_filter

    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    for up, down in ((16, 11), (8, 11), (2, 3)):
        assert np.array_equal(resample_poly(x, up, down), resample_poly(x, up, down, window=_resample_filter(up, down)))


def test_phonemes(speaker: Speaker) -> None:
    ipa = speaker.phonemes(SENTENCE, Style("us_m1", "mid", "normal"))
    words = ipa.split(" ")
    assert len(words) == len(SENTENCE.split())
    assert all(w for w in words)
    assert "_" in ipa and "s_k_w" in ipa  # "square"
    # two clauses: both are returned
    assert len(speaker.phonemes("Red, then blue.", Style("us_m1", "mid", "normal")).split()) == 3
    # accent matters: Scottish English has a rolled r in "red"
    assert speaker.phonemes("red", Style("sc_m4", "mid", "normal")) != speaker.phonemes(
        "red", Style("us_m1", "mid", "normal")
    )


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused(speaker: Speaker, text: str) -> None:
    with pytest.raises(OmnitokError, match="empty"):
        speaker.synthesize(text, Style("us_m1", "mid", "normal"))
    with pytest.raises(OmnitokError, match="empty"):
        speaker.phonemes(text, Style("us_m1", "mid", "normal"))


def test_missing_library_or_data_is_reported(tmp_path) -> None:
    with pytest.raises(OmnitokError, match="library not found"):
        Speaker(library=str(tmp_path / "libnothing.so"), data_path=str(tmp_path))
    with pytest.raises(OmnitokError, match="phontab"):
        Speaker(data_path=str(tmp_path))


def test_wav_round_trip() -> None:
    rng = np.random.default_rng(0)
    x = (0.5 * rng.standard_normal(4000)).clip(-1, 1).astype(np.float32)
    data = encode_wav(x)
    assert data[:4] == b"RIFF" and data == encode_wav(x)
    y, sr = decode_wav(data)
    assert sr == SAMPLE_RATE and y.dtype == np.float32
    assert np.max(np.abs(y - x)) < 1.0 / 16000
    y, sr = decode_wav(encode_wav(x, 22050))
    assert sr == 22050 and y.size == x.size


def test_wav_errors() -> None:
    with pytest.raises(OmnitokError, match="not a WAV"):
        decode_wav(b"OggS" + bytes(40))
    stereo = io.BytesIO()
    with wave.open(stereo, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(400))
    with pytest.raises(OmnitokError, match="mono"):
        decode_wav(stereo.getvalue())
    with pytest.raises(OmnitokError, match="mono"):
        encode_wav(np.zeros((100, 2), np.float32))
    with pytest.raises(OmnitokError, match="NaN"):
        encode_wav(np.array([0.0, np.nan], np.float32))
