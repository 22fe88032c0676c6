"""Image position embeddings: the right index for every code, the same logits cached or not, saved and restored."""

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import omnitok
from omnitok import image_positions
from omnitok.bundle import save_bundle
from omnitok.constraints import ModalityConstraint
from omnitok.data.pretokenize import pretokenize
from omnitok.decoding import DecodeConfig, Sampling, decode_tokens
from omnitok.errors import OmnitokError
from omnitok.model import check_model_spec
from omnitok.sequence import Text
from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from omnitok.tokenizers.text import TextTokenizer
from omnitok.train.loop import _optimizers, train
from omnitok.train.recipe import OptimConfig, load_recipe, parse_recipe
from omnitok.vocab import FRAME, Vocabulary
from omnitok.world.build import WorldConfig, build_world
from tiny_models import TINY_LLAMA

GRID = 4  # codes per picture in these tests


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.build(40, {"image": 16, "speech": 8})


def _model(vocab, table=True, seed=0, tie=False):
    torch.manual_seed(seed)
    shape = {k: v for k, v in TINY_LLAMA.items() if k != "arch"}
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab.size, **shape, tie_word_embeddings=tie)).eval()
    if table:
        r = vocab.code_range("image")
        t = image_positions.add_image_positions(
            lm, GRID, (r.start, r.stop), [vocab.special("<image>"), vocab.special(FRAME)]
        )
        with torch.no_grad():
            t.weight.normal_(0, 1.0)  # trained-looking: large enough to change every logit it touches
    return lm


def _codes(vocab, *codes):
    return [int(i) for i in vocab.codes_to_ids("image", np.asarray(codes))]


def test_positions_count_codes_from_each_opener_and_chunks_agree(vocab):
    lm = _model(vocab)
    table = image_positions.get(lm)
    img, frame, video = vocab.special("<image>"), vocab.special(FRAME), vocab.special("<video>")
    ids = [1, 5, img, *_codes(vocab, 3, 4, 5, 6), vocab.special("</image>"), 7, video, frame]
    ids += [*_codes(vocab, 1, 2, 3, 4), frame, *_codes(vocab, 9, 9)]
    row = torch.tensor([ids])
    pos, last = table.positions(row)
    want = [-1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 0, 1, 2, 3, -1, 0, 1]
    assert pos[0].tolist() == want and int(last[0]) == len(ids) - 3
    # the prompt first, then one token at a time (a KV-cached decoder): the same indices
    cut = 4
    pos_a, last = table.positions(row[:, :cut])
    got = pos_a[0].tolist()
    for k in range(cut, len(ids)):
        p, last = table.positions(row[:, k : k + 1], start=k, last_opener=last)
        got.append(int(p[0, 0]))
    assert got == want
    # a code before any opener (a training row cut inside a picture) gets no position, not a wrong one
    assert table.positions(torch.tensor([_codes(vocab, 1, 2)]))[0].tolist() == [[-1, -1]]


def test_a_zero_table_changes_nothing_and_a_trained_one_only_image_codes(vocab):
    plain = _model(vocab, table=False)
    with_table = _model(vocab, table=False)
    r = vocab.code_range("image")
    image_positions.add_image_positions(with_table, GRID, (r.start, r.stop), [vocab.special("<image>")])
    ids = torch.tensor([[1, 5, vocab.special("<image>"), *_codes(vocab, 3, 4, 5, 6)]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, with_table(ids).logits)
        image_positions.get(with_table).weight.normal_()
        moved = (plain(ids).logits - with_table(ids).logits).abs().amax(-1)[0]
    assert moved[:3].max() == 0 and moved[3:].min() > 0  # causal: only positions at or after the first code move


def test_cached_greedy_decoding_matches_full_recomputation(vocab):
    lm = _model(vocab)
    prompts = [
        torch.tensor([1, 5, 6, vocab.special("<|user|>"), vocab.special("<image>")]),
        torch.tensor([1, 7, vocab.special("<image>")]),
    ]
    constraint = ModalityConstraint(vocab, image_tokens=GRID, outputs=("image",))
    cfg = DecodeConfig(max_new_tokens=GRID + 1, image=Sampling(0.0))
    ours = decode_tokens(lm, prompts, constraint, cfg)
    r = vocab.code_range("image")
    for prompt, got in zip(prompts, ours, strict=True):
        seq = prompt.tolist()
        for _ in range(GRID):  # no cache: every step runs the whole sequence, positions found from the opener
            with torch.no_grad():
                logits = lm(torch.tensor([seq])).logits[0, -1, r.start : r.stop]
            seq.append(int(logits.argmax()) + r.start)
        assert got[:GRID] == seq[len(prompt) :]


def test_a_cached_step_inside_a_picture_without_positions_is_refused(vocab):
    lm = _model(vocab)
    ids = torch.tensor([[1, vocab.special("<image>"), *_codes(vocab, 3)]])
    out = lm(ids, use_cache=True)
    name = "cache" if hasattr(out, "cache") else "past_key_values"  # transformers 5 renamed it
    with pytest.raises(OmnitokError, match="image_positions="):
        lm(torch.tensor([_codes(vocab, 4)]), use_cache=True, **{name: getattr(out, name)})


def test_the_table_trains_with_adamw_not_muon(vocab):
    lm = _model(vocab)
    opts = _optimizers(lm, OptimConfig(name="muon", lr=1e-3), torch.device("cpu"))
    adamw = {id(p) for g in opts[0].param_groups for p in g["params"]}
    muon = {id(p) for g in opts[1].param_groups for p in g["params"]}
    table = image_positions.get(lm).weight
    assert id(table) in adamw and id(table) not in muon


def test_bundle_round_trip_keeps_the_table_and_refuses_a_missing_file(vocab, tmp_path):
    text = TextTokenizer.train(["a red circle", "a blue star"] * 10, vocab_size=270)
    text.save(tmp_path / "text")
    img = ImageTokenizer(ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4)))
    img.save(tmp_path / "image")
    v = Vocabulary.build(text.vocab_size, {"image": img.codebook_size})
    lm = _model(v, tie=True)  # the demo's LM ties its head to the embedding: saved once, restored tied
    save_bundle(tmp_path / "b", lm, v, tmp_path / "text", tmp_path / "image")
    assert (tmp_path / "b" / "lm" / image_positions.FILENAME).is_file()
    loaded = omnitok.load(str(tmp_path / "b"))
    assert torch.equal(image_positions.get(loaded.lm).weight, image_positions.get(lm).weight)
    assert len([k for k in loaded.lm.state_dict() if "image_positions" in k]) == 1
    assert loaded.lm.get_output_embeddings().weight is loaded.lm.get_input_embeddings().weight
    ids = torch.tensor([[1, v.special("<image>"), *_codes(v, 3, 4, 5)]])
    with torch.no_grad():
        assert torch.allclose(loaded.lm(ids).logits, lm(ids).logits)
    (tmp_path / "b" / "lm" / image_positions.FILENAME).unlink()
    with pytest.raises(OmnitokError, match=r"image_positions\.safetensors is missing"):
        omnitok.load(str(tmp_path / "b"))


