"""The style instrument classifies eSpeak's own audio into the pitch and rate classes it was spoken at."""

from __future__ import annotations

import numpy as np
import pytest

from omnitok.errors import OmnitokError
from omnitok.eval.style import StyleReference, active_duration, style_accuracy
from omnitok.world.speech import PITCHES, RATES, Speaker, Style

TEXTS = ["A small red circle is in the top left.", "There is a big blue square at the center."]
VOICES = ["us_m1", "us_f1", "sc_m4"]


@pytest.fixture(scope="module")
def speaker() -> Speaker:
    return Speaker()


@pytest.fixture(scope="module")
def reference(speaker: Speaker) -> StyleReference:
    return StyleReference.fit(TEXTS[:1], VOICES, speaker=speaker)


def test_active_duration() -> None:
    sr = 16000
    x = np.zeros(sr, np.float32)
    x[4000:12000] = 0.3 * np.sin(np.arange(8000) / sr * 2 * np.pi * 200)
    assert active_duration(x, sr) == pytest.approx(0.5, abs=0.011)
    assert active_duration(np.zeros(1000, np.float32), sr) == 0.0
    with pytest.raises(OmnitokError, match="empty"):
        active_duration(np.zeros(0, np.float32), sr)


def test_classifies_espeak_audio(speaker: Speaker, reference: StyleReference) -> None:
    clips = []
    text = TEXTS[1]  # not the sentence the centroids were fitted on
    for v in VOICES:
        for p, r in zip(PITCHES, [*RATES][::-1], strict=True):
            clips.append((speaker.synthesize(text, Style(v, p, r)), 16000, {"voice": v, "pitch": p, "rate": r}, text))
    acc = style_accuracy(reference, clips)
    assert acc["pitch_acc"] == 1.0 and acc["rate_acc"] == 1.0 and acc["n"] == 9
    # centroid-only pitch classification (no text) also holds on eSpeak's audio
    assert all(reference.classify_pitch(a, sr, s["voice"]) == s["pitch"] for a, sr, s, _ in clips)
    # resampled audio is measured at its own rate
    from scipy.signal import resample_poly

    a, _, s, t = clips[0]
    assert reference.classify_rate(resample_poly(a, 1, 2).astype(np.float32), 8000, s["voice"], t) == s["rate"]


def test_reference_round_trip_and_errors(reference: StyleReference) -> None:
    again = StyleReference.from_dict(reference.to_dict())
    assert again.f0 == reference.f0 and again.pitches == ["low", "mid", "high"]
    low, high = reference.f0["us_m1"]["low"], reference.f0["us_m1"]["high"]
    assert 1.3 < high / low < 2.5
    x = np.zeros(800, np.float32)
    assert reference.classify_pitch(x, 16000, "us_m1") is None  # nothing voiced
    with pytest.raises(OmnitokError, match="no F0 references"):
        reference.classify_pitch(np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000, "xx")
    with pytest.raises(OmnitokError, match="text"):
        reference.classify_rate(x, 16000, "us_m1", "")
    with pytest.raises(OmnitokError, match="NaN"):
        reference.classify_pitch(np.array([np.nan] * 100, np.float32), 16000, "us_m1")
    with pytest.raises(OmnitokError, match="non-empty list"):
        StyleReference.fit("one sentence")


def test_a_lazy_reference_fits_a_voice_only_when_its_centroids_are_needed(
    speaker: Speaker, reference: StyleReference
) -> None:
    lazy = StyleReference.fit(TEXTS[:1], VOICES, speaker=speaker, lazy=True)
    assert lazy.f0 == {}
    text = TEXTS[1]
    for v, p, r in [("us_m1", "high", "slow"), ("us_f1", "low", "fast")]:
        clip = speaker.synthesize(text, Style(v, p, r))
        # with the clip's text: the sentence's own references, and no table fitted
        assert lazy.classify_pitch(clip, 16000, v, text) == reference.classify_pitch(clip, 16000, v, text) == p
        assert lazy.classify_rate(clip, 16000, v, text) == r
    assert lazy.f0 == {}
    clip = speaker.synthesize(text, Style("sc_m4", "low", "normal"))
    assert lazy.classify_pitch(clip, 16000, "sc_m4") == "low"  # without it: that voice's centroids, fitted now
    assert lazy.f0 == {"sc_m4": reference.f0["sc_m4"]}
    assert lazy.to_dict() == reference.to_dict()  # the whole table, as an eager fit makes it
    with pytest.raises(OmnitokError, match="no F0 references for voice 'xx'"):
        lazy.classify_pitch(clip, 16000, "xx", text)
