"""The training loop. Everything that happens to the weights during ``omnitok train`` is in this file.

Read it top to bottom: :func:`train` checks the recipe against the data, builds the model, then runs the stages
in order. Each optimizer step:

1. plans one *global* batch (every rank, every micro-step) with the stage's :class:`MixtureSampler`;
2. packs this rank's rows, several whole documents per row; documents never attend to each other (position ids
   restart at 0 for each document; attention runs per document, or under a block-diagonal mask: ``_attention``);
3. runs ``grad_accum`` forward/backward passes, each loss a *sum* over target tokens divided by the number of
   target tokens in the whole global batch, so the gradient is the same mean over tokens whether the batch
   is split over micro-steps, ranks, or neither;
4. clips the global gradient norm, sets the learning rate for this step and steps the optimizers (AdamW, or
   Muon for the hidden matrices and AdamW for the rest: ``_optimizers``).

Choices a reader should know:

- The learning-rate schedule is per stage: linear warmup, then cosine (or linear, or constant) decay to
  ``min_lr_ratio * lr`` at the stage's last step. The lr is a pure function of the step, so there is no
  scheduler state to save.
- Every stage starts fresh optimizers (moments at zero). Stages change what trains, and a stage that trains only
  the new embedding rows then really leaves the old rows bit-identical: their gradient is masked to zero, and
  the vocabulary matrices (like norms and biases) get no weight decay.
- Weights stay float32; the forward/backward runs under bf16 autocast when ``precision`` says so (``auto``: on
  GPUs that support it and on CPUs with AMX or AVX512-BF16). Only target positions are projected onto the vocabulary.
- Under ``torchrun`` the model is wrapped in DDP (gloo on CPU, NCCL on GPU), or sharded with FSDP2 when the
  recipe says ``distributed.strategy: fsdp`` (GPU only).
- A checkpoint holds everything the next step depends on (weights, optimizer moments, sampler position, RNG), so a
  resumed run reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from omnitok import image_positions
from omnitok.data.packing import IGNORE, Batch, MixtureSampler, block_causal_mask, pack_rows
from omnitok.data.shards import TokenDataset, load_manifest
from omnitok.errors import OmnitokError
from omnitok.io import atomic_write_bytes, ensure_writable_dir, write_run_config
from omnitok.model import base_vocab_size, build_model, init_code_embeddings
from omnitok.optim import adamw
from omnitok.train import checkpoint as ckpt
from omnitok.train.attention import NAME as PACKED_ATTENTION
from omnitok.train.attention import DocumentSpans
from omnitok.train.muon import Muon
from omnitok.train.recipe import BatchConfig, OptimConfig, Recipe, check_data, recipe_changes

FLASH = ("flash_attention_2", "flash_attention_3")


# --- processes and devices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    bf16: bool
    owns_group: bool  # this run started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def _bf16_is_fast(cuda: bool) -> bool:
    """bf16 autocast where the hardware has bf16 matmul instructions: Ampere+ GPUs, and CPUs with AMX or AVX512-BF16.

    oneDNN runs bf16 matmuls on AMX tiles (Sapphire Rapids and later: the toy-world model trains 1.55x faster than in
    float32) and with AVX512-BF16 dot products (Zen 4, Cooper Lake: 1.37x); elsewhere bf16 on a CPU is converted
    in software and slower, so float32 stays (benchmarks/train_precision.py, docs/BENCHMARKS.md).
    """
    if cuda:
        return torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _runtime(recipe: Recipe) -> Runtime:
    """Join the process group when launched by torchrun; choose device and precision."""
    cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise OmnitokError("device: 'cuda' asked for, but torch sees no CUDA GPU")
    if recipe.distributed.strategy == "fsdp" and not cuda:
        raise OmnitokError("distributed.strategy: 'fsdp' needs CUDA GPUs; use 'ddp' on CPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and _bf16_is_fast(cuda))
    return Runtime(rank=rank, world=world, device=device, bf16=bf16, owns_group=owns_group)


def _attention(model: torch.nn.Module, recipe: Recipe, rt: Runtime) -> str:
    """How the documents packed into a row are kept from attending to each other: ``flash``, ``packed`` or ``mask``.

    ``flash``: a flash-attention model finds them from the position ids. ``packed`` (``auto`` on a CPU): attention
    runs per document (``omnitok.train.attention``), which trained the toyworld model 1.19x faster on a 2-core CPU
    than ``mask``, a dense block-diagonal mask for SDPA (docs/BENCHMARKS.md; ``auto`` on a GPU, where the packed
    kernel is unmeasured).
    """
    implementation = model.config._attn_implementation
    if implementation in FLASH:
        if recipe.attention != "auto":
            raise OmnitokError(
                f"attention: {recipe.attention!r} is for sdpa or eager models; this model uses {implementation}, "
                "which keeps packed documents apart by itself: leave attention at auto"
            )
        return "flash"
    mode = recipe.attention if recipe.attention != "auto" else ("packed" if rt.device.type == "cpu" else "mask")
    if mode == "packed":
        # Only the training forward passes document spans; anything else the model runs falls back to SDPA.
        model.config._attn_implementation = PACKED_ATTENTION
    return mode


def _all_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(rt: Runtime) -> None:
    if rt.world > 1:
        dist.barrier()


# --- what trains, and how fast -------------------------------------------------------------------------------


def _vocab_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    mats = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not mats[0]:
        mats.append(head.weight)
    return mats


def _select_trainable(model: torch.nn.Module, mode: str, base_vocab: int) -> list[Any]:
    """Set ``requires_grad`` for the stage; returns hook handles to remove when it ends."""
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    # new_embeddings: only rows >= base_vocab of the embedding and output matrices learn.
    for p in model.parameters():
        p.requires_grad_(False)

    def keep_old_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:base_vocab] = 0
        return grad

    handles = []
    for w in _vocab_matrices(model):
        w.requires_grad_(True)
        handles.append(w.register_hook(keep_old_rows))
    table = image_positions.get(model)
    if table is not None:  # new with the image codes, like their rows
        table.weight.requires_grad_(True)
    return handles


def _optimizers(model: torch.nn.Module, o: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for every parameter, or (``optim.name: muon``) Muon for the hidden matrices and AdamW for the rest.

    Muon orthogonalises each matrix's momentum before the update, so every direction of a weight matrix moves at
    the same rate; it is meant for hidden matrices only, which is why the embeddings, the head, norms and biases
    stay with AdamW. Its update is scaled to AdamW's RMS (``match_rms_adamw``), so one ``lr`` and one schedule
    serve both. A list, because checkpointing (``get_optimizer_state_dict``) handles several optimizers by name.
    """
    vocab = {id(w) for w in _vocab_matrices(model)}
    table = image_positions.get(model)
    if table is not None:  # an embedding table too: AdamW without decay, not Muon
        vocab.add(id(table.weight))
    hidden, decay, rest = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in vocab:
            rest.append(p)
        else:
            (hidden if o.name == "muon" else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opts: list[torch.optim.Optimizer] = []
    if groups:
        opts.append(adamw(groups, device, lr=o.lr, betas=o.betas, eps=o.eps))
    if hidden:
        # Newton-Schulz in bf16 as the reference does, but in float32 where bf16 matmuls are emulated (a 2-core Xeon
        # without AVX512-BF16: 0.67 s of a 1.5 s step in bf16, 0.20 s in float32; omnitok.train.muon)
        ns_dtype = torch.bfloat16 if _bf16_is_fast(device.type == "cuda") else torch.float32
        opts.append(
            Muon(hidden, lr=o.lr, weight_decay=o.weight_decay, adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype)
        )
    return opts


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Learning rate for the ``step``-th update (0-based) of a stage of ``total`` updates."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - 1 - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "linear":
        return o.lr - (o.lr - floor) * progress
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- wrapping for several processes --------------------------------------------------------------------------


def _wrap(model: torch.nn.Module, recipe: Recipe, rt: Runtime) -> torch.nn.Module:
    """DDP is re-wrapped per stage (it tracks which parameters train); FSDP2 shards once, in place."""
    if rt.world == 1:
        return model
    if recipe.distributed.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not getattr(model, "_omnitok_sharded", False):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if rt.bf16 else None, reduce_dtype=torch.float32)
            for module in model.modules():
                if type(module).__name__.endswith("DecoderLayer"):
                    fully_shard(module, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            model._omnitok_sharded = True
        return model
    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


@contextlib.contextmanager
def _grad_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    else:
        yield


# --- one step ------------------------------------------------------------------------------------------------


def _bucketed(keep: torch.Tensor, bucket: int = 512) -> torch.Tensor:
    """``keep`` plus the first non-target positions needed to make its count a multiple of ``bucket``.

    The head's matmul then takes a few shapes instead of a new one every step: oneDNN builds a bf16 kernel per
    shape, and rebuilding it each step cost more than bf16 saved (measured on an AMX CPU). The added positions
    have no label, so they add nothing to the loss.
    """
    n = int(keep.sum())
    extra = min(-(-n // bucket) * bucket, keep.numel()) - n
    if extra <= 0:
        return keep
    keep = keep.clone()
    flat = keep.view(-1)
    flat[(~flat).nonzero().squeeze(1)[:extra]] = True
    return keep


def _micro_batches(
    plan: list[list[Any]], datasets: dict[str, TokenDataset], b: BatchConfig, rt: Runtime
) -> list[Batch]:
    """This rank's packed micro-batches of one step's plan (rows of micro-step m, rank r: one contiguous block)."""
    out = []
    for m in range(b.grad_accum):
        lo = (m * rt.world + rt.rank) * b.micro_batch
        out.append(pack_rows(plan[lo : lo + b.micro_batch], datasets, b.seq_len))
    return out


_BOOL_KEEP = True  # this transformers takes a boolean logits_to_keep (cleared at the first forward that refuses it)


def _forward_loss(model: torch.nn.Module, batch: Batch, rt: Runtime, attention: str) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target tokens."""
    input_ids = batch.input_ids.to(rt.device, non_blocking=True)
    labels = batch.labels.to(rt.device, non_blocking=True)
    position_ids = batch.position_ids.to(rt.device, non_blocking=True)
    # How documents packed into one row are kept apart (see _attention): flash attention finds the boundaries from
    # position ids resetting to 0, the packed kernel from the documents' spans, other kernels need the dense mask.
    mask, spans = None, {}
    if attention == "packed":
        spans = {"document_spans": DocumentSpans(batch.doc_ids, device=rt.device)}  # grouped on the host
    elif attention == "mask":
        mask = block_causal_mask(batch.doc_ids.to(rt.device, non_blocking=True))
    # Position i predicts token i+1: shift the labels (cheap) rather than the logits (a copy of [B, L, vocab]).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    keep = _bucketed(targets != IGNORE)
    global _BOOL_KEEP
    with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
        # Only target positions go through the vocabulary head (a boolean ``logits_to_keep``): with prompts,
        # images given as input and padding masked out, that is about half the positions, and the head is the
        # largest matmul of a small model with a multimodal vocabulary.
        args = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "use_cache": False}
        try:
            out = model(**args, logits_to_keep=keep if _BOOL_KEEP else 0, **spans)
        except IndexError:
            if not _BOOL_KEEP:
                raise
            # Some transformers releases (5.17's Llama) index the hidden states with logits_to_keep as a slice
            # over the sequence only, which a [B, L] mask cannot be: keep every position from now on.
            _BOOL_KEEP = False
            out = model(**args, logits_to_keep=0, **spans)
    logits = out.logits
    if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
        return F.cross_entropy(logits.float(), targets[keep], ignore_index=IGNORE, reduction="sum")
    # A model whose forward ignores boolean ``logits_to_keep`` returned every position.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def _optimizer_step(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    params: list[torch.nn.Parameter],
    micro: list[Batch],
    lr: float,
    o: OptimConfig,
    rt: Runtime,
    attention: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update from this rank's micro-batches; returns (this rank's loss sum, global targets, grad norm)."""
    targets = _all_sum(torch.tensor(float(sum(b.targets for b in micro)), device=rt.device), rt)
    scale = rt.world / targets.clamp(min=1)  # DDP averages gradients over ranks: undo that, divide by tokens
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for m, batch in enumerate(micro):
        with _grad_sync(model, sync=m == len(micro) - 1):
            loss = _forward_loss(model, batch, rt, attention)
            (loss * scale).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum, targets, grad_norm


# --- bookkeeping ---------------------------------------------------------------------------------------------


def _stage_position(recipe: Recipe, step: int) -> tuple[int, int]:
    """(stage index, updates done in it) after ``step`` updates overall."""
    done = 0
    for i, s in enumerate(recipe.stages):
        if step < done + s.steps:
            return i, step - done
        done += s.steps
    return len(recipe.stages), 0


def _find_resume(recipe: Recipe, resume: bool | None, vocab_size: int) -> Path | None:
    found = ckpt.latest_checkpoint(recipe.out)
    if resume is False:
        if found is not None:
            raise OmnitokError(
                f"out: {recipe.out} already holds checkpoints (latest {found.name}); resume, or choose another out"
            )
        return None
    if found is None:
        if resume:
            raise OmnitokError(f"--resume: no checkpoint under {ckpt.checkpoint_dir(recipe.out)}")
        return None
    state = ckpt.load_trainer_state(found)
    if state.get("vocab_size") != vocab_size:
        raise OmnitokError(
            f"data: {recipe.data}/vocab.json has size {vocab_size} but checkpoint {found} was trained with "
            f"vocab_size {state.get('vocab_size')}"
        )
    return found


def _trim_log(path: Path, step: int) -> None:
    """Forget log lines of steps past the checkpoint we start from (all of them when starting afresh)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


class _Logger:
    """JSONL always, TensorBoard when installed and asked for; only the main process writes."""

    def __init__(self, recipe: Recipe, rt: Runtime) -> None:
        self.path = recipe.out / "log.jsonl" if rt.main else None
        self.tb = None
        if rt.main and recipe.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(recipe.out / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; logging to log.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:  # one line per log step: cheap, and never half-open after a crash
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def write_validation(self, record: dict[str, Any]) -> None:
        """``val.jsonl``: one line per validation, ``{"step", "stage", "loss": {task: loss}, "seconds"}``."""
        if self.path is not None:
            with open(self.path.with_name("val.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for task, v in record["loss"].items():
                self.tb.add_scalar(f"val/{task}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(enabled: bool):  # -> rich Progress (imported lazily: the CLI's startup stays light)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _save(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    recipe: Recipe,
    rt: Runtime,
    trainer_state: dict[str, Any],
) -> None:
    # Collective under FSDP (every rank gathers), so every rank calls this; only rank 0 writes.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizers, options=opts)
    rngs = [ckpt.rng_state()]
    if rt.world > 1:
        rngs = [None] * rt.world
        dist.all_gather_object(rngs, ckpt.rng_state())
    if rt.main:
        state = {**trainer_state, "rng": rngs}
        ckpt.save_checkpoint(recipe.out, trainer_state["step"], model_state, optim_state, state, recipe.checkpoint.keep)
    _barrier(rt)


def _save_final(model: torch.nn.Module, recipe: Recipe, rt: Runtime) -> Path:
    """``out/final``: a plain transformers directory plus the vocabulary, what a bundle is built from."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = recipe.out / "final"
    if rt.main:
        tmp = recipe.out / f".final.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain = model.module if isinstance(model, DistributedDataParallel) else model
        # transformers draws its own "Writing model shards" tqdm bar into the trainer's rich display: not here.
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            image_positions.save(plain, tmp, state)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        shutil.copyfile(recipe.data / "vocab.json", tmp / "vocab.json")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _barrier(rt)
    return final


def _made_by(recipe: Recipe) -> tuple[Path, dict[str, Any]]:
    """The token directory's run record and what it was made with (pretokenize's config: tokenizer paths)."""
    from omnitok.io import read_json

    record = recipe.data / "config.json"
    return record, read_json(record, "token directory record").get("config", {}) if record.exists() else {}


def _codec_vectors(recipe: Recipe) -> list[tuple[int, torch.Tensor]]:
    """(first row, code vectors) of every codebook whose tokenizer (as recorded by pretokenize) exposes them."""
    from omnitok.tokenizers.base import load_image_tokenizer
    from omnitok.tokenizers.speech import load_speech_tokenizer
    from omnitok.vocab import Vocabulary

    record, made_by = _made_by(recipe)

    def missing(what: str) -> OmnitokError:
        return OmnitokError(
            f"code_embeddings: codec needs the {what} that made {recipe.data}, but {record} names none "
            "(token directories written by omnitok pretokenize do); use code_embeddings: random"
        )

    # Checked before vocab.json is read: a token directory without tokenizers may not have a full vocabulary.
    if not any(k.endswith("_tokenizer") and v for k, v in made_by.items()):
        raise missing("tokenizers")
    loaders = {"image": load_image_tokenizer, "speech": load_speech_tokenizer}
    vocab = Vocabulary.load(recipe.data)
    out = []
    for r in vocab.codebooks:
        path = made_by.get(f"{r.modality}_tokenizer")
        if not path:
            raise missing(f"{r.modality} tokenizer")
        tok = loaders[r.modality](path)
        if not hasattr(tok, "code_vectors"):
            print(f"note: the {r.modality} tokenizer at {path} has no code vectors; its rows stay random")
            continue
        v = tok.code_vectors(r.level)
        if v.shape[0] != r.size:
            raise OmnitokError(
                f"code_embeddings: {path} has {v.shape[0]} codes at level {r.level}, vocab.json has {r.size}"
            )
        out.append((r.start, v))
    return out


def _build(recipe: Recipe, vocab_size: int) -> torch.nn.Module:
    """The recipe's model, with image position embeddings when ``model.image_positions`` asks for them.

    A ``model.pretrained`` that is an omnitok bundle's ``lm/`` brings its own learned table; it is kept (whatever
    ``image_positions`` says: it is part of the weights) once it is checked against the token directory's images.
    """
    model = build_model(recipe.model, vocab_size)
    table = image_positions.get(model)
    if table is None and recipe.model.get("image_positions"):
        tokens, codes, openers = _image_layout(recipe)
        image_positions.add_image_positions(model, tokens, codes, openers)
    elif table is not None:
        try:
            tokens, codes, openers = _image_layout(recipe)
        except OmnitokError as e:
            raise OmnitokError(f"model.pretrained: the LM places image codes, but {recipe.data} cannot: {e}") from e
        if (table.tokens, table.codes, sorted(table.openers.tolist())) != (tokens, codes, sorted(openers)):
            raise OmnitokError(
                f"model.pretrained: its image positions are for {table.tokens} codes in ids {list(table.codes)}, "
                f"but {recipe.data} has {tokens} codes per image in ids {list(codes)}: the LM was trained with "
                "another image tokenizer or vocabulary"
            )
    return model


def _image_layout(recipe: Recipe) -> tuple[int, tuple[int, int], list[int]]:
    """Codes per image (from the image tokenizer pretokenize recorded), the image code ids, and the span openers."""
    from omnitok.tokenizers.base import load_image_tokenizer
    from omnitok.vocab import FRAME, SPAN_TOKENS, Vocabulary

    record, made_by = _made_by(recipe)
    vocab = Vocabulary.load(recipe.data)
    if "image" not in vocab.modalities or not made_by.get("image_tokenizer"):
        raise OmnitokError(
            f"model.image_positions: needs image codes and the image tokenizer that made {recipe.data}, "
            f"but {record} names none; set model.image_positions: false"
        )
    if vocab.levels("image") != 1:
        raise OmnitokError("model.image_positions: supports one image code level, vocab.json has several")
    r = vocab.code_range("image", 0)
    tokens = int(load_image_tokenizer(made_by["image_tokenizer"]).tokens_per_item)
    return tokens, (r.start, r.stop), [vocab.special(SPAN_TOKENS["image"][0]), vocab.special(FRAME)]


def _write_bundle(final: Path, recipe: Recipe) -> Path | None:
    """End with a bundle when the token directory records which tokenizers produced it (omnitok pretokenize)."""
    from omnitok.bundle import save_bundle
    from omnitok.vocab import Vocabulary

    _, made_by = _made_by(recipe)
    if not made_by.get("image_tokenizer"):
        return None  # synthetic tokens: no tokenizers to bundle
    return save_bundle(
        recipe.out / "bundle",
        final,
        Vocabulary.load(recipe.data),
        recipe.data / "text_tokenizer",
        made_by["image_tokenizer"],
        made_by.get("speech_tokenizer"),
        extra={"trained_by": {"recipe": recipe.name, "out": str(recipe.out)}},
        read_aloud_words=int(made_by.get("read_aloud_words", 0)),  # tokens made before it was recorded: plain
        caption_image_drop=float(made_by.get("caption_image_drop", 0.0)),  # likewise: captions always had a picture
    )


# --- validation ----------------------------------------------------------------------------------------------


def _validation_rows(recipe: Recipe) -> dict[str, tuple[TokenDataset, list[list[tuple[str, int]]]]]:
    """Per task: its validation documents packed in order into rows (fixed, so every validation is comparable)."""
    v = recipe.validation
    if v.docs == 0:
        return {}
    manifest = load_manifest(recipe.data)["splits"].get(v.split, {})
    seq_len = recipe.batch.seq_len
    out = {}
    for task in recipe.tasks:
        if manifest.get(task, {}).get("docs", 0) == 0:
            continue
        ds = TokenDataset(recipe.data, v.split, task)
        rows: list[list[tuple[str, int]]] = [[]]
        used = 0
        for i in range(min(v.docs, len(ds))):
            n = min(int(ds.lengths[i]), seq_len)
            if used + n > seq_len:
                rows.append([])
                used = 0
            rows[-1].append((task, i))
            used += n
        out[task] = (ds, rows)
    return out


@torch.no_grad()
def _validate(
    model: torch.nn.Module, sets: dict[str, Any], recipe: Recipe, rt: Runtime, attention: str
) -> dict[str, float]:
    """Mean loss per target token of each task's validation rows (every rank computes all: it is small)."""
    was_training = model.training
    model.eval()
    losses = {}
    for task, (ds, rows) in sets.items():
        total, targets = 0.0, 0
        for lo in range(0, len(rows), recipe.batch.micro_batch):
            batch = pack_rows(rows[lo : lo + recipe.batch.micro_batch], {task: ds}, recipe.batch.seq_len)
            total += float(_forward_loss(model, batch, rt, attention))
            targets += batch.targets
        losses[task] = total / max(targets, 1)
    model.train(was_training)
    return losses


def measure_throughput(recipe: Recipe, steps: int = 6, warmup: int = 2) -> float:
    """Training positions per second of ``recipe`` on this machine: ``steps`` timed updates after ``warmup``.

    A throwaway model and optimizer, nothing written: a quick reading for benchmarks that compare where or how a
    recipe trains. It is not what plans a time-boxed run: on a 2-core CPU it read up to 30 % below the speed the
    run then trained at (docs/BENCHMARKS.md), so ``omnitok.train.budget`` times the run's own first steps instead.
    """
    vocab_size = check_data(recipe)
    rt = _runtime(recipe)
    torch.manual_seed(recipe.seed)
    model = _build(recipe, vocab_size).to(rt.device)
    attention = _attention(model, recipe, rt)
    stage = recipe.stages[0]
    b, o = stage.batch(recipe.batch), stage.optim(recipe.optim)
    datasets = {t: TokenDataset(recipe.data, recipe.split, t) for t in stage.mixture}
    sampler = MixtureSampler({t: d.lengths for t, d in datasets.items()}, stage.mixture, b.seq_len, recipe.seed)
    optimizers = _optimizers(model, o, rt.device)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = b.micro_batch * b.grad_accum * rt.world
    t0 = 0.0
    for k in range(warmup + steps):
        if k == warmup:
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        micro = _micro_batches(sampler.plan(k, rows), datasets, b, rt)
        _optimizer_step(model, optimizers, params, micro, o.lr, o, rt, attention)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * rows * b.seq_len / (time.perf_counter() - t0)


# --- the loop ------------------------------------------------------------------------------------------------


def train(
    recipe: Recipe, *, resume: bool | None = None, progress: bool = True, max_steps: int | None = None
) -> dict[str, Any]:
    """Run every stage of ``recipe``. ``resume``: None continues from the newest checkpoint if there is one.

    ``max_steps`` stops the run after that many updates overall with a checkpoint there and no final model: a
    later call continues exactly where it stopped (a time-boxed job, or ``omnitok.train.budget`` timing the
    run's first steps before it plans the rest).

    Returns ``{"step", "final", "log", "validation"}``: the train and validation records this process logged;
    ``final`` is None when ``max_steps`` stopped the run before its end.
    """
    # Everything that can be wrong with the recipe or the data fails here, before the model is built.
    vocab_size = check_data(recipe)
    resume_from = _find_resume(recipe, resume, vocab_size)
    rt = _runtime(recipe)
    if rt.main:
        ensure_writable_dir(recipe.out, "out")
        write_run_config(recipe.out, "omnitok train", {**recipe.to_dict(), "vocab_size": vocab_size})
    _barrier(rt)

    torch.manual_seed(recipe.seed)
    model = _build(recipe, vocab_size)
    base_vocab = base_vocab_size(model)
    if recipe.code_embeddings == "codec" and resume_from is None:
        # Only rows the model brings no weights for: a pretrained omnitok LM's code rows are already trained.
        fresh = [(start, v) for start, v in _codec_vectors(recipe) if start >= base_vocab]
        if fresh:
            init_code_embeddings(model, fresh, seed=recipe.seed)
    attention = _attention(model, recipe, rt)
    if recipe.distributed.strategy == "fsdp" and any(s.trainable != "all" for s in recipe.stages) and rt.world > 1:
        raise OmnitokError("stages[].trainable: new_embeddings is not supported with distributed.strategy fsdp")
    datasets = {t: TokenDataset(recipe.data, recipe.split, t) for t in recipe.tasks}
    lengths = {t: d.lengths for t, d in datasets.items()}

    step, saved = 0, None
    drawn: dict[str, int] = {}
    if resume_from is not None:
        saved = ckpt.load_trainer_state(resume_from)
        if saved.get("recipe_hash") != recipe.hash() and rt.main:
            changes = recipe_changes(saved["recipe"], recipe.identity()) if "recipe" in saved else []
            shown = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
            print(
                f"note: the recipe changed since {resume_from} was written ({shown or 'details not kept'}); "
                "continuing with the new one"
            )
        try:
            model.load_state_dict(ckpt.load_model_state(resume_from))
        except RuntimeError as e:  # e.g. model.image_positions turned on or off since the checkpoint was written
            raise OmnitokError(
                f"{resume_from}: its weights do not fit the recipe's model ({str(e).splitlines()[0]} ...); "
                "restore the model section it was trained with, or start in a new out directory"
            ) from e
        step = int(saved["step"])
        drawn = dict(saved["sampler"]["drawn"])
        if len(saved["rng"]) == rt.world:  # same RNG stream as the uninterrupted run (dropout, if any)
            ckpt.set_rng_state(saved["rng"][rt.rank])
    if rt.main:
        _trim_log(recipe.out / "log.jsonl", step)
        _trim_log(recipe.out / "val.jsonl", step)
    val_sets = _validation_rows(recipe)
    validations: list[dict[str, Any]] = []
    model.to(rt.device)
    start_stage, start_in_stage = _stage_position(recipe, step)

    logger = _Logger(recipe, rt)
    history: list[dict[str, Any]] = []
    bar = _progress(progress and rt.main)
    bar.start()
    t_start = time.perf_counter()
    tokens_seen = int(saved.get("tokens", 0)) if saved else 0
    stopped, final = False, None
    try:
        for si, stage in enumerate(recipe.stages):
            if si < start_stage:
                continue
            if max_steps is not None and step >= max_steps:
                stopped = True
                break
            first = start_in_stage if si == start_stage else 0
            b, o = stage.batch(recipe.batch), stage.optim(recipe.optim)
            hooks = _select_trainable(model, stage.trainable, base_vocab)
            wrapped = _wrap(model, recipe, rt)
            optimizers = _optimizers(model, o, rt.device)
            sampler = MixtureSampler(lengths, stage.mixture, b.seq_len, recipe.seed)
            sampler.load_state_dict({"drawn": drawn, "pending": []})
            if saved is not None and first > 0:  # resuming inside this stage: its optimizer and sampler too
                sampler.load_state_dict(saved["sampler"])
                was = saved.get("recipe", {}).get("optim", {}).get("name", "adamw")  # older checkpoints: AdamW
                if was == o.name:
                    set_optimizer_state_dict(wrapped, optimizers, ckpt.load_optimizer_state(resume_from))
                elif rt.main:  # one optimizer's moments mean nothing to another
                    print(
                        f"note: {resume_from} holds {was}'s state and the recipe now says optim.name {o.name!r}: "
                        f"stage {stage.name!r} continues with fresh optimizer moments"
                    )
            rows = b.micro_batch * b.grad_accum * rt.world
            params = [p for p in model.parameters() if p.requires_grad]
            task = bar.add_task(stage.name, total=stage.steps, completed=first, loss="-", speed="")
            window_loss = torch.zeros((), dtype=torch.float64, device=rt.device)  # this rank's summed loss
            window_targets = torch.zeros((), dtype=torch.float64, device=rt.device)  # global, same on all ranks
            window_real = window_positions = 0  # global, from the plan
            t_window = time.perf_counter()

            for k in range(first, stage.steps):
                if max_steps is not None and step >= max_steps:
                    stopped = True
                    break
                plan = sampler.plan(step, rows)
                micro = _micro_batches(plan, datasets, b, rt)
                lr = lr_at(k, stage.steps, o)
                loss_sum, targets, grad_norm = _optimizer_step(wrapped, optimizers, params, micro, lr, o, rt, attention)
                step += 1

                real = sum(int(sampler.lengths[t][i]) for row in plan for t, i in row)
                tokens_seen += real
                window_real += real
                window_positions += rows * b.seq_len
                window_loss += loss_sum
                window_targets += targets
                last = k == stage.steps - 1
                every = recipe.checkpoint.every
                save = bool(every and step % every == 0) or last or step == max_steps
                # Logging at every checkpoint too keeps a resumed run's log windows identical to the original's.
                if (k + 1) % recipe.log.every == 0 or save:
                    now = time.perf_counter()
                    record = {
                        "step": step,
                        "stage": stage.name,
                        "stage_step": k + 1,
                        "loss": float(_all_sum(window_loss, rt) / window_targets.clamp(min=1)),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": window_real / (now - t_window),
                        "real_fraction": window_real / window_positions,
                        "tokens": tokens_seen,
                        "elapsed_s": now - t_start,
                    }
                    logger.write(record)
                    history.append(record)
                    bar.update(task, loss=f"{record['loss']:.4f}", speed=f"{record['tokens_per_s']:,.0f} tok/s")
                    window_loss.zero_()
                    window_targets.zero_()
                    window_real = window_positions = 0
                    t_window = time.perf_counter()
                bar.update(task, completed=k + 1)

                at_end = last and (recipe.validation.stage_ends or si == len(recipe.stages) - 1)
                if val_sets and (at_end or (recipe.validation.every and step % recipe.validation.every == 0)):
                    t_val = time.perf_counter()
                    val = {
                        "step": step,
                        "stage": stage.name,
                        "loss": _validate(wrapped, val_sets, recipe, rt, attention),
                    }
                    val["seconds"] = round(time.perf_counter() - t_val, 3)  # what the curve cost a time-boxed run
                    logger.write_validation(val)
                    validations.append(val)
                    if progress and rt.main:
                        losses = "  ".join(f"{t} {v:.3f}" for t, v in val["loss"].items())
                        bar.console.print(f"step {step} validation loss: {losses}")

                if save:
                    state = {
                        "step": step,
                        "stage": si,
                        "stage_name": stage.name,
                        "stage_step": k + 1,
                        "sampler": {**sampler.state_dict(), "drawn": {**drawn, **sampler.drawn}},
                        "tokens": tokens_seen,
                        "vocab_size": vocab_size,
                        "base_vocab_size": base_vocab,
                        "world_size": rt.world,
                        "recipe_hash": recipe.hash(),
                        "recipe": recipe.identity(),
                    }
                    _save(wrapped, optimizers, recipe, rt, state)

            drawn.update(sampler.drawn)
            for h in hooks:
                h.remove()
            del wrapped, optimizers
            if stopped:
                break

        if not stopped:
            final = _save_final(model, recipe, rt)
            if rt.main:
                _write_bundle(final, recipe)
        # Every rank leaves together: a rank that tore its gloo connections down and exited while rank 0 was still
        # writing the bundle was once seen to abort at exit ("terminate called without an active exception").
        _barrier(rt)
    finally:
        bar.stop()
        logger.close()
        if rt.owns_group:
            dist.destroy_process_group()
    return {"step": step, "final": str(final) if final else None, "log": history, "validation": validations}


def stage_summary(recipe: Recipe) -> list[dict[str, Any]]:
    """What each stage will do, resolved (for the CLI to print before starting)."""
    rows = []
    for s in recipe.stages:
        b, o = s.batch(recipe.batch), s.optim(recipe.optim)
        rows.append(
            {
                "stage": s.name,
                "steps": s.steps,
                "trainable": s.trainable,
                "mixture": ", ".join(f"{t} {w:g}" for t, w in s.mixture.items()),
                "seq_len": b.seq_len,
                "rows/step": f"{b.micro_batch}x{b.grad_accum}",
                "lr": f"{o.lr:g} ({o.schedule})",
            }
        )
    return rows


__all__ = ["lr_at", "stage_summary", "train"]
