import importlib.util
import itertools
import json
import shutil
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from omnitok.errors import OmnitokError
from omnitok.model import build_model
from omnitok.train.checkpoint import list_checkpoints, load_trainer_state
from omnitok.train.loop import lr_at, train
from omnitok.train.recipe import OptimConfig, parse_recipe
from omnitok.train.synthetic import write_synthetic_tokens
from tiny_models import TINY_LLAMA as TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_synthetic_tokens(path, vocab_size=96, tasks={"caption": (4, 20), "t2i": (16, 30), "asr": (10, 50)}, docs=40)
    return path


def recipe(tokdir, out, **over):
    raw = {
        "name": "test",
        "seed": 3,
        "data": str(tokdir),
        "out": str(out),
        "model": TINY,
        "batch": {"seq_len": 64, "micro_batch": 2, "grad_accum": 2},
        "optim": {"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 10},
        "log": {"every": 1, "tensorboard": False},
        "stages": [
            {"name": "one", "steps": 4, "mixture": {"caption": 0.5, "t2i": 0.5}},
            {"name": "two", "steps": 3, "mixture": {"caption": 0.2, "t2i": 0.3, "asr": 0.5}, "lr": 5e-3},
        ],
    }
    raw.update(over)
    return parse_recipe(raw)


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("log_every", [1, 3])
def test_resume_continues_exactly(tokdir, tmp_path, log_every):
    full = tmp_path / "full"
    result = train(recipe(tokdir, full, log={"every": log_every, "tensorboard": False}), progress=False)
    assert result["step"] == 7
    reference = losses(full)
    if log_every == 1:
        assert sorted(reference) == list(range(1, 8))
        assert reference[4] < reference[1]  # it learns
    assert [p.name for p in list_checkpoints(full)] == [f"step-00000{i}" for i in (2, 4, 6, 7)]

    # Interrupted after step 2 (inside stage one) and after step 6 (inside stage two, its own AdamW state).
    for resume_at in (2, 6):
        out = tmp_path / f"resumed-{resume_at}"
        shutil.copytree(full, out)
        shutil.rmtree(out / "final")
        for ckpt in list_checkpoints(out):
            if int(ckpt.name.split("-")[1]) > resume_at:
                shutil.rmtree(ckpt)
        train(recipe(tokdir, out, log={"every": log_every, "tensorboard": False}), progress=False)
        got = losses(out)
        assert sorted(got) == sorted(reference)  # the log is not duplicated, and has the same windows
        for step in got:
            assert got[step] == pytest.approx(reference[step], abs=1e-6, rel=0)
        final_a = load_file(full / "final" / "model.safetensors")
        final_b = load_file(out / "final" / "model.safetensors")
        for k in final_a:
            torch.testing.assert_close(final_b[k], final_a[k], atol=1e-6, rtol=0)


def test_muon_moves_the_hidden_matrices_and_resumes_exactly(tokdir, tmp_path):
    full = tmp_path / "full"
    muon = {"name": "muon", "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1}
    train(recipe(tokdir, full, optim=muon), progress=False)
    reference = losses(full)
    assert reference[4] < reference[1]  # it learns

    # Muon's momentum for the decoder's matrices, AdamW's moments for the embedding and the norms, in one checkpoint.
    saved = load_file(list_checkpoints(full)[-1] / "optimizer.safetensors")
    muon_keys = {k for k in saved if k.endswith("/momentum_buffer")}
    adam_keys = {k for k in saved if k.endswith("/exp_avg")}
    assert any("q_proj" in k for k in muon_keys) and any("down_proj" in k for k in muon_keys)
    assert not any("embed_tokens" in k or "norm" in k for k in muon_keys)
    assert any("embed_tokens" in k for k in adam_keys) and not any("q_proj" in k for k in adam_keys)

    adamw = tmp_path / "adamw"
    train(recipe(tokdir, adamw), progress=False)
    assert losses(adamw)[7] != pytest.approx(reference[7], abs=1e-4)  # the option changes what trains

    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    for ckpt in list_checkpoints(out):
        if int(ckpt.name.split("-")[1]) > 6:
            shutil.rmtree(ckpt)
    train(recipe(tokdir, out, optim=muon), progress=False)
    assert losses(out)[7] == pytest.approx(reference[7], abs=1e-6, rel=0)


def test_checkpoint_and_final_layout(tokdir, tmp_path):
    out = tmp_path / "run"
    r = recipe(tokdir, out, checkpoint={"every": 1, "keep": 2}, log={"every": 1, "tensorboard": True})
    train(r, progress=False)
    if importlib.util.find_spec("tensorboard"):  # optional: without it the loop logs JSONL only
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["step-000006", "step-000007"]
    assert sorted(f.name for f in ckpts[-1].iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    state = load_trainer_state(ckpts[-1])
    assert state["step"] == 7 and state["stage_name"] == "two" and state["vocab_size"] == 96
    assert state["recipe_hash"] == r.hash()
    assert set(state["sampler"]["drawn"]) == {"caption", "t2i", "asr"}
    assert isinstance(state["rng"][0]["cpu"][0], list)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))

    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "omnitok train" and config["config"]["vocab_size"] == 96
    assert (out / "final" / "vocab.json").read_text() == (tokdir / "vocab.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    assert model.get_input_embeddings().num_embeddings == 96

    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "stage", "loss", "lr", "grad_norm", "tokens_per_s", "real_fraction", "tokens"} <= set(record)
    assert 0.5 < record["real_fraction"] <= 1


def test_new_embeddings_stage_leaves_old_rows_unchanged(tokdir, tmp_path):
    torch.manual_seed(0)
    base = build_model({**TINY, "tie_word_embeddings": False}, 80)  # 16 ids of the token data are new
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    stages = [{"name": "embed", "steps": 3, "mixture": {"caption": 0.5, "asr": 0.5}, "trainable": "new_embeddings"}]
    train(recipe(tokdir, out, model={"pretrained": str(tmp_path / "base")}, stages=stages), progress=False)
    trained = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    before, after = base.state_dict(), trained.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[name][:80], before[name][:80]), name
        assert not torch.allclose(after[name][80:], before[name].mean(0).expand(16, -1), atol=1e-4), name
    for name, value in before.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[name], value), name


