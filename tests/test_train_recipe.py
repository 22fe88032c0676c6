import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

from omnitok.errors import OmnitokError
from omnitok.train import loop
from omnitok.train.recipe import check_data, load_recipe, parse_recipe, recipe_mapping
from omnitok.train.synthetic import write_synthetic_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_synthetic_tokens(path, vocab_size=64, tasks={"caption": (4, 10), "t2i": (8, 16)}, docs=10)
    return path


@pytest.fixture
def raw(tokdir, tmp_path):
    return {
        "name": "t",
        "data": str(tokdir),
        "out": str(tmp_path / "out"),
        "model": {
            "arch": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        "batch": {"seq_len": 32, "micro_batch": 2},
        "optim": {"lr": "3e-3"},  # YAML 1.1 reads 3e-3 as a string; it is still a number here
        "stages": [
            {"name": "a", "steps": 2, "mixture": {"caption": 1.0}},
            {"name": "b", "steps": 2, "mixture": {"caption": 0.4, "t2i": 0.6}, "lr": 1e-3, "seq_len": 16},
        ],
    }


def test_valid_recipe_resolves(raw):
    r = parse_recipe(raw)
    assert r.optim.lr == 0.003 and r.optim.betas == (0.9, 0.95)
    assert r.stages[1].batch(r.batch).seq_len == 16 and r.stages[1].optim(r.optim).lr == 1e-3
    assert r.stages[0].optim(r.optim).lr == 0.003
    assert r.tasks == ["caption", "t2i"]
    assert check_data(r) == 64
    assert json.loads(json.dumps(r.to_dict()))["data"] == raw["data"]
    other = copy.deepcopy(raw)
    other["out"] = "elsewhere"
    assert parse_recipe(other).hash() == r.hash()  # where it is written is not what is trained
    other["seed"] = 1
    assert parse_recipe(other).hash() != r.hash()


def _edit(raw, path, value):
    node = raw
    *parents, last = path
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("optimm",), {}, r"^optimm: unknown key; expected one of \["),
        (("optim", "lrr"), 1.0, r"^optim\.lrr: unknown key"),
        (("stages", 0, "mixtur"), {}, r"^stages\[0\]\.mixtur: unknown key"),
        (("batch", "seq_len"), "long", r"^batch\.seq_len: expected int, got 'long'"),
        (("batch", "micro_batch"), 0, r"^batch\.micro_batch: must be > 0, got 0"),
        (("optim", "betas"), [0.9], r"^optim\.betas: expected tuple"),
        (("log",), {"every": True}, r"^log\.every: expected int, got True"),
        (
            ("stages", 1, "mixture"),
            {"caption": 0.3, "t2i": 0.6},
            r"^stages\[1\]\.mixture: weights must sum to 1, got 0\.9$",
        ),
        (("stages", 1, "mixture"), {"caption": 1.5, "t2i": -0.5}, r"^stages\[1\]\.mixture\.t2i: weight must be >= 0"),
        (("stages", 0, "trainable"), "some", r"^stages\[0\]\.trainable: expected one of \['all', 'new_embeddings'\]"),
        (
            ("stages", 0, "trainable"),
            "new_embeddings",
            r"^stages\[0\]\.trainable: new_embeddings needs model\.pretrained",
        ),
        (("stages", 1, "name"), "a", r"^stages\[1\]\.name: 'a' is used by more than one stage"),
        (("stages",), [], r"^stages: at least one stage"),
        (("optim", "schedule"), "step", r"^optim\.schedule: expected one of"),
        (("optim", "name"), "sgd", r"^optim\.name: expected one of \['adamw', 'muon'\], got 'sgd'"),
        (("distributed",), {"strategy": "fsdpp"}, r"^distributed\.strategy: expected one of"),
        (("model", "hidden_sise"), 8, r"^model\.hidden_sise: not a field of LlamaConfig"),
        (("model", "num_hidden_layers"), -1, r"^model\.num_hidden_layers: expected a positive integer, got -1"),
        (("model", "hidden_size"), "big", r"^model\.hidden_size: expected a positive integer, got 'big'"),
        (("model", "num_attention_heads"), 3, r"^model: not a valid LlamaConfig: .*not a multiple of the number"),
        (("name",), KeyError, r"^name: required"),
        (("precision",), "fp8", r"^precision: expected one of"),
    ],
)
def test_shape_errors_name_the_field(raw, path, value, message):
    with pytest.raises(OmnitokError, match=message):
        parse_recipe(_edit(raw, path, value))


