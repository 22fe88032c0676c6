"""Two ranks under torchrun (gloo, CPU) see the same global batch as one process and get the same losses."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from omnitok.train.loop import train
from omnitok.train.recipe import load_recipe
from omnitok.train.synthetic import write_synthetic_tokens


def _recipe(tmp_path, tokdir, name, micro_batch, optimizer):
    raw = {
        "name": name,
        "seed": 1,
        "data": str(tokdir),
        "out": str(tmp_path / name),
        "model": {
            "arch": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        },
        "batch": {"seq_len": 64, "micro_batch": micro_batch, "grad_accum": 2},
        "optim": {"name": optimizer, "lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.1},
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"every": 1, "tensorboard": False},
        "precision": "fp32",  # exact equality across rank layouts; bf16 rounds differently per batch split
        "stages": [{"name": "s", "steps": 4, "mixture": {"caption": 0.4, "asr": 0.6}}],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_gloo_ranks_match_one_process(tmp_path, optimizer):
    tokdir = tmp_path / "tokens"
    write_synthetic_tokens(tokdir, vocab_size=64, tasks={"caption": (4, 20), "asr": (10, 50)}, docs=40)
    # Same global batch: 1 process x 4 rows x 2 micro-steps == 2 ranks x 2 rows x 2 micro-steps.
    single = _recipe(tmp_path, tokdir, "single", micro_batch=4, optimizer=optimizer)
    ddp = _recipe(tmp_path, tokdir, "ddp", micro_batch=2, optimizer=optimizer)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "omnitok",
        "train",
        str(ddp),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_recipe(single), progress=False)  # meanwhile, in this process
    finally:
        torch.set_num_threads(threads)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output

    reference, got = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(got) == len(reference) == 4
    assert got == pytest.approx(reference, abs=1e-5, rel=0)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