def test_bf16_autocast_runs_on_cpu(tokdir, tmp_path):
    stages = [{"name": "s", "steps": 2, "mixture": {"t2i": 1.0}}]
    result = train(recipe(tokdir, tmp_path / "bf16", precision="bf16", stages=stages), progress=False)
    assert result["step"] == 2 and all(r["loss"] == r["loss"] for r in result["log"])


def test_lr_schedule():
    o = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(k, 10, o) for k in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    lin = OptimConfig(lr=1.0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(k, 5, lin) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_at(7, 10, OptimConfig(lr=2.0, schedule="constant")) == 2.0


def test_loss_on_target_positions_equals_full_logits_loss(monkeypatch):
    """The head runs only where a label is; the summed loss and the gradients are the full-logits ones."""
    import functools

    from omnitok.data.packing import pack_rows
    from omnitok.train import loop
    from omnitok.train.loop import Runtime, _forward_loss

    monkeypatch.setattr(loop, "_bucketed", functools.partial(loop._bucketed, bucket=16))

    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=96)
    ids = [torch.randint(0, 96, (n,)).numpy() for n in (20, 30, 9)]
    masks = [(torch.arange(len(x)) >= len(x) // 2).to(torch.uint8).numpy() for x in ids]
    batch = pack_rows([[("a", 0), ("a", 1)], [("a", 2)]], {"a": list(zip(ids, masks, strict=True))}, seq_len=64)
    rt = Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False, owns_group=False)

    loss = _forward_loss(model, batch, rt, attention="mask")
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    from omnitok.data.packing import IGNORE, block_causal_mask

    logits = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=block_causal_mask(batch.doc_ids),
    ).logits
    targets = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=IGNORE)
    full = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    full.backward()
    assert batch.targets > 0 and loss.item() == pytest.approx(full.item(), rel=1e-5)
    # ... and the head really ran on the target positions only (the fast path, not the full-logits fallback)
    keep = targets != IGNORE
    assert model(input_ids=batch.input_ids, logits_to_keep=keep).logits.shape == (batch.targets, 96)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_bucketed_keep_rounds_up_with_unlabelled_positions():
    from omnitok.train.loop import _bucketed

    keep = torch.zeros(2, 20, dtype=torch.bool)
    keep[0, 3:8] = True
    keep[1, 10:13] = True
    out = _bucketed(keep, bucket=16)
    assert int(out.sum()) == 16 and bool(out[keep].all())  # every target kept, 8 unlabelled added
    assert int(_bucketed(keep, bucket=64).sum()) == 40  # capped at the number of positions
    full = torch.ones(2, 8, dtype=torch.bool)
    assert _bucketed(full, bucket=16) is full