def test_muon_needs_whole_matrices(raw):
    raw["optim"]["name"] = "muon"
    parse_recipe(raw)
    raw["distributed"] = {"strategy": "fsdp"}
    with pytest.raises(OmnitokError, match=r"^optim\.name: 'muon' needs whole weight matrices.*strategy ddp"):
        parse_recipe(raw)


def test_unknown_task_is_named(raw):
    r = parse_recipe(_edit(raw, ("stages", 1, "mixture"), {"caption": 0.5, "speech": 0.5}))
    with pytest.raises(OmnitokError, match=r"^stages\[1\]\.mixture\.speech: unknown task; .* has \['caption', 't2i'\]"):
        check_data(r)


def test_a_task_the_shards_predate_says_to_pretokenize_again(raw):
    r = parse_recipe(_edit(raw, ("stages", 1, "mixture"), {"caption": 0.5, "vqa": 0.5}))
    with pytest.raises(OmnitokError, match=r"^stages\[1\]\.mixture\.vqa: .* no 'vqa' documents .* pretokenize again"):
        check_data(r)


def test_a_row_too_short_for_the_targets_is_refused(tokdir, tmp_path):
    # documents whose answer starts past seq_len would train on nothing and log loss 0.0
    long = tmp_path / "long"
    write_synthetic_tokens(long, vocab_size=64, tasks={"caption": (60, 90)}, docs=10)
    raw = {
        "name": "t", "data": str(long), "out": str(tmp_path / "out"), "batch": {"seq_len": 4, "micro_batch": 2},
        "model": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        "stages": [{"name": "a", "steps": 2, "mixture": {"caption": 1.0}}], "optim": {"lr": 3e-3},
    }  # fmt: skip
    with pytest.raises(OmnitokError, match=r"^stages\[0\]: batch\.seq_len 4 cuts most caption documents"):
        check_data(parse_recipe(raw))
    raw["batch"]["seq_len"] = 64
    check_data(parse_recipe(raw))


def test_missing_data(raw, tmp_path):
    with pytest.raises(OmnitokError, match=r"^data: token directory .*nowhere does not exist"):
        check_data(parse_recipe(_edit(raw, ("data",), str(tmp_path / "nowhere"))))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OmnitokError, match=r"^data: .*a_file is a file; give the token directory"):
        check_data(parse_recipe(_edit(raw, ("data",), str(tmp_path / "a_file"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmnitokError, match=r"^data: .*manifest\.json is missing"):
        check_data(parse_recipe(_edit(raw, ("data",), str(tmp_path / "empty"))))


def test_vocab_mismatch_with_checkpoint_fails_before_the_model_is_built(raw, monkeypatch):
    r = parse_recipe(raw)
    stale = r.out / "checkpoints" / "step-000005"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"format": "omnitok-trainer-state", "vocab_size": 60}))

    def no_build(*a, **k):
        raise AssertionError("model built before the recipe was checked")

    monkeypatch.setattr(loop, "build_model", no_build)
    with pytest.raises(
        OmnitokError,
        match=r"^data: .*vocab\.json has size 64 but checkpoint .*step-000005 was trained "
        r"with vocab_size 60",
    ):
        loop.train(r, progress=False)
    with pytest.raises(OmnitokError, match=r"^out: .* already holds checkpoints"):
        loop.train(r, resume=False, progress=False)


