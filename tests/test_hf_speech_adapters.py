"""Adapters to transformers' Encodec, Mimi and DAC codecs: tiny random configs saved and reloaded offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.hf_speech import HFSpeechTokenizer
from omnitok.tokenizers.speech import load_speech_tokenizer
from omnitok.vocab import Vocabulary

SR = 16000


def _tiny(kind: str):
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel, MimiConfig, MimiModel

    torch.manual_seed(0)
    if kind == "encodec":  # 16 kHz / 16 = 1000 frames/s; 5 bits per level: 5 and 15 kbps are 1 and 3 levels
        return EncodecModel(
            EncodecConfig(
                hidden_size=16,
                num_filters=4,
                upsampling_ratios=[4, 4],
                codebook_size=32,
                codebook_dim=16,
                num_lstm_layers=1,
                target_bandwidths=[5.0, 15.0],
                sampling_rate=SR,
            )
        )
    if kind == "mimi":
        return MimiModel(
            MimiConfig(
                hidden_size=16,
                num_filters=4,
                upsampling_ratios=[4, 4],
                codebook_size=32,
                codebook_dim=16,
                num_quantizers=4,
                vector_quantization_hidden_dimension=16,
                num_hidden_layers=1,
                intermediate_size=32,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                upsample_groups=16,
                sampling_rate=SR,
                frame_rate=500,
            )
        )
    return DacModel(DacConfig(
        encoder_hidden_size=4, downsampling_ratios=[4, 4], decoder_hidden_size=16, upsampling_ratios=[4, 4],
        n_codebooks=3, codebook_size=32, codebook_dim=4, hidden_size=32, hop_length=16, sampling_rate=SR))  # fmt: skip


def _signal(seconds: float = 0.25, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1300 * t)).astype(np.float32)


@pytest.mark.parametrize(("kind", "levels", "rate"), [("encodec", 1, 1000.0), ("mimi", 4, 500.0), ("dac", 3, 1000.0)])
def test_save_reload_encode_decode(tmp_path: Path, kind: str, levels: int, rate: float) -> None:
    HFSpeechTokenizer(_tiny(kind)).save(tmp_path / kind)
    assert json.loads((tmp_path / kind / "config.json").read_text())["model_type"] == kind
    assert (tmp_path / kind / "model.safetensors").is_file()
    tok = load_speech_tokenizer(tmp_path / kind)  # dispatches on config.json's model_type
    assert isinstance(tok, HFSpeechTokenizer)
    assert tok.sample_rate == SR and tok.frame_rate == rate and tok.num_levels == levels
    assert tok.codebook_sizes == [32] * levels and tok.codebook_size == 32 * levels
    x = _signal()
    codes = tok.encode(x, SR)
    assert codes.dtype == np.int64 and codes.shape == (int(0.25 * rate), levels)
    assert codes.min() >= 0 and codes.max() < 32
    assert tok.encode(_signal(sr=8000), 8000).shape == codes.shape  # resampled to the codec's rate
    audio = tok.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (x.size,) and np.isfinite(audio).all()
    # streaming with left context: same length, and close to the one-shot decode (exact for causal codecs)
    chunks = list(tok.decode_chunks(codes, chunk_frames=40))
    streamed = np.concatenate(chunks)
    assert len(chunks) > 3 and streamed.shape == audio.shape
    assert np.abs(streamed - audio).max() <= 0.05 * max(1e-3, np.abs(audio).max()) + 1e-4
    # the vocabulary gives each level its own id range; frames flatten level by level
    vocab = Vocabulary.build(10, {"speech": tok.codebook_sizes}, {})
    ids = vocab.codes_to_ids("speech", codes)
    assert ids.shape == (codes.size,) and np.array_equal(vocab.ids_to_codes("speech", ids).reshape(codes.shape), codes)


def test_levels_setting_is_saved_and_checked(tmp_path: Path) -> None:
    tok = HFSpeechTokenizer(_tiny("mimi"), num_levels=2)
    tok.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "omnitok_adapter.json").read_text())["num_levels"] == 2
    again = load_speech_tokenizer(tmp_path / "m")
    assert again.num_levels == 2 and again.encode(_signal(), SR).shape[1] == 2
    assert HFSpeechTokenizer.from_pretrained(tmp_path / "m", num_levels=3).num_levels == 3
    with pytest.raises(OmnitokError, match="num_levels"):
        HFSpeechTokenizer(_tiny("mimi"), num_levels=5)
    with pytest.raises(OmnitokError, match="target bandwidths"):
        HFSpeechTokenizer(_tiny("encodec"), num_levels=2)
    assert HFSpeechTokenizer(_tiny("encodec"), num_levels=3).encode(_signal(), SR).shape[1] == 3


def test_bad_input_is_refused(tmp_path: Path) -> None:
    tok = HFSpeechTokenizer(_tiny("dac"))
    with pytest.raises(OmnitokError, match="0 samples"):
        tok.encode(np.zeros(0, np.float32), SR)
    with pytest.raises(OmnitokError, match="NaN"):
        tok.encode(np.full(100, np.nan, np.float32), SR)
    with pytest.raises(OmnitokError, match="shape"):
        tok.decode(np.zeros((4, 2), np.int64))  # 2 levels for a 3-level codec
    with pytest.raises(OmnitokError, match="out of range"):
        tok.decode(np.full((4, 3), 32, np.int64))
    with pytest.warns(UserWarning, match="ignored"):
        tok.decode(np.zeros((4, 3), np.int64), style={"voice": "us_m1"})
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text('{"model_type": "encodec"}')
    with pytest.raises(OmnitokError, match="safetensors"):
        load_speech_tokenizer(tmp_path / "p")