def test_validation_loss_per_task_logged_and_resumed(tmp_path):
    tokdir = tmp_path / "tokens"
    write_synthetic_tokens(
        tokdir,
        vocab_size=96,
        tasks={"caption": (4, 20), "t2i": (16, 30), "asr": (10, 50)},
        docs=20,
        splits=("train", "val"),
    )
    out = tmp_path / "run"
    result = train(recipe(tokdir, out, validation={"every": 3, "docs": 8}), progress=False)
    lines = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    # every 3 steps (3, 6) and at the end of each stage (4, 7); tasks of any stage, each a finite loss
    assert [r["step"] for r in lines] == [3, 4, 6, 7] and lines == result["validation"]
    assert all(set(r["loss"]) == {"asr", "caption", "t2i"} for r in lines)
    assert all(0 < v < 20 for r in lines for v in r["loss"].values())
    assert lines[-1]["loss"]["caption"] < lines[0]["loss"]["caption"]  # the synthetic tasks are learnable

    # a run resumed from step 4 drops the later validations and writes the same ones again
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step-000006")
    shutil.rmtree(again / "checkpoints" / "step-000007")
    train(recipe(tokdir, again, validation={"every": 3, "docs": 8}), progress=False)
    relines = [json.loads(x) for x in (again / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in relines] == [3, 4, 6, 7]
    for a, b in zip(lines, relines, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert all(r["seconds"] > 0 for r in lines)  # what each cost a time-boxed run

    # only at the end of the run (the demo: each stage-end validation cost its LM ~10 s on a slow CPU), and
    # every 3 steps still; the losses at the steps it keeps are the same
    ends = tmp_path / "ends"
    train(recipe(tokdir, ends, validation={"every": 3, "docs": 8, "stage_ends": False}), progress=False)
    kept = [json.loads(x) for x in (ends / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [3, 6, 7]
    for a, b in zip([lines[0], *lines[2:]], kept, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_validation_off_or_without_split(tokdir, tmp_path):
    train(recipe(tokdir, tmp_path / "a", validation={"docs": 0}), progress=False)
    train(recipe(tokdir, tmp_path / "b"), progress=False)  # the token directory has no val split
    assert not (tmp_path / "a" / "val.jsonl").exists() and not (tmp_path / "b" / "val.jsonl").exists()


def test_max_steps_stops_with_a_checkpoint_and_a_later_run_continues_exactly(tokdir, tmp_path):
    full = tmp_path / "full"
    train(recipe(tokdir, full), progress=False)
    for stop_at in (3, 4):  # inside stage one, and at its last step
        out = tmp_path / f"stop-{stop_at}"
        first = train(recipe(tokdir, out, checkpoint={"every": 0, "keep": 2}), progress=False, max_steps=stop_at)
        assert first["step"] == stop_at and first["final"] is None and not (out / "final").exists()
        assert [p.name for p in list_checkpoints(out)] == [f"step-00000{stop_at}"] and not (out / "bundle").exists()
        # called again with the same limit: nothing left to do, nothing trained
        assert train(recipe(tokdir, out), progress=False, max_steps=stop_at)["log"] == []
        rest = train(recipe(tokdir, out, checkpoint={"every": 0, "keep": 2}), progress=False)
        assert rest["step"] == 7 and rest["final"] == str(out / "final")
        assert losses(out) == pytest.approx(losses(full), abs=1e-6, rel=0)


def test_resuming_with_a_changed_recipe_names_what_changed(tokdir, tmp_path, capsys):
    out = tmp_path / "run"
    train(recipe(tokdir, out), progress=False, max_steps=3)
    capsys.readouterr()
    stages = recipe(tokdir, out).to_dict()["stages"]
    stages[1]["steps"], stages[1]["lr"] = 5, 1e-3
    assert train(recipe(tokdir, out, stages=stages), progress=False)["step"] == 9
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == [
        f"note: the recipe changed since {out / 'checkpoints' / 'step-000003'} was written "
        "(stages.1.lr: 0.005 -> 0.001; stages.1.steps: 3 -> 5); continuing with the new one"
    ]


def test_resuming_under_another_optimizer_starts_its_moments_fresh(tokdir, tmp_path, capsys):
    out = tmp_path / "run"
    train(recipe(tokdir, out), progress=False, max_steps=3)  # AdamW, stopped inside stage one
    capsys.readouterr()
    muon = {"name": "muon", "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1}
    assert train(recipe(tokdir, out, optim=muon), progress=False)["step"] == 7
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes[-1] == (
        f"note: {out / 'checkpoints' / 'step-000003'} holds adamw's state and the recipe now says optim.name "
        "'muon': stage 'one' continues with fresh optimizer moments"
    )


def test_recipe_changes_lists_every_differing_leaf():
    from omnitok.train.recipe import recipe_changes

    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
    new = {"a": 1, "b": {"c": [1, 3], "d": "y"}, "new": 2}
    assert recipe_changes(old, new) == [
        "b.c.1: 2 -> 3",
        "b.d: x -> y",
        "gone: 0 -> (unset)",
        "new: (unset) -> 2",
    ]
    assert recipe_changes(old, old) == []
    assert recipe_changes({"s": [1]}, {"s": [1, 2]}) == ["s: [1] -> [1, 2]"]  # a list of another length, whole


def test_throughput_measurement_writes_nothing(tokdir, tmp_path):
    from omnitok.train.loop import measure_throughput

    speed = measure_throughput(recipe(tokdir, tmp_path / "m"), steps=2, warmup=1)
    assert speed > 0 and not (tmp_path / "m").exists()


def test_plan_for_a_speed_scales_the_stages_still_to_come(tokdir, tmp_path):
    from omnitok.train.budget import plan_for_speed

    r = recipe(tokdir, tmp_path / "lm")
    # 252 s x 90 % x 1000 positions/s / 256 positions a step = 885 steps, split 4:3 like the recipe
    assert [s.steps for s in plan_for_speed(r, 252.0, 1000.0).stages] == [506, 379]
    assert sum(s.steps for s in plan_for_speed(r, 252.0, 2000.0).stages) == 1771  # twice the speed, twice the steps
    assert [s.steps for s in plan_for_speed(r, 1.0, 1000.0).stages] == [5, 5]  # never fewer than 5 steps a stage
    # steps already trained (a calibration) count, and stay inside the first stage however short the rest is
    assert [s.steps for s in plan_for_speed(r, 252.0, 1000.0, trained=30).stages] == [523, 392]
    assert plan_for_speed(r, 1.0, 1000.0, trained=30).stages[0].steps == 31
    # after a stage, only the stages still to come change
    assert [s.steps for s in plan_for_speed(r, 100.0, 1000.0, trained=4, from_stage=1).stages] == [4, 351]


def test_a_stage_with_a_larger_batch_costs_its_steps_more_time(tokdir, tmp_path):
    from omnitok.train.budget import logged_speed, plan_for_speed, positions_per_step

    stages = recipe(tokdir, tmp_path).to_dict()["stages"]
    stages[1]["micro_batch"] = 4  # 512 positions a step against the recipe's 256
    r = recipe(tokdir, tmp_path / "lm", stages=stages)
    assert [positions_per_step(r, i) for i in (0, 1)] == [256, 512]
    # 252 s x 90 % x 1000 positions/s = 226,800 positions: 4:3 in steps, stage two's at twice the positions
    planned = plan_for_speed(r, 252.0, 1000.0)
    assert [s.steps for s in planned.stages] == [354, 266]
    positions = sum(s.steps * positions_per_step(planned, i) for i, s in enumerate(planned.stages))
    assert positions == pytest.approx(226_800, rel=1e-3)
    # steps 3-4 in stage one, 5-6 in stage two: 2 x 256 + 2 x 512 positions in 2 s
    log = [{"step": 2, "elapsed_s": 1.0}, {"step": 6, "elapsed_s": 3.0}]
    assert logged_speed(log, r) == 768.0


def test_a_run_fitted_to_seconds_equals_its_last_plan_trained_straight(tokdir, tmp_path):
    from omnitok.train.budget import calibration_steps, plan_for_speed, train_for_seconds

    def r(out):
        return recipe(tokdir, out, optim={"lr": 1e-2, "warmup_steps": 3}, checkpoint={"every": 0, "keep": 2})

    assert calibration_steps(r(tmp_path)) == 3  # the warm-up; two log windows of 1 step would be fewer
    timed, plans = tmp_path / "timed", []
    result = train_for_seconds(r(timed), 3.0, progress=False, on_plan=lambda p, s: plans.append((p, s)))
    # planned after the calibration, then again when the first stage ended (its steps unchanged by then)
    assert len(plans) == 2 and all(s > 0 for _, s in plans)
    first, last = plans[0][0], plans[1][0]
    assert first.stages[0].steps > 3 and last.stages[0].steps == first.stages[0].steps
    total = sum(s.steps for s in last.stages)
    assert result["step"] == total and result["final"] == str(timed / "final")
    straight = tmp_path / "straight"
    train(replace(last, out=straight), progress=False)
    assert sorted(losses(timed)) == list(range(1, total + 1))
    assert losses(timed) == pytest.approx(losses(straight), abs=1e-6, rel=0)

    given = []  # a given speed is a plan: made once, trained straight
    train_for_seconds(r(tmp_path / "given"), 1.0, speed=1000.0, progress=False, on_plan=lambda p, s: given.append(s))
    assert given == [1000.0] and sorted(losses(tmp_path / "given")) == list(range(1, 11))
    with pytest.raises(OmnitokError, match="already holds checkpoints"):  # a run that trained can't be timed again
        train_for_seconds(r(timed), 2.0, progress=False)
    # time kept for work after the training is asked at every plan, at that plan's speed, and not planned for
    seen, kept = [], []
    reserve = lambda speed: seen.append(speed) or 3.0  # noqa: E731
    train_for_seconds(r(tmp_path / "kept"), 6.0, progress=False, on_plan=lambda p, s: kept.append(s), reserve=reserve)
    assert seen == kept and len(seen) == 2
    given = []
    train_for_seconds(
        r(tmp_path / "given-kept"), 100.0, speed=200.0, progress=False, on_plan=lambda p, s: given.append(p),
        reserve=lambda speed: 100.0 - 40.0 * speed / 200.0,
    )  # fmt: skip
    assert [s.steps for s in given[0].stages] == [s.steps for s in plan_for_speed(r(tmp_path), 40.0, 200.0).stages]
    with pytest.raises(OmnitokError, match="timing the run needs more than its first 7"):
        train_for_seconds(recipe(tokdir, tmp_path / "short", optim={"lr": 1e-2, "warmup_steps": 7}), 2.0)


def test_codec_code_embeddings_need_the_tokenizers(tokdir, tmp_path):
    with pytest.raises(OmnitokError, match="code_embeddings: codec needs the"):
        train(recipe(tokdir, tmp_path / "c", code_embeddings="codec"), progress=False)


def test_loss_falls_back_where_transformers_refuses_a_mask_for_logits_to_keep(monkeypatch):
    """Older transformers (5.17's Llama, seen on a GPU machine) index the sequence axis with ``logits_to_keep`` and
    raise on a [B, L] mask: the loss then comes from every position's logits, the same number, and later steps
    skip the attempt."""
    from omnitok.data.packing import pack_rows
    from omnitok.train import loop
    from omnitok.train.loop import Runtime, _forward_loss

    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=96)
    ids = [torch.randint(0, 96, (n,)).numpy() for n in (20, 30)]
    masks = [(torch.arange(len(x)) >= len(x) // 2).to(torch.uint8).numpy() for x in ids]
    batch = pack_rows([[("a", 0)], [("a", 1)]], {"a": list(zip(ids, masks, strict=True))}, seq_len=32)
    rt = Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False, owns_group=False)
    fast = _forward_loss(model, batch, rt, attention="mask").item()

    seen = []

    class OldHead(torch.nn.Module):  # what such a release does with a tensor logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, logits_to_keep=0, **kw):
            seen.append(type(logits_to_keep).__name__)
            if isinstance(logits_to_keep, torch.Tensor):
                raise IndexError("too many indices for tensor of dimension 3")
            return self.inner(logits_to_keep=logits_to_keep, **kw)

    monkeypatch.setattr(loop, "_BOOL_KEEP", True)
    old = OldHead(model)
    assert _forward_loss(old, batch, rt, attention="mask").item() == pytest.approx(fast, rel=1e-5)
    assert _forward_loss(old, batch, rt, attention="mask").item() == pytest.approx(fast, rel=1e-5)
    assert seen == ["Tensor", "int", "int"] and loop._BOOL_KEEP is False


def test_demo_lm_step_runs_in_a_fresh_process(tokdir, tmp_path):
    import os

    import yaml

    from omnitok.demo import DemoConfig, _train_lm, in_fresh_process
    from omnitok.io import read_json

    assert in_fresh_process(os.getpid) != os.getpid()
    with pytest.raises(OmnitokError, match="demo LM plan not found"):  # the step's error comes back, message kept
        in_fresh_process(read_json, tmp_path / "missing.json", "demo LM plan")
    with pytest.raises(OmnitokError, match="_exit ran in a fresh process that ended abruptly"):  # killed, OOM
        in_fresh_process(os._exit, 3)

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe(tokdir, tmp_path / "x").to_dict(), "data": str(tokdir)}))
    # 60 s x 90 % x 20 positions/s / 256 a step = 4 steps -> the floor of 5 a stage
    cfg = DemoConfig(minutes=3, recipe=str(path), lm_tokens_per_s=20.0)
    in_fresh_process(_train_lm, tokdir, tmp_path, cfg, 60.0)
    assert read_json(tmp_path / "lm_plan.json") == {"positions_per_s": 20.0, "steps": [5, 5]}
    log = tmp_path / "lm" / "log.jsonl"
    assert json.loads(log.read_text().splitlines()[-1])["step"] == 10
    # a resumed demo keeps its plan (its checkpoints were made for it), whatever time it has left now
    _train_lm(tokdir, tmp_path, cfg, 6000.0)
    assert read_json(tmp_path / "lm_plan.json")["steps"] == [5, 5]
    assert json.loads(log.read_text().splitlines()[-1])["step"] == 10
    # a plan for another recipe's stages is refused, not silently replaced
    other = tmp_path / "one-stage.yaml"
    one = recipe(tokdir, tmp_path / "x").to_dict()
    other.write_text(yaml.safe_dump({**one, "data": str(tokdir), "stages": one["stages"][:1]}))
    with pytest.raises(OmnitokError, match=r"plans 2 stages but recipe .* has 1"):
        _train_lm(tokdir, tmp_path, replace(cfg, recipe=str(other)), 60.0)


def test_demo_evaluation_minutes_replace_its_share_and_bad_flags_write_nothing(tmp_path):
    from omnitok.demo import DemoConfig, run_demo

    assert DemoConfig(minutes=10).budget("eval") == pytest.approx(0.8)
    assert DemoConfig(minutes=10, eval_minutes=2.5).budget("eval") == 2.5
    assert DemoConfig(minutes=10, eval_minutes=2.5).budget("image_tokenizer") == pytest.approx(1.6)
    for bad in (0.0, 10.0):
        with pytest.raises(OmnitokError, match="--eval-minutes must be above 0 and below --minutes"):
            run_demo(tmp_path / "demo", DemoConfig(minutes=10, eval_minutes=bad))
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(OmnitokError, match="--lm-tokens-per-s must be a number > 0"):
            run_demo(tmp_path / "demo", DemoConfig(lm_tokens_per_s=bad))
    for bad in (0.0, 0.5, float("nan")):
        with pytest.raises(OmnitokError, match=r"tokenizer_share must be a fraction of the budget in \(0, 0\.5\)"):
            run_demo(tmp_path / "demo", DemoConfig(tokenizer_share=bad))
        with pytest.raises(OmnitokError, match=r"speech_tokenizer_share must be a fraction of the budget in \(0, 0\.5"):
            run_demo(tmp_path / "demo", DemoConfig(speech_tokenizer_share=bad))
    with pytest.raises(OmnitokError, match="--n must be a positive number of scene samples, got 0"):
        run_demo(tmp_path / "demo", DemoConfig(n=0))
    for started in (time.time() + 60, time.time() - 15 * 60):  # in the future, or the whole budget ago
        with pytest.raises(OmnitokError, match=r"--started-at .* expected a time in the budget's past"):
            run_demo(tmp_path / "demo", DemoConfig(started_at=started))
    assert not (tmp_path / "demo").exists()  # refused before anything is written


def test_demo_evaluation_box_follows_the_lm_speed_up_to_its_share():
    from omnitok.demo import EVAL_TAIL_S, MARGIN_S, DemoConfig

    cfg = DemoConfig(minutes=15)
    cap = 0.08 * 15 * 60 + MARGIN_S - EVAL_TAIL_S  # what the LM kept back before: the share and margin, less the tail
    assert cfg.eval_reserve(1_900.0) == pytest.approx(cap)  # a slow machine's suite needs all of it
    # 10 s of slack + 1.2 x (10 s + 228,000 positions' worth): 88 s at Zen 4's 4,140 positions/s, 48 s at Zen 5's
    assert cfg.eval_reserve(4_140.0) == pytest.approx(10 + 1.2 * (10 + 228_000 / 4_140))
    assert cfg.eval_reserve(10_500.0) < cfg.eval_reserve(4_140.0) < cap
    # minutes given for the evaluation are kept whatever the speed
    given = DemoConfig(minutes=15, eval_minutes=2.0)
    assert given.eval_reserve(10_500.0) == given.eval_reserve(1_000.0) == pytest.approx(120 + MARGIN_S - EVAL_TAIL_S)


def test_demo_lm_timed_on_its_first_steps(tokdir, tmp_path):
    import yaml

    from omnitok.demo import DemoConfig, _train_lm
    from omnitok.io import read_json

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe(tokdir, tmp_path / "x").to_dict(), "data": str(tokdir)}))
    cfg = DemoConfig(minutes=3, recipe=str(path))
    # what an interrupted calibration leaves (no plan yet) is timed again, not resumed
    (tmp_path / "lm" / "checkpoints" / "step-000001").mkdir(parents=True)
    _train_lm(tokdir, tmp_path, cfg, 3.0)
    plan = read_json(tmp_path / "lm_plan.json")
    assert plan["positions_per_s"] > 0 and len(plan["steps"]) == 2 and min(plan["steps"]) >= 5
    records = [json.loads(x) for x in (tmp_path / "lm" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, sum(plan["steps"]) + 1))
    assert (tmp_path / "lm" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_auto_precision_takes_bf16_on_cpus_with_bf16_matmul_instructions(monkeypatch, amx, avx512_bf16, expected):
    from omnitok.train.loop import _bf16_is_fast

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert _bf16_is_fast(cuda=False) is expected


def test_a_truncated_checkpoint_is_named_not_a_traceback(tmp_path):
    from omnitok.train.checkpoint import load_model_state, load_optimizer_state

    step = tmp_path / "step-000001"
    step.mkdir()
    (step / "model.safetensors").write_bytes(b"\x10\x00\x00\x00")  # a header length and nothing after it
    with pytest.raises(OmnitokError, match=r"checkpoint model weights .*model\.safetensors is not a readable"):
        load_model_state(step)
    with pytest.raises(OmnitokError, match=r"checkpoint optimizer state not found: .*optimizer\.safetensors"):
        load_optimizer_state(step)


def test_probe_speed_times_the_first_stage_on_synthetic_documents(tokdir, tmp_path):
    from omnitok.train.budget import probe_speed

    r = recipe(tokdir, tmp_path / "never-written", precision="fp32")
    lengths = {"caption": (4, 20), "t2i": (16, 30), "asr": (10, 50)}
    assert probe_speed(r, vocab_size=96, lengths=lengths, steps=4) > 0
    assert not (tmp_path / "never-written").exists()  # the probe trains in a directory of its own, then removes it
    with pytest.raises(OmnitokError, match=r"no document lengths for tasks \['t2i'\]"):
        probe_speed(r, vocab_size=96, lengths={"caption": (4, 20)})
    with pytest.raises(OmnitokError, match="at least 4 steps"):
        probe_speed(r, vocab_size=96, lengths=lengths, steps=3)


def test_demo_world_size_follows_the_lm_training_its_budget_buys(tokdir, tmp_path, monkeypatch):
    import yaml

    from omnitok import demo
    from omnitok.world.build import WorldConfig, build_world

    assert [demo.world_size_for(p) for p in (0, 3.5e6, 3.6e6, 7.1e6, 7.2e6, 1e9)] == [
        2000,
        2000,
        4000,
        4000,
        8000,
        8000,
    ]
    # 15 minutes less the tokenizers' and the evaluation's caps (40 %), the margin and the fixed steps: 420 s
    assert demo.DemoConfig(minutes=15).lm_seconds_estimate() == pytest.approx(420.0)
    assert demo.DemoConfig(minutes=3, eval_minutes=2.9).lm_seconds_estimate() == 0.0

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe(tokdir, tmp_path / "x").to_dict(), "precision": "fp32"}))
    monkeypatch.setattr(demo, "PROBE_VOCAB", 96)
    n, why = demo.choose_world_size(demo.DemoConfig(minutes=15, recipe=str(path)))
    assert why["lm_positions_per_s"] > 0 and why["speed_from"] == "probe"
    assert why["lm_seconds_estimate"] == pytest.approx(420.0)
    assert n == demo.world_size_for(why["lm_positions_estimate"])
    # a speed given for planning the LM sizes the world too, without a probe
    given = demo.DemoConfig(minutes=15, recipe=str(path), lm_tokens_per_s=20_000.0)
    assert demo.choose_world_size(given) == (
        8000,
        {**why, "lm_positions_per_s": 20_000.0, "speed_from": "--lm-tokens-per-s", "lm_positions_estimate": 8_400_000},
    )
    # seconds gone before the demo started (make demo installing) are not the LM's: 270 s x 20,000 = 5.4 M -> 4,000
    assert demo.choose_world_size(given, 150.0)[0] == 4000
    # the probe leaves torch's threads in this process; the world's forked workers must still run
    build_world(tmp_path / "world", WorldConfig(n=16, seed=0, speech=False, samples_per_shard=4), workers=2)
    assert (tmp_path / "world" / "manifest.json").is_file()


