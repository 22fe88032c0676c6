import pytest
import torch

from omnitok.errors import OmnitokError
from omnitok.model import base_vocab_size, build_model, check_model_spec, init_code_embeddings
from tiny_models import TINY_LLAMA as TINY


def test_build_from_config():
    model = build_model(TINY, 77)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().num_embeddings == 77 == model.config.vocab_size
    assert model.dtype == torch.float32 and base_vocab_size(model) == 0
    other = build_model({"arch": "qwen2", **{k: v for k, v in TINY.items() if k != "arch"}}, 40)
    assert type(other).__name__ == "Qwen2ForCausalLM"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**TINY, "hiden_size": 3}, r"model\.hiden_size: not a field of LlamaConfig"),
        ({"arch": "no-such-model"}, r"model\.arch: 'no-such-model' is not a transformers causal-LM"),
        ({**TINY, "vocab_size": 10}, r"model\.vocab_size: set by the token directory"),
        ({**TINY, "attn_implementation": "fast"}, r"model\.attn_implementation"),
        ({"pretrained": "/does/not/exist"}, r"model\.pretrained: /does/not/exist is not a saved transformers model"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(OmnitokError, match=message):
        check_model_spec(spec)


@pytest.fixture
def saved_base(tmp_path):
    torch.manual_seed(0)
    base = build_model({**TINY, "tie_word_embeddings": False}, 60)
    base.save_pretrained(tmp_path / "base")
    return base, tmp_path / "base"


def test_pretrained_vocabulary_grows_with_mean_rows(saved_base):
    base, path = saved_base
    model = build_model({"pretrained": str(path)}, 75)
    assert base_vocab_size(model) == 60
    for old, new in (
        (base.get_input_embeddings(), model.get_input_embeddings()),
        (base.get_output_embeddings(), model.get_output_embeddings()),
    ):
        assert new.weight.shape == (75, 32)
        assert torch.equal(new.weight[:60], old.weight)  # old rows untouched
        mean = old.weight.mean(0)
        torch.testing.assert_close(new.weight[60:], mean.expand(15, -1), atol=1e-4, rtol=0)
    # same weights elsewhere
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)


def test_pretrained_same_size_and_shrink(saved_base):
    _, path = saved_base
    assert build_model({"pretrained": str(path)}, 60).get_input_embeddings().num_embeddings == 60
    with pytest.raises(OmnitokError, match="has 60 embedding rows but the token vocabulary has only 50"):
        build_model({"pretrained": str(path)}, 50)
    with pytest.raises(OmnitokError, match=r"model\.hidden_size: not allowed with model\.pretrained"):
        build_model({"pretrained": str(path), "hidden_size": 8}, 60)


@pytest.mark.parametrize("tied", [True, False])
def test_code_embeddings_follow_the_codec(tied):
    """Codes that are neighbours on the codec's grid start with closer rows than far-apart codes; others untouched."""
    from omnitok.tokenizers.quantizers import FSQ

    torch.manual_seed(0)
    model = build_model({**TINY, "hidden_size": 64, "tie_word_embeddings": tied}, vocab_size=200)
    fsq = FSQ((5, 5, 5))  # 125 codes at rows 40..164
    vectors = fsq.indices_to_codes(torch.arange(125))
    before = model.get_input_embeddings().weight.detach().clone()
    assert init_code_embeddings(model, [(40, vectors)], seed=1) == [(40, 165)]
    after = model.get_input_embeddings().weight.detach()
    assert torch.equal(before[:40], after[:40]) and torch.equal(before[165:], after[165:])

    def follows_codec(rows):  # distances between rows track distances between code vectors
        i, j = torch.triu_indices(len(rows), len(rows), offset=1)
        d_rows, d_codes = torch.cdist(rows, rows)[i, j], torch.cdist(vectors, vectors)[i, j]
        return float(torch.corrcoef(torch.stack([d_rows, d_codes]))[0, 1])

    assert follows_codec(after[40:165]) > 0.5 and abs(follows_codec(before[40:165])) < 0.1
    # the spread of the rows grows by about sqrt(2): random part and codec part have the same size
    assert 1.2 < float(after[40:165].std() / before[40:165].std()) < 1.6
    if not tied:
        assert follows_codec(model.get_output_embeddings().weight.detach()[40:165]) > 0.5


def test_code_embeddings_out_of_range():
    model = build_model(TINY, vocab_size=50)
    with pytest.raises(OmnitokError, match="exceed the 50 embedding rows"):
        init_code_embeddings(model, [(40, torch.zeros(20, 3))])
