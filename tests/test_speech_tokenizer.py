"""omnitok's own speech tokenizer: contract, bad input, streaming, save/load, training, resume and the CLI.

Everything runs on a tiny model and a few short eSpeak clips so the file stays within seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.mel import MelConfig, MelSpectrogram
from omnitok.tokenizers.speech import (
    SpeechTokenizer,
    SpeechTokenizerConfig,
    as_mono_audio,
    load_speech_tokenizer,
    phone_units,
    stretch_frames,
)
from omnitok.tokenizers.speech_train import (
    SpeechClip,
    default_train_config,
    edit_distance,
    greedy_ctc,
    tiny_arch,
    train_speech_tokenizer,
)

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run faster on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**over) -> SpeechTokenizer:
    torch.manual_seed(0)
    arch = (
        tiny_arch()
        | {
            "phones": ["a", "b", "ˈɛ"],
            "voices": ["us_m1", "us_f1"],
            "f0_centroids": {
                "us_m1": {"low": 70.0, "mid": 93.0, "high": 135.0},
                "us_f1": {"low": 136.0, "mid": 180.0, "high": 262.0},
            },
        }
        | over
    )
    tok = SpeechTokenizer(SpeechTokenizerConfig(**arch)).eval()
    for block in [*tok.dec, *tok.post]:  # style modulation starts at zero; make it matter in untrained models
        torch.nn.init.normal_(block.cond.weight, std=0.1)
    return tok


def _tone(seconds: float, sr: int = SR, f0: float = 150.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def espeak_clips() -> list[SpeechClip]:
    from omnitok.world.speech import Speaker, Style

    sp = Speaker()
    texts = ["A small red circle.", "A big blue square.", "The green star is on the left."]
    clips = []
    for i, text in enumerate(texts * 2):
        style = Style(["us_m1", "us_f1"][i % 2], ["low", "mid", "high"][i % 3], ["slow", "normal", "fast"][i % 3])
        rec = {
            "text": text,
            "voice": style.voice,
            "pitch": style.pitch,
            "rate": style.rate,
            "phonemes": sp.phonemes(text, style),
            "sample_rate": SR,
        }
        clips.append(SpeechClip(sp.synthesize(text, style), rec, f"k{i}"))
    return clips


def test_mel_front_end_and_griffin_lim() -> None:
    mel = MelSpectrogram(MelConfig(n_mels=40, n_fft=512, win_length=400))
    x = _tone(0.5)
    lm = mel.log_mel(x)
    assert lm.shape == (40, x.size // 160 + 1)
    y = mel.invert(lm, iters=16, length=x.size)
    assert y.shape == (x.size,)
    # Griffin-Lim keeps the magnitude spectrum: the log-mel of the resynthesis is close to the original
    assert (mel.log_mel(y) - lm)[:, 3:-3].abs().mean() < 0.6
    with pytest.raises(OmnitokError, match="win_length"):
        MelConfig(n_fft=256, win_length=400)


@pytest.mark.parametrize(
    "cfg",
    [
        MelConfig(),
        MelConfig(n_mels=40, n_fft=512, win_length=400),
        MelConfig(n_fft=512, win_length=512, hop_length=128),
    ],
)
def test_istft_and_magnitude_match_torch(cfg: MelConfig) -> None:
    """The front end's own istft (overlap-add of the windowed part) and numpy-backed |.| are torch's, faster."""
    from omnitok.tokenizers.mel import magnitude, unit_phase

    mel = MelSpectrogram(cfg)
    g = torch.Generator().manual_seed(0)
    for n in (cfg.hop_length * 7, 4001, 16000):
        spec = mel.stft(torch.randn(n, generator=g))
        for length in (n, n - 50, None):
            want = torch.istft(spec, cfg.n_fft, cfg.hop_length, cfg.win_length, mel.window, center=True, length=length)
            got = mel.istft(spec, length)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(magnitude(spec), spec.abs())
        torch.testing.assert_close(unit_phase(spec), spec / spec.abs().clamp(min=1e-8))
    # a gradient or a GPU keeps torch's own op
    z = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    magnitude(z).sum().backward()
    assert z.grad is not None


def test_f0_contour_and_harmonic_comb() -> None:
    from omnitok.tokenizers.pitch import HarmonicComb, f0_contour

    x = np.concatenate([np.zeros(1600, np.float32), _tone(0.5, f0=110.0)])
    f0 = f0_contour(x)
    assert f0.shape == (x.size // 160 + 1,)
    assert (f0[:5] == 0).all()  # silence is unvoiced
    assert abs(float(f0[30:-10].median()) - 110.0) < 2.0
    mel = MelSpectrogram(MelConfig())
    comb = HarmonicComb(SR, 1024, 640, mel.fb)
    c = comb(torch.tensor([[0.0, 100.0, 200.0]]))
    assert c.shape == (1, 3, 128) and (c[0, 0] == 0).all()
    # the comb peaks where the tone's harmonics sit: it correlates with the tone's own low-band mel ripple
    t = np.arange(int(0.3 * SR)) / SR
    buzz = sum(np.sin(2 * np.pi * 200.0 * k * t) for k in range(1, 30)).astype(np.float32) * 0.02
    lm = mel.log_mel(buzz)[:, 10]
    ripple = lm[:40] - lm[:40].mean()
    target = c[0, 2, :40] - c[0, 2, :40].mean()
    assert torch.nn.functional.cosine_similarity(ripple, target, dim=0) > 0.5


def test_audio_input_checks() -> None:
    x = _tone(0.2)
    assert as_mono_audio(x, SR).dtype == np.float32
    assert as_mono_audio(np.stack([x, x], 1), SR).shape == x.shape  # stereo [T, 2] is averaged
    assert as_mono_audio(np.stack([x, x], 0), SR).shape == x.shape  # and [2, T]
    assert as_mono_audio((x * 32767).astype(np.int16), SR).max() == pytest.approx(x.max(), abs=1e-3)
    assert as_mono_audio(_tone(0.2, 8000), 8000).shape == x.shape  # resampled to 16 kHz
    for bad, msg in [
        (np.zeros(0, np.float32), "0 samples"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
        (np.zeros((4, 4, 4), np.float32), "1-D"),
        (np.zeros((3, 1000), np.float32), "1-2 channels"),
        (np.zeros(10, np.int32), "int16"),
        ([0.1, 0.2], "numpy array"),
    ]:
        with pytest.raises(OmnitokError, match=msg):
            as_mono_audio(bad, SR)
    with pytest.raises(OmnitokError, match="sample_rate"):
        as_mono_audio(x, 0)
    with pytest.raises(OmnitokError, match="maximum"):
        as_mono_audio(_tone(2.0), SR, max_seconds=1.0)


def test_contract_encode_decode_shapes() -> None:
    tok = _tiny()
    assert tok.sample_rate == SR and tok.frame_rate == 25.0 and tok.num_levels == 1
    assert tok.codebook_sizes == [125] and tok.codebook_size == 125
    assert tok.code_vectors().shape == (125, 3) and tok.code_vectors().abs().max() == 1.0
    x = _tone(1.03)
    codes = tok.encode(x, SR)
    assert codes.dtype == np.int64 and codes.shape == (26,) and codes.min() >= 0 and codes.max() < 125
    assert tok.encode(_tone(1.03, 22050), 22050).shape == (26,)  # other rates are resampled
    assert tok.encode(x[:100], SR).shape == (1,)  # shorter than one token: still one code
    assert tok.decode(tok.encode(x[:100], SR)).shape == (640,)
    batch = tok.encode_batch([x, x[:8000], x[:3000]], SR)  # padding and masking leave codes unchanged
    assert all(np.array_equal(b, tok.encode(c, SR)) for b, c in zip(batch, [x, x[:8000], x[:3000]], strict=True))
    audio = tok.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (26 * 640,) and np.isfinite(audio).all()
    assert tok.decode(codes.reshape(-1, 1)).shape == audio.shape
    assert tok.decode(codes.tolist(), {"voice": "us_f1", "pitch": "high"}).shape == audio.shape


def test_bad_codes_and_styles_are_refused() -> None:
    tok = _tiny()
    codes = tok.encode(_tone(0.4), SR)
    for bad, msg in [
        (np.array([], np.int64), "0 frames"),
        (np.array([0, 125]), "out of range"),
        (np.array([0.5, 1.0]), "integer"),
        (np.zeros((3, 2), np.int64), "shape"),
    ]:
        with pytest.raises(OmnitokError, match=msg):
            tok.decode(bad)
    for style, msg in [
        ({"voice": "sc_m4"}, "reference clip"),
        ({"pitch": "shrill"}, "pitch"),
        ({"rate": "warp"}, "rate"),
        ({"mood": "happy"}, "unknown fields"),
        ("us_m1", "dict"),
    ]:
        with pytest.raises(OmnitokError, match=msg):
            tok.decode(codes, style)
    with pytest.raises(OmnitokError, match="limit"):
        tok.decode(np.zeros(int(tok.config.max_seconds * 25 * 2) + 1, np.int64))


def test_style_changes_decoder_conditioning_and_rate_stretches() -> None:
    tok = _tiny()
    codes = tok.encode(_tone(1.0), SR)
    source, _ = tok.estimate_rate(codes)
    assert source in tok.config.rates
    other = {"slow": "fast", "normal": "slow", "fast": "slow"}[source]
    base = tok.decode_to_mel(codes, {"rate": source})
    stretched = tok.decode_to_mel(codes, {"rate": other})
    assert base.shape[1] == 100 and stretched.shape[1] != base.shape[1]
    high = tok.decode_to_mel(codes, {"voice": "us_m1", "pitch": "high", "rate": source})
    assert high.shape == base.shape and not torch.allclose(high, base)
    # a reference clip gives the voice (and F0, rate) for fields the style leaves out
    ref = tok.decode_to_mel(codes, {"rate": source}, reference=_tone(1.0, f0=200.0))
    assert ref.shape == base.shape
    st = tok.resolve_style({"pitch": "high"}, _tone(0.8, f0=120.0))
    assert st.log_f0 > np.log(120.0)  # an unseen voice's reference F0 is raised by the mean high/mid ratio
    # stretching is a fixed grid: consecutive pieces equal one whole stretch
    m = torch.randn(4, 30)
    whole = stretch_frames(m, 0, 45, 1.5)
    assert torch.allclose(torch.cat([stretch_frames(m, 0, 20, 1.5), stretch_frames(m, 20, 45, 1.5)], 1), whole)


def test_streaming_decode_matches_and_does_not_click() -> None:
    tok = _tiny(gl_iters=8)
    codes = tok.encode(_tone(2.0), SR)
    style = {"voice": "us_m1", "pitch": "mid", "rate": "normal"}
    full = tok.decode(codes, style)
    chunks = list(tok.decode_chunks(iter(codes.tolist()), style, chunk_frames=7))
    assert len(chunks) > 3
    streamed = np.concatenate(chunks)
    assert streamed.shape == full.shape and np.isfinite(streamed).all()
    # the mel spectrogram of the streamed audio matches the one-shot decode (phase may differ)
    a, b = tok.mel.log_mel(full), tok.mel.log_mel(streamed)
    assert (a - b).abs().mean() < 0.5
    # no clicks: the sample-to-sample step at chunk joins is no larger than steps elsewhere
    joins = np.cumsum([len(c) for c in chunks])[:-1]
    steps = np.abs(np.diff(streamed))
    assert steps[joins - 1].max() <= 2.0 * np.quantile(steps, 0.999) + 1e-4
    # the same stream given as an array, and as small arrays
    assert np.concatenate(list(tok.decode_chunks(codes, style, chunk_frames=7))).shape == full.shape
    pieces = [codes[i : i + 3] for i in range(0, len(codes), 3)]
    assert np.concatenate(list(tok.decode_chunks(pieces, style, chunk_frames=5))).shape == full.shape
    with pytest.raises(OmnitokError, match="empty"):
        list(tok.decode_chunks(iter([]), style))
    # streamed tokens spoken at "normal", played "slow": stretched by the ratio of the classes' words per minute
    slow = np.concatenate(list(tok.decode_chunks(codes, {**style, "rate": "slow"}, 7, source_rate="normal")))
    assert len(slow) == round(len(codes) * 4 * 170 / 125) * 160


def test_streaming_mel_is_exact() -> None:
    """Decoding windows with left context and lookahead reproduces the one-shot mel exactly."""
    tok = _tiny()
    codes = tok.encode(_tone(2.0), SR)
    st = tok.resolve_style({"voice": "us_f1"}, None)
    cond = tok._cond(st, "normal")
    zq = tok.codes_to_latents(torch.from_numpy(codes)).unsqueeze(0)
    with torch.no_grad():
        full = tok.decode_mel(zq, cond)[0]
        s, e = 20, 27
        lo, hi = s - tok.left_context_tokens, e + tok.lookahead_tokens
        assert lo >= 0 and hi <= len(codes)
        part = tok.decode_mel(zq[:, lo:hi], cond)[0]
    ds = tok.config.downsample
    assert torch.allclose(part[:, (s - lo) * ds : (e - lo) * ds], full[:, s * ds : e * ds], atol=1e-5)


def test_save_load_round_trip_and_dispatch(tmp_path: Path) -> None:
    tok = _tiny()
    x = _tone(0.7)
    tok.save(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["omnitok_tokenizer"] == "speech_fsq" and (tmp_path / "tok" / "model.safetensors").is_file()
    again = load_speech_tokenizer(tmp_path / "tok")
    assert isinstance(again, SpeechTokenizer)
    assert np.array_equal(again.encode(x, SR), tok.encode(x, SR))
    assert np.allclose(again.decode(tok.encode(x, SR)), tok.decode(tok.encode(x, SR)), atol=1e-5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"omnitok_tokenizer": "image_fsq"}')
    with pytest.raises(OmnitokError, match="not a speech tokenizer"):
        load_speech_tokenizer(tmp_path / "other")
    with pytest.raises(OmnitokError, match="not found"):
        load_speech_tokenizer(tmp_path / "missing")
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OmnitokError, match="safetensors"):
        load_speech_tokenizer(tmp_path / "tok")


def test_helpers() -> None:
    assert phone_units("ɐ s_m_ˈɔː_l ɚ__") == ["ɐ", "s", "m", "ˈɔː", "l", "ɚ"]
    assert phone_units("s_m_ˈɔː_l", keep_stress=False) == ["s", "m", "ɔː", "l"]
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    logits = torch.tensor([[0.0, 5, 0], [0, 5, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]])
    assert greedy_ctc(logits) == [1, 1, 2]


def test_train_logs_checkpoints_resumes(tmp_path: Path, espeak_clips: list[SpeechClip]) -> None:
    cfg = default_train_config(
        steps=6,
        batch_seconds=6.0,
        log_every=2,
        checkpoint_every=3,
        warmup_steps=2,
        f0_clips_per_class=1,
        val_clips=2,
        arch=tiny_arch(),
    )
    timed = default_train_config(**{**cfg.__dict__, "max_minutes": 0.0})
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # training uses cfg.threads (1); the caller's count must come back
    try:
        s1 = train_speech_tokenizer(
            "mem", tmp_path / "run", timed, progress=False, clips=espeak_clips, val_clips=espeak_clips[:2]
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert s1["steps"] == 1 and s1["stopped_by_time_limit"] and not s1["completed"]
    s2 = train_speech_tokenizer(
        "mem", tmp_path / "run", cfg, progress=False, clips=espeak_clips, val_clips=espeak_clips[:2]
    )
    assert s2["completed"] and s2["steps"] == 6 and s2["val"]["per"] >= 0 and s2["val"]["mel_l1"] > 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["step"] for e in log] == [2, 4, 6] and {"ctc", "mel_l1", "voice_ce", "rate_ce"} <= set(log[0])
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_cfg["command"] == "omnitok tokenizer train speech"
    ckpt = tmp_path / "run" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    tok = load_speech_tokenizer(tmp_path / "run")  # a run directory resolves to run/tokenizer
    assert tok.voices == ["us_m1", "us_f1"] and set(tok.config.f0_centroids) == {"us_m1", "us_f1"}
    assert "ˈɛ" in tok.config.phones or any("ˈ" in p for p in tok.config.phones)  # stress marks kept
    assert tok.encode(espeak_clips[0].wav, SR).shape[0] == int(np.ceil(espeak_clips[0].wav.size / 640))
    other = default_train_config(**{**cfg.__dict__, "lr": 1e-4})
    with pytest.raises(OmnitokError, match="different configuration"):
        train_speech_tokenizer("mem", tmp_path / "run", other, progress=False, clips=espeak_clips)


def test_resume_continues_exactly(tmp_path: Path, espeak_clips: list[SpeechClip]) -> None:
    # with the style adversary on: its weights live in the checkpoint too, never in the saved tokenizer
    cfg = default_train_config(
        steps=4,
        batch_seconds=6.0,
        log_every=1,
        checkpoint_every=10,
        warmup_steps=1,
        f0_clips_per_class=1,
        val_clips=1,
        adv_weight=0.5,
        arch=tiny_arch(),
    )
    kw = {"progress": False, "clips": espeak_clips, "val_clips": espeak_clips[:1]}
    train_speech_tokenizer("mem", tmp_path / "a", cfg, **kw)

    def interrupt(entry: dict) -> None:
        if entry["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_speech_tokenizer("mem", tmp_path / "b", cfg, on_log=interrupt, **kw)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    train_speech_tokenizer("mem", tmp_path / "b", cfg, **kw)
    log = json.loads((tmp_path / "b" / "log.json").read_text())
    assert {"adv_voice_ce", "adv_pitch_ce", "f0_l1", "voicing_ce"} <= set(log[-1])
    wa = SpeechTokenizer.load(tmp_path / "a").state_dict()
    wb = SpeechTokenizer.load(tmp_path / "b").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_cli_train_speech(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from omnitok.cli import app
    from omnitok.world.build import WorldConfig, build_world

    kinds = {"scene": 1.0, "spoken_qa": 0.0, "video": 0.0, "edit": 0.0, "construction": 0.0, "caption_filter": 0.0}
    build_world(tmp_path / "w", WorldConfig(n=10, seed=0, samples_per_shard=20, kind_ratios=kinds), workers=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "speech_tokenizer:\n  steps: 2\n  batch_seconds: 8\n  warmup_steps: 1\n  f0_clips_per_class: 1\n"
        "  val_clips: 1\n  kinds: [scene]\n"
        "  arch: {width: 16, enc_blocks: 1, ctc_blocks: 1, dec_blocks: 1, post_width: 8, post_blocks: 1,"
        " voice_dim: 4, rate_dim: 2, style_width: 8, gl_iters: 2}\n"
    )
    run = CliRunner().invoke(
        app, ["tokenizer", "train", "speech", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "run"),
              "--recipe", str(recipe), "--levels", "5,3", "--no-progress"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    out = " ".join(run.output.split())
    assert "tokenizer saved to" in out and "25 tokens/s" in out
    assert load_speech_tokenizer(tmp_path / "run").codebook_size == 15
    bad = CliRunner().invoke(
        app, ["tokenizer", "train", "speech", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]
    )
    assert bad.exit_code != 0


def test_training_numbers_are_checked_by_name():
    from omnitok.tokenizers.speech_train import SpeechTrainConfig

    for field, value, message in [
        ("steps", -5, "steps must be > 0, got -5"),
        ("lr", "1e-3", "lr must be a number > 0, got '1e-3'"),
        ("batch_seconds", float("nan"), "batch_seconds must be a number > 0"),
        ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ]:
        with pytest.raises(OmnitokError, match=message):
            SpeechTrainConfig.from_dict({field: value})