def test_demo_world_step_keeps_why_its_world_has_its_size(tmp_path, monkeypatch):
    from io import StringIO

    from rich.console import Console

    from omnitok import demo
    from omnitok.io import read_json

    why = {"lm_positions_per_s": 5e3, "speed_from": "probe", "lm_seconds_estimate": 420.0, "lm_positions_estimate": 2}
    monkeypatch.setattr(demo, "choose_world_size", lambda cfg, spent, estimate: (12, why))
    world, sizing, text = tmp_path / "world", tmp_path / "world_size.json", StringIO()
    console = Console(file=text, width=200)
    # chosen: built to the choice, and the choice kept beside it
    assert demo._world_step(world, sizing, demo.DemoConfig(), console) == {"n": 12, "world_size": why}
    assert read_json(sizing) == why and "world size: 12 scenes" in text.getvalue()
    # resumed with another --n: the world the later steps were made from stays, and the run says so
    assert demo._world_step(world, sizing, demo.DemoConfig(n=40), console) == {"n": 12, "world_size": why}
    assert "was built with 12 scenes; --n 40 takes a new --out" in text.getvalue()
    # built afresh to --n: an earlier choice no longer explains the world and goes
    shutil.rmtree(world)
    assert demo._world_step(world, sizing, demo.DemoConfig(n=8), console) == {"n": 8}
    assert not sizing.exists()


