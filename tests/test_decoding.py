"""The decoding loop: same greedy tokens as transformers.generate, CFG, streaming, sampling filters."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from omnitok.constraints import ModalityConstraint
from omnitok.decoding import ConstraintProcessor, DecodeConfig, Sampling, _filter, decode_tokens
from omnitok.errors import OmnitokError
from omnitok.vocab import Vocabulary


@pytest.fixture(scope="module")
def setup():
    vocab = Vocabulary.build(64, {"image": 16, "speech": [8, 8]}, {"pitch": ["low", "high"]})
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=vocab.special("<|pad|>"),
        eos_token_id=vocab.special("<|eos|>"),
    )
    return vocab, LlamaForCausalLM(cfg).eval()


def _prompts(vocab):
    a = torch.tensor(
        [
            vocab.special("<|bos|>"),
            vocab.special("<|user|>"),
            5,
            6,
            7,
            vocab.special("<|end|>"),
            vocab.special("<|assistant|>"),
        ]
    )
    b = torch.tensor(
        [
            vocab.special("<|bos|>"),
            vocab.special("<|user|>"),
            9,
            vocab.special("<|end|>"),
            vocab.special("<|assistant|>"),
        ]
    )
    return [a, b]


def test_greedy_matches_transformers_generate_with_left_padding(setup):
    vocab, model = setup
    constraint = ModalityConstraint(vocab, image_tokens=4)
    cfg = DecodeConfig(max_new_tokens=12, text=Sampling(0.0), image=Sampling(0.0), speech=Sampling(0.0))
    ours = decode_tokens(model, _prompts(vocab), constraint, cfg)
    for prompt, mine in zip(_prompts(vocab), ours, strict=True):
        ref = model.generate(
            prompt.view(1, -1),
            max_new_tokens=12,
            do_sample=False,
            logits_processor=LogitsProcessorList([ConstraintProcessor(constraint)]),
        )[0, len(prompt) :].tolist()
        eos = vocab.special("<|eos|>")
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert mine == ref


def test_forced_image_output_has_the_exact_grid(setup):
    vocab, model = setup
    constraint = ModalityConstraint(vocab, image_tokens=6, outputs=["image"])
    out = decode_tokens(
        model, _prompts(vocab), constraint, DecodeConfig(max_new_tokens=10), generator=torch.Generator().manual_seed(0)
    )
    img = vocab.code_range("image")
    for row in out:
        assert row[0] == vocab.special("<image>") and row[7] == vocab.special("</image>")
        assert all(img.start <= t < img.stop for t in row[1:7])


def test_cfg_runs_both_rows_and_streams(setup):
    vocab, model = setup
    constraint = ModalityConstraint(vocab, image_tokens=4, outputs=["image"])
    seen = []
    prompts = _prompts(vocab)
    uncond = [
        torch.tensor(
            [
                vocab.special("<|bos|>"),
                vocab.special("<|user|>"),
                vocab.special("<|end|>"),
                vocab.special("<|assistant|>"),
            ]
        )
    ] * 2
    out = decode_tokens(
        model,
        prompts,
        constraint,
        DecodeConfig(max_new_tokens=8, cfg_scale=3.0),
        uncond_prompts=uncond,
        on_token=lambda t, s: seen.append(t.clone()),
        generator=torch.Generator().manual_seed(1),
    )
    assert len(seen) == len(out[0]) and all(t.shape == (2,) for t in seen)
    assert all(r[0] == vocab.special("<image>") for r in out)
    with pytest.raises(OmnitokError, match="one prompt per"):
        decode_tokens(model, prompts, constraint, DecodeConfig(cfg_scale=2.0), uncond_prompts=uncond[:1])


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(_filter(logits, Sampling(top_k=2))[0, 2:]).all()
    kept = ~torch.isinf(_filter(logits, Sampling(top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    with pytest.raises(OmnitokError):
        Sampling(top_p=0.0)


def test_sampling_overrides_start_from_each_modalitys_default():
    from omnitok.decoding import IMAGE_SAMPLING, sampling_overrides

    got = sampling_overrides(["image=0.7", "speech=0"], ["image=16"], ["text=0.9"])
    assert got["image"] == Sampling(temperature=0.7, top_k=16) and got["speech"].temperature == 0.0
    assert got["speech"].top_k == 32 and got["text"] == Sampling(temperature=0.0, top_p=0.9)
    assert sampling_overrides(["image=1"])["image"].top_k == IMAGE_SAMPLING.top_k  # the default's top-k stays
    assert sampling_overrides() == {}
    for args, msg in (
        ((["video=1"],), "MODALITY one of"),
        ((["image"],), "MODALITY=VALUE"),
        ((["image=hot"],), "'hot' is not a number"),
        (([], ["image=2.5"]), "not an integer"),
        ((["image=-1"],), "image sampling: bad sampling settings"),
        (([], [], ["speech=0"]), "speech sampling"),
    ):
        with pytest.raises(OmnitokError, match=msg):
            sampling_overrides(*args)
