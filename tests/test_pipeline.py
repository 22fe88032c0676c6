"""The whole spine on a tiny world: world -> tokenizers -> pretokenize -> train -> bundle -> generate -> eval."""

import json

import numpy as np
import yaml

import omnitok
from omnitok.data.pretokenize import pretokenize
from omnitok.data.tasks import CAPTION_IMAGE_DROP
from omnitok.eval.suite import EvalConfig, choose_text_cfg_scale, evaluate
from omnitok.sequence import Image, Text
from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from omnitok.train.loop import train
from omnitok.train.recipe import load_recipe
from omnitok.world.build import WorldConfig, build_world
from omnitok.world.read import iter_samples


def test_world_to_bundle_to_eval(tmp_path):
    build_world(tmp_path / "world", WorldConfig(n=40, seed=0, speech=False, samples_per_shard=50), workers=1)
    ImageTokenizer(ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4))).save(
        tmp_path / "imgtok"
    )
    tasks = ["caption", "t2i", "interleaved"]
    pretokenize(tmp_path / "world", tmp_path / "tokens", tmp_path / "imgtok", tasks=tasks, text_vocab_size=300)
    recipe = {
        "name": "pipeline",
        "seed": 0,
        "data": str(tmp_path / "tokens"),
        "out": str(tmp_path / "run"),
        "model": {
            "arch": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
        },
        "batch": {"seq_len": 256, "micro_batch": 2, "grad_accum": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"every": 1, "tensorboard": False},
        "code_embeddings": "codec",  # image rows start from the tokenizer's code vectors (read via tokens/config.json)
        "stages": [
            {"name": "align", "steps": 3, "mixture": {"caption": 0.5, "t2i": 0.5}},
            {"name": "docs", "steps": 2, "mixture": {"interleaved": 1.0}},
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = train(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert result["step"] == 5
    bundle = tmp_path / "run" / "bundle"
    manifest = json.loads((bundle / "omnitok.json").read_text())
    assert set(manifest["tokenizers"]) == {"text", "image"}
    assert manifest["read_aloud_words"] == 2  # the TTS layout pretokenize wrote, carried for generation to decode

    model = omnitok.load(str(bundle))
    assert model.bundle.read_aloud_words == 2
    # and the caption task's picture drop, which guidance for reading needs (omnitok.generate, text_cfg_scale)
    assert manifest["caption_image_drop"] == model.bundle.caption_image_drop == CAPTION_IMAGE_DROP > 0
    out = model.generate([Text("a large red circle in the top left")], output="image", seed=0)
    assert out[0].pixels.shape == (64, 64, 3)
    out = model.generate(
        [Image(pixels=np.zeros((64, 64, 3), np.uint8)), Text("Describe the picture.")], output="text", max_new_tokens=5
    )
    assert all(isinstance(s, Text) for s in out)
    metrics = evaluate(model, tmp_path / "world", tmp_path / "eval", EvalConfig(limit=2, tasks=["caption", "t2i"]))
    assert metrics["caption_acc"]["n"]["all"] == 2 and (tmp_path / "eval" / "report.html").exists()
    assert metrics["_meta"]["text_cfg_scale"] == 1.0

    # The demo chooses guidance for reading on the val split: on where it writes clearly more exact captions
    scale, scores = choose_text_cfg_scale(model, tmp_path / "world", limit=4)
    assert set(scores) == {"1.0", "3.0"} and scale == (3.0 if scores["3.0"] >= scores["1.0"] + 0.25 else 1.0)
    truth = {s["png"].tobytes(): s["meta"]["captions"][0] for s in iter_samples(tmp_path / "world", "val", "scene")}
    generate_batch = model.generate_batch

    def reads_when_guided(prompts, **kw):  # a model whose captions are exact only with guidance at 3
        if kw.get("text_cfg_scale") != 3.0:
            return generate_batch(prompts, **kw)
        return [[Text(truth[p[0].pixels.tobytes()], role="assistant")] for p in prompts]

    model.generate_batch = reads_when_guided
    assert choose_text_cfg_scale(model, tmp_path / "world", limit=4) == (3.0, {"1.0": scores["1.0"], "3.0": 1.0})
    model.bundle.caption_image_drop = 0.0  # a bundle that never learned captions without a picture: not measured
    assert choose_text_cfg_scale(model, tmp_path / "world", limit=4) == (1.0, {})

    # The command line evaluates on a named device, and runs where the serving extras are not installed (a GPU
    # training machine's image has no FastAPI): `omnitok.serve` is imported only when `serve` runs.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'multipart'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from omnitok.cli import main\n"
        "sys.argv = ['omnitok', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = [str(bundle), "--data", str(tmp_path / "world"), "--out", str(tmp_path / "eval-cli"), "--limit", "1"]
    done = subprocess.run(
        [sys.executable, "-c", code, "eval", *args, "--tasks", "caption", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval-cli" / "metrics.json").read_text())["caption_acc"]["n"]["all"] == 1