def test_demo_lm_width_follows_the_training_its_budget_buys(tmp_path, monkeypatch):
    from io import StringIO

    from rich.console import Console

    from omnitok import demo
    from omnitok.io import read_json

    speeds = {demo.RECIPE: 2_000.0, demo.SMALL_RECIPE: 6_000.0}
    probed = []

    def probe(recipe, device):
        probed.append(recipe)
        return speeds[recipe]

    monkeypatch.setattr(demo, "_probe", probe)
    cfg = demo.DemoConfig(minutes=15)  # 420 s for the LM before anything ran
    # 2,000 positions/s x 420 s = 0.84 M < 3 M: the narrow model, and the world sized by its own probe
    recipe, why = demo.choose_recipe(cfg)
    assert recipe == str(demo.SMALL_RECIPE) and probed == [demo.RECIPE, demo.SMALL_RECIPE]
    assert why[demo.RECIPE.name]["lm_positions_estimate"] == 840_000
    assert why["chosen"] == why[demo.SMALL_RECIPE.name] and why["chosen"]["lm_positions_estimate"] == 2_520_000
    assert demo.choose_world_size(replace(cfg, recipe=recipe), 0.0, why["chosen"]) == (2000, why["chosen"])
    # fast enough: the recipe's model, one probe
    speeds[demo.RECIPE], probed[:] = 8_000.0, []
    recipe, why = demo.choose_recipe(cfg)
    assert recipe == str(demo.RECIPE) and probed == [demo.RECIPE] and why["chosen"]["lm_positions_estimate"] == 3.36e6
    # seconds gone before the demo started count: 8,000 x 270 s = 2.16 M
    assert demo.choose_recipe(cfg, 150.0)[0] == str(demo.SMALL_RECIPE)
    # a planning speed given on the command line is the recipe's: no probe, no choice
    probed[:] = []
    given = demo.choose_recipe(replace(cfg, lm_tokens_per_s=100.0))
    assert given[0] == str(demo.RECIPE) and probed == [] and given[1]["chosen"]["speed_from"] == "--lm-tokens-per-s"

    # the demo's step: chosen once as the demo starts, kept for a resumed one, never over --recipe
    text, path = StringIO(), tmp_path / "lm_recipe.json"
    console = Console(file=text, width=200)
    speeds[demo.RECIPE] = 2_000.0
    settled, why = demo._recipe_step(path, cfg, console, 0.0, fresh=True)
    assert settled.recipe == str(demo.SMALL_RECIPE) and read_json(path) == why
    # the LM short of steps: each tokenizer's box halves (unless the config names their share)
    for step in ("image_tokenizer", "speech_tokenizer"):
        assert settled.budget(step) == pytest.approx(15 * 0.08) and cfg.budget(step) == pytest.approx(15 * 0.16)
    assert settled.budget("eval") == cfg.budget("eval")
    kept = replace(cfg, tokenizer_share=0.12)
    assert demo._recipe_step(path, kept, console, 0.0, fresh=False)[0].tokenizer_share == 0.12
    # the narrow model not short of positions (9,000 x 420 s = 3.8 M): the speech tokenizer keeps its whole box
    speeds[demo.SMALL_RECIPE] = 9_000.0
    roomy, _ = demo._recipe_step(tmp_path / "roomy.json", cfg, console, 0.0, fresh=True)
    assert roomy.recipe == str(demo.SMALL_RECIPE) and roomy.budget("image_tokenizer") == pytest.approx(15 * 0.08)
    assert roomy.budget("speech_tokenizer") == pytest.approx(15 * 0.16)
    named_share = replace(cfg, tokenizer_share=0.1)  # a share the config names holds for both boxes
    assert demo._recipe_step(tmp_path / "roomy.json", named_share, console, 0.0, fresh=False)[0].budget(
        "speech_tokenizer"
    ) == pytest.approx(15 * 0.1)
    speeds[demo.SMALL_RECIPE] = 6_000.0
    assert "LM recipe: toyworld_small.yaml (~2.5 M positions" in text.getvalue()
    speeds[demo.RECIPE], probed[:] = 9_000.0, []  # the machine is faster now: a resumed demo keeps its choice
    assert demo._recipe_step(path, cfg, console, 0.0, fresh=False)[0].recipe == str(demo.SMALL_RECIPE)
    assert probed == []
    path.unlink()  # a demo begun before the choice was recorded keeps the recipe its LM started with
    assert demo._recipe_step(path, cfg, console, 0.0, fresh=False) == (replace(cfg, recipe=str(demo.RECIPE)), {})
    named = replace(cfg, recipe="mine.yaml")
    assert demo._recipe_step(path, named, console, 0.0, fresh=True) == (named, {}) and not path.exists()
    path.write_text('{"recipe": "/nowhere/gone.yaml"}')
    with pytest.raises(OmnitokError, match=r"lm_recipe\.json: recipe /nowhere/gone\.yaml not found"):
        demo._recipe_step(path, cfg, console, 0.0, fresh=False)


