"""The FSQ image tokenizer meets the modality-tokenizer contract; training runs, logs and resumes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnitok.errors import OmnitokError
from omnitok.tokenizers.base import load_image_tokenizer, load_split_images
from omnitok.tokenizers.image import (
    ImageTokenizer,
    ImageTokenizerConfig,
    TrainConfig,
    edge_loss,
    psnr,
    shapes_demo_images,
    ssim,
    train_image_tokenizer,
)

TINY = {"widths": (8, 8, 8, 8), "depths": (1, 1, 1, 1), "levels": (5, 5, 3), "image_size": 32}


def tiny(**kw: object) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(ImageTokenizerConfig(**(TINY | kw))).eval()


@pytest.mark.parametrize(("downsample", "grid"), [(4, 8), (8, 4), (16, 2)])
def test_contract_shapes_and_round_trip(downsample: int, grid: int) -> None:
    tok = tiny(downsample=downsample)
    images = shapes_demo_images(3, size=32)
    codes = tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, grid * grid)
    assert tok.grid == (grid, grid) and tok.tokens_per_item == grid * grid
    assert tok.codebook_size == 75 and int(codes.min()) >= 0 and int(codes.max()) < 75
    out = tok.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32, 3)
    # single image in, single out; numpy and torch inputs agree; batching does not change codes
    one = tok.encode(images[1])
    assert one.shape == (grid * grid,) and torch.equal(one, codes[1])
    assert torch.equal(tok.encode(torch.from_numpy(images)), codes)
    assert tok.decode(one).shape == (32, 32, 3)
    # decoding is deterministic (eval mode, no dropout or sampling)
    assert torch.equal(tok.decode(codes), out)


def test_residual_fsq_token_layout() -> None:
    tok = tiny(num_quantizers=2)
    codes = tok.encode(shapes_demo_images(2, size=32))
    k = tok.level_codebook_size
    assert tok.num_levels == 2 and tok.codebook_size == 2 * k and tok.level_offsets() == [0, k]
    assert codes.shape == (2, tok.grid[0] * tok.grid[1] * 2) == (2, tok.tokens_per_item)
    assert (codes[:, 0::2] < k).all() and (codes[:, 1::2] >= k).all()  # stage q owns ids [q*k, (q+1)*k)
    assert tok.decode(codes).shape == (2, 32, 32, 3)
    swapped = codes.clone()
    swapped[:, 0] = k  # a stage-1 id in a stage-0 slot
    with pytest.raises(OmnitokError, match="residual level"):
        tok.decode(swapped)
    # code vectors per stage: the latent each code decodes from (stage 1 on a finer scale)
    v0, v1 = tok.code_vectors(0), tok.code_vectors(1)
    assert v0.shape == v1.shape == (k, len(tok.config.levels))
    assert v1.abs().max() < v0.abs().max()
    with pytest.raises(OmnitokError, match=r"levels 0\.\.1"):
        tok.code_vectors(2)


def test_save_load_round_trip(tmp_path: Path) -> None:
    tok = tiny()
    images = shapes_demo_images(2, size=32)
    tok.save(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["omnitok_tokenizer"] == "image_fsq" and cfg["tokens_per_item"] == tok.tokens_per_item
    assert (tmp_path / "tok" / "model.safetensors").is_file()
    back = load_image_tokenizer(tmp_path / "tok")
    assert isinstance(back, ImageTokenizer)
    assert torch.equal(back.encode(images), tok.encode(images))
    assert torch.equal(back.decode(tok.encode(images)), tok.decode(tok.encode(images)))


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    tok = tiny()
    good = shapes_demo_images(1, size=32)
    with pytest.raises(OmnitokError, match="dtype uint8"):
        tok.encode(good.astype(np.float32))
    with pytest.raises(OmnitokError, match=r"shape \[H, W, 3\]"):
        tok.encode(good[..., :2])
    with pytest.raises(OmnitokError, match="multiples of 8"):
        tok.encode(np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(OmnitokError, match="out of range"):
        tok.decode(torch.full((1, tok.tokens_per_item), tok.codebook_size))
    with pytest.raises(OmnitokError, match="out of range"):
        tok.decode(torch.full((1, tok.tokens_per_item), -1))
    with pytest.raises(OmnitokError, match="integer dtype"):
        tok.decode(torch.zeros(1, tok.tokens_per_item))
    with pytest.raises(OmnitokError, match="tokens per image"):
        tok.decode(torch.zeros(1, tok.tokens_per_item + 1, dtype=torch.long))
    with pytest.raises(OmnitokError, match="not found"):
        load_image_tokenizer(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    tok.save(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OmnitokError, match="safetensors"):
        ImageTokenizer.load(tmp_path / "broken")
    with pytest.raises(OmnitokError, match="downsample"):
        ImageTokenizerConfig(downsample=2)


def _write_world(root: Path, images: np.ndarray, split: str, corrupt: bool = False) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / split / "scene-00000.tar", "w") as tf:
        for i, im in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            data = b"not a png" if corrupt and i == 1 else buf.getvalue()
            for name, payload in ((f"s{i:04d}.png", data), (f"s{i:04d}.json", b'{"heldout_combo": false}')):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def test_shard_reader_and_corrupt_png(tmp_path: Path) -> None:
    images = shapes_demo_images(3, size=32)
    _write_world(tmp_path / "w", images, "train")
    arr, samples = load_split_images(tmp_path / "w", "train", with_meta=True)
    assert np.array_equal(arr, images) and samples[0].meta == {"heldout_combo": False}
    _write_world(tmp_path / "bad", images, "train", corrupt=True)
    with pytest.raises(OmnitokError, match=r"s0001\.png: not a readable PNG"):
        load_split_images(tmp_path / "bad", "train")
    with pytest.raises(OmnitokError, match="no WebDataset shards"):
        load_split_images(tmp_path / "w", "test")


def test_train_logs_checkpoints_and_resumes(tmp_path: Path) -> None:
    images = shapes_demo_images(24, size=32, seed=1)
    _write_world(tmp_path / "w", images[:20], "train")
    _write_world(tmp_path / "w", images[20:], "val")
    cfg = TrainConfig(steps=4, batch_size=4, log_every=2, checkpoint_every=2, arch=dict(TINY), warmup_steps=1)
    timed = TrainConfig(**{**cfg.__dict__, "max_minutes": 0.0})  # the time limit stops it after one step
    s1 = train_image_tokenizer(tmp_path / "w", tmp_path / "run", timed, progress=False)
    assert s1["steps"] == 1 and not s1["completed"] and s1["stopped_by_time_limit"]
    # a truncated checkpoint is named, with the way out, and left for the user to look at
    weights = tmp_path / "run" / "checkpoint" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:100])
    with pytest.raises(OmnitokError, match=r"checkpoint weights .*model\.safetensors.*truncated.*--no-resume"):
        train_image_tokenizer(tmp_path / "w", tmp_path / "run", cfg, progress=False)
    weights.write_bytes(whole)
    # the time limit is operational, not part of the run's identity: the same run resumes without it
    s2 = train_image_tokenizer(tmp_path / "w", tmp_path / "run", cfg, progress=False)
    assert s2["completed"] and s2["steps"] == 4 and s2["val"]["psnr"] > 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["step"] for e in log] == [2, 4] and {"l1", "mse", "edge", "loss", "lr"} <= set(log[0])
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_cfg["command"] == "omnitok tokenizer train image" and run_cfg["config"]["n_train"] == 20
    tok = load_image_tokenizer(tmp_path / "run")  # a run directory resolves to run/tokenizer
    assert tok.encode(images[0]).shape == (tok.tokens_per_item,)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    images = shapes_demo_images(16, size=32, seed=2)
    _write_world(tmp_path / "w", images, "train")
    cfg = TrainConfig(steps=4, batch_size=4, log_every=1, checkpoint_every=3, arch=dict(TINY), warmup_steps=1)
    assert train_image_tokenizer(tmp_path / "w", tmp_path / "a", cfg, progress=False)["completed"]

    def interrupt(entry: dict) -> None:
        if entry["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_image_tokenizer(tmp_path / "w", tmp_path / "b", cfg, progress=False, on_log=interrupt)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # Ctrl-C checkpoints the steps that finished
    train_image_tokenizer(tmp_path / "w", tmp_path / "b", cfg, progress=False)
    wa = load_image_tokenizer(tmp_path / "a").state_dict()
    wb = load_image_tokenizer(tmp_path / "b").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)  # same batches, same optimizer state
    other = TrainConfig(**{**cfg.__dict__, "lr": 1e-4})
    with pytest.raises(OmnitokError, match="different configuration"):
        train_image_tokenizer(tmp_path / "w", tmp_path / "b", other, progress=False)


def test_metrics_and_edge_loss() -> None:
    a = shapes_demo_images(2, size=32)
    assert psnr(a, a) == 100.0 and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
    assert psnr(a, noisy) < 30 and ssim(a, noisy) < 1.0
    x = torch.zeros(1, 3, 8, 8)
    y = x.clone()
    y[..., 4:, :] = 1.0  # one horizontal edge
    assert edge_loss(x, x) == 0 and edge_loss(x, y) > 0


def test_cli_train_encode_decode(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from omnitok.cli import app

    images = shapes_demo_images(12, size=32, seed=3)
    _write_world(tmp_path / "w", images, "train")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 2\nbatch_size: 4\nwarmup_steps: 1\narch: {widths: [8, 8, 8], depths: [1, 1, 1]}\n")
    run = CliRunner().invoke(
        app,
        ["tokenizer", "train", "image", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "run"),
         "--recipe", str(recipe), "--levels", "5,5,3", "--no-progress"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "tokenizer saved to" in run.output
    png = tmp_path / "a.png"
    Image.fromarray(images[0]).save(png)
    codes = tmp_path / "codes.json"
    enc = CliRunner().invoke(
        app, ["tokenizer", "encode", str(png), "--tokenizer", str(tmp_path / "run"), "--out", str(codes)]
    )
    assert enc.exit_code == 0, enc.output
    doc = json.loads(codes.read_text())
    assert doc["codebook_size"] == 75 and len(doc["codes"]["a.png"]) == 16
    dec = CliRunner().invoke(
        app, ["tokenizer", "decode", str(codes), "--tokenizer", str(tmp_path / "run"), "--out", str(tmp_path / "d")]
    )
    assert dec.exit_code == 0, dec.output
    assert np.asarray(Image.open(tmp_path / "d" / "a.png")).shape == (32, 32, 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    res = CliRunner().invoke(
        app, ["tokenizer", "encode", str(bad), "--tokenizer", str(tmp_path / "run"), "--out", str(codes)]
    )
    assert isinstance(res.exception, OmnitokError) and "bad.png" in str(res.exception)
    # a picture of another size would be written under the tokenizer's grid, which decode and the LM rely on
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "wide.png")
    res = CliRunner().invoke(
        app,
        ["tokenizer", "encode", str(tmp_path / "wide.png"), "--tokenizer", str(tmp_path / "run"), "--out", str(codes)],
    )
    assert isinstance(res.exception, OmnitokError) and "a 48x32 image gives 24 codes" in str(res.exception)
    assert json.loads(codes.read_text()) == doc  # the earlier file is untouched

    # A bad number or --data fails before --no-resume removes the run's checkpoint.
    checkpoint = tmp_path / "run" / "checkpoint"
    assert checkpoint.is_dir()
    for args, message in [
        (["--data", str(tmp_path / "w"), "--steps", "-5"], "steps must be > 0, got -5"),
        (["--data", str(tmp_path / "w"), "--lr", "-1"], "lr must be > 0"),
        (["--data", str(tmp_path / "w"), "--batch-size", "0"], "batch_size must be > 0"),
        (["--data", str(tmp_path / "nowhere")], "data directory not found"),
    ]:
        res = CliRunner().invoke(
            app,
            ["tokenizer", "train", "image", "--out", str(tmp_path / "run"), "--recipe", str(recipe), "--no-resume",
             "--no-progress", *args],
        )  # fmt: skip
        assert isinstance(res.exception, OmnitokError) and message in str(res.exception), (args, res.output)
        assert checkpoint.is_dir(), args


def test_lr_schedule_follows_time_budget() -> None:
    from omnitok.tokenizers.image import lr_at

    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-9)
    budget = TrainConfig(**{**cfg.__dict__, "max_minutes": 1.0})
    assert lr_at(10, budget, elapsed_s=0.0) == pytest.approx(1.0)
    assert lr_at(20, budget, elapsed_s=60.0) == pytest.approx(0.0, abs=1e-9)  # budget spent: fully annealed
    assert lr_at(20, budget, elapsed_s=30.0) == pytest.approx(0.5, abs=1e-6)  # half the time: half-way down