def test_recipe_value_is_checked():
    with pytest.raises(OmnitokError, match=r"model\.image_positions: expected true or false"):
        check_model_spec({"arch": "llama", "image_positions": "yes"})


def test_training_with_image_positions_ends_with_a_bundle_that_draws(tmp_path):
    build_world(tmp_path / "world", WorldConfig(n=30, seed=0, speech=False, samples_per_shard=50), workers=1)
    ImageTokenizer(ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4))).save(
        tmp_path / "imgtok"
    )
    pretokenize(tmp_path / "world", tmp_path / "tokens", tmp_path / "imgtok", tasks=["t2i"], text_vocab_size=300)
    recipe = {
        "name": "positions",
        "data": str(tmp_path / "tokens"),
        "out": str(tmp_path / "run"),
        "model": {**TINY_LLAMA, "num_hidden_layers": 1, "max_position_embeddings": 512, "image_positions": True},
        "batch": {"seq_len": 256, "micro_batch": 2, "grad_accum": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 1},
        "log": {"every": 1, "tensorboard": False},
        "stages": [{"name": "draw", "steps": 3, "mixture": {"t2i": 1.0}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(tmp_path / "r.yaml"), progress=False, max_steps=2)  # stops with a checkpoint holding the table
    recipe["model"]["image_positions"] = False
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(OmnitokError, match="do not fit the recipe's model"):
        train(load_recipe(tmp_path / "off.yaml"), progress=False)
    assert train(load_recipe(tmp_path / "r.yaml"), progress=False)["step"] == 3  # the table resumes with the rest
    model = omnitok.load(str(tmp_path / "run" / "bundle"))
    table = image_positions.get(model.lm)
    assert table is not None and table.tokens == 64 and float(table.weight.detach().abs().sum()) > 0  # it learned
    out = model.generate([Text("a large red circle in the top left")], output="image", seed=0)
    assert out[0].pixels.shape == (64, 64, 3)

    # Training goes on from the bundle's LM (model.pretrained: a further stage): its learned table and its trained
    # code rows come with it, not a zero table and a second codec projection on top of trained rows.
    bundle_lm = model.lm
    go_on = {
        **recipe,
        "out": str(tmp_path / "more"),
        "model": {"pretrained": str(tmp_path / "run" / "bundle" / "lm")},
        "code_embeddings": "codec",
        "optim": {"lr": 1e-12, "warmup_steps": 0, "schedule": "constant"},
        "stages": [{"name": "more", "steps": 1, "mixture": {"t2i": 1.0}}],
    }
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(go_on))
    train(load_recipe(tmp_path / "more.yaml"), progress=False)
    more = omnitok.load(str(tmp_path / "more" / "bundle")).lm
    torch.testing.assert_close(image_positions.get(more).weight, table.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        more.get_input_embeddings().weight, bundle_lm.get_input_embeddings().weight, atol=1e-6, rtol=0
    )


def test_a_pretrained_lm_with_image_positions_must_fit_the_token_directory(tmp_path, monkeypatch):
    from omnitok.train import loop

    vocab = Vocabulary.build(40, {"image": 16, "speech": 8})
    lm = _model(vocab)
    image_positions.save(lm, tmp_path / "lm")
    recipe = parse_recipe(
        {
            "name": "more",
            "data": str(tmp_path),
            "out": str(tmp_path / "run"),
            "model": {"pretrained": str(tmp_path / "lm")},
            "batch": {"seq_len": 64, "micro_batch": 1},
            "optim": {"lr": 1e-3},
            "stages": [{"name": "s", "steps": 1, "mixture": {"t2i": 1.0}}],
        }
    )
    r, openers = vocab.code_range("image"), [vocab.special("<image>"), vocab.special(FRAME)]
    monkeypatch.setattr(loop, "_image_layout", lambda _: (GRID * 2, (r.start, r.stop), openers))
    with pytest.raises(OmnitokError, match=r"model\.pretrained: its image positions are for 4 codes"):
        loop._build(recipe, vocab.size)
    monkeypatch.setattr(loop, "_image_layout", lambda _: (GRID, (r.start, r.stop), openers))
    assert torch.equal(image_positions.get(loop._build(recipe, vocab.size)).weight, image_positions.get(lm).weight)