def test_demo_evaluation_box_is_read_from_the_trained_recipe_s_own_fit(tmp_path, monkeypatch):
    """The small recipe's box comes from its own fit at its model's speed (measured on the machines that choose it,
    where RECIPE's fit at RECIPE's speed asked the whole cap); a recipe without a fit is boxed by RECIPE's."""
    from omnitok import demo
    from omnitok.train import budget

    got = {}
    monkeypatch.setattr(budget, "train_for_seconds", lambda recipe, seconds, **kw: got.update(kw))
    cfg = demo.DemoConfig(minutes=15, recipe=str(demo.SMALL_RECIPE))
    demo._train_lm(tmp_path / "tokens", tmp_path, cfg, 300.0)
    cap = 0.08 * 15 * 60 + demo.MARGIN_S - demo.EVAL_TAIL_S
    fixed, work = demo.EVAL_SUITE_S[demo.SMALL_RECIPE.name]
    # a Zen 3's slowest plan, ~5,600 positions/s: ~79 s, where RECIPE's fit at 5,600 / 2.6 asked the cap (117 s)
    assert got["reserve"](5_600.0) == pytest.approx(10 + 1.2 * (fixed + work / 5_600))
    assert got["reserve"](5_600.0) < cap - 15
    assert demo.DemoConfig(minutes=15).eval_reserve(5_600.0 / 2.6) == pytest.approx(cap)
    assert got["reserve"](9_000.0) == pytest.approx(got["reserve"](5_600.0))  # the slowest so far
    assert got["reserve"](2_000.0) == pytest.approx(cap)  # never more than the share and margin
    # a recipe of the user's own (--recipe): RECIPE's fit, at its own model's speed
    mine = demo.DemoConfig(minutes=15, recipe=str(tmp_path / "mine.yaml"))
    assert mine.eval_reserve(5_600.0) == pytest.approx(demo.DemoConfig(minutes=15).eval_reserve(5_600.0))
    assert mine.eval_reserve(5_600.0) == pytest.approx(10 + 1.2 * (10 + 228_000 / 5_600))