def test_yaml_file_errors_name_the_file(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_edit(raw, ("batch", "grad_acum"), 2)))
    with pytest.raises(OmnitokError, match=r"^recipe .*r\.yaml: batch\.grad_acum: unknown key"):
        load_recipe(path)
    path.write_text("stages: [unclosed")
    with pytest.raises(OmnitokError, match="is not valid YAML"):
        load_recipe(path)
    with pytest.raises(OmnitokError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_shipped_tiny_recipe_parses():
    r = load_recipe(REPO / "recipes" / "tiny.yaml")
    assert [s.name for s in r.stages] == ["align", "all"]


def test_cli_reports_one_error_line(tmp_path, raw, monkeypatch, capsys):
    from omnitok.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_edit(raw, ("stages", 0, "mixture"), {"caption": 0.5})))
    monkeypatch.setattr(sys, "argv", ["omnitok", "train", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error:") and "stages[0].mixture: weights must sum to 1, got 0.5" in err


@pytest.mark.parametrize(
    "name", ["tiny.yaml", "toyworld.yaml", "toyworld_long.yaml", "toyworld_gpu.yaml", "toyworld_small.yaml"]
)
def test_shipped_lm_recipes_validate(name):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / name)
    assert recipe.stages and all(s.steps > 0 and s.mixture for s in recipe.stages)


def test_a_recipe_states_only_what_it_changes_from_its_base(tmp_path, raw):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    variant = tmp_path / "sub" / "small.yaml"
    # mappings merge key by key; a list (the stages) or a number is replaced whole; base is relative to the recipe
    stages = [{"name": "only", "steps": 3, "mixture": {"caption": 1.0}}]
    variant.write_text(
        yaml.safe_dump({"base": "../base.yaml", "name": "small", "model": {"hidden_size": 32}, "stages": stages})
    )
    got, base = load_recipe(variant), load_recipe(tmp_path / "base.yaml")
    # what a tool that edits recipes before parsing them reads: the merged mapping, without the base key
    merged = recipe_mapping(variant)
    assert "base" not in merged and merged["model"]["hidden_size"] == 32 and merged["optim"] == raw["optim"]
    assert got.name == "small" and got.model == {**base.model, "hidden_size": 32}
    assert [(s.name, s.steps) for s in got.stages] == [("only", 3)]
    assert (got.optim, got.batch, got.data) == (base.optim, base.batch, base.data)
    # a variant of a variant: the chain is merged in order
    (tmp_path / "sub" / "smaller.yaml").write_text(yaml.safe_dump({"base": "small.yaml", "seed": 7}))
    chained = load_recipe(tmp_path / "sub" / "smaller.yaml")
    assert chained.seed == 7 and chained.model == got.model and chained.name == "small"
    # the shipped small demo recipe is the demo's with a narrower model, nothing else
    shipped, demo = (
        load_recipe(REPO / "recipes" / "toyworld_small.yaml"),
        load_recipe(REPO / "recipes" / "toyworld.yaml"),
    )
    assert shipped.model["hidden_size"] < demo.model["hidden_size"]
    assert {k for k, v in shipped.to_dict().items() if demo.to_dict()[k] != v} == {"name", "out", "model"}


def test_a_bad_base_is_named_with_the_recipe_that_names_it(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base": "gone.yaml", "seed": 1}))
    with pytest.raises(OmnitokError, match=r"recipe .*gone\.yaml not found \(the base of .*r\.yaml\)"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({"base": 3}))
    with pytest.raises(OmnitokError, match=r"r\.yaml: base: expected the path of another recipe, got 3"):
        load_recipe(path)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": "b.yaml"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml"}))
    with pytest.raises(OmnitokError, match=r"base: chain comes back to"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "list.yaml").write_text("[1, 2]")
    path.write_text(yaml.safe_dump({"base": "list.yaml"}))
    with pytest.raises(OmnitokError, match=r"its base .*list\.yaml is not a YAML mapping"):
        load_recipe(path)
    # a key the base does not know is still refused by name, after the merge
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    path.write_text(yaml.safe_dump({"base": "base.yaml", "model": {"hiden_size": 8}}))
    with pytest.raises(OmnitokError, match=r"hiden_size"):
        load_recipe(path)