def test_demo_steps_follow_the_recipe_choice_kept_in_lm_recipe_json(tmp_path, monkeypatch):
    """run_demo reads lm_recipe.json: the LM step gets the chosen recipe, and each tokenizer half its box where the
    small recipe was chosen; with the recipe's model (a given speed: no probe of it) the boxes are whole."""
    from omnitok import demo
    from omnitok.io import atomic_write_json

    def put(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)

    def finished(out, why):
        for done in ("world/manifest.json", "tokens/manifest.json"):
            put(out / done, {"config": {"n": 12}})
        put(out / "eval" / "metrics.json", {"asr_wer": 0.5})
        put(out / "lm_recipe.json", why)

    calls = {}

    def fresh(fn, *args, **kwargs):
        calls[fn.__name__] = args
        if fn is demo._train_lm:
            put(args[1] / "lm" / "bundle" / "omnitok.json", {})
        else:  # a tokenizer, trained in its box (the train config's max_minutes)
            put(args[1] / "tokenizer" / "config.json", {})

    monkeypatch.setattr(demo, "in_fresh_process", fresh)
    probe = {"lm_positions_per_s": 2_000.0, "speed_from": "probe", "lm_seconds_estimate": 420.0}
    small = {**probe, "lm_positions_per_s": 5_000.0}
    out = tmp_path / "slow"
    finished(
        out, {"recipe": str(demo.SMALL_RECIPE), demo.RECIPE.name: probe, demo.SMALL_RECIPE.name: small, "chosen": small}
    )
    assert demo.run_demo(out, demo.DemoConfig(minutes=15)) == {"asr_wer": 0.5}
    assert sorted(calls) == ["_train_lm", "train_image_tokenizer", "train_speech_tokenizer"]
    for step in ("train_image_tokenizer", "train_speech_tokenizer"):
        assert calls[step][2].max_minutes == pytest.approx(15 * demo.SMALL_TOKENIZER_SHARE)
    cfg = calls["_train_lm"][2]
    assert cfg.recipe == str(demo.SMALL_RECIPE) and cfg.tokenizer_share == demo.SMALL_TOKENIZER_SHARE
    assert (out / "bundle" / "omnitok.json").is_file() and not (out / "lm" / "bundle").exists()

    calls.clear()  # the narrow model with positions to spare: the speech box whole, the image box halved
    roomy = {**small, "lm_positions_estimate": 4_200_000}
    finished(tmp_path / "roomy", {"recipe": str(demo.SMALL_RECIPE), "chosen": roomy})
    demo.run_demo(tmp_path / "roomy", demo.DemoConfig(minutes=15))
    assert calls["train_image_tokenizer"][2].max_minutes == pytest.approx(15 * demo.SMALL_TOKENIZER_SHARE)
    assert calls["train_speech_tokenizer"][2].max_minutes == pytest.approx(15 * demo.SHARES["speech_tokenizer"])
    assert calls["_train_lm"][2].speech_tokenizer_share == demo.SHARES["speech_tokenizer"]

    calls.clear()
    given = {**probe, "speed_from": "--lm-tokens-per-s"}
    finished(tmp_path / "given", {"recipe": str(demo.RECIPE), "chosen": given})
    demo.run_demo(tmp_path / "given", demo.DemoConfig(minutes=15, lm_tokens_per_s=2_000.0))
    assert calls["train_image_tokenizer"][2].max_minutes == pytest.approx(15 * demo.SHARES["image_tokenizer"])
    assert calls["train_speech_tokenizer"][2].max_minutes == pytest.approx(15 * demo.SHARES["speech_tokenizer"])
    assert calls["_train_lm"][2].recipe == str(demo.RECIPE)
