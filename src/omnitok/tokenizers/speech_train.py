"""Training the own speech tokenizer on a world's spoken captions and questions/answers (CPU, minutes).

One loss per job the tokens and side networks have:

* mel L1: tokens + style must reproduce the (normalised) log-mel spectrogram;
* phone CTC on the quantized tokens (eSpeak's phonemes from the world's metadata): tokens carry content;
* voice classification and embedding matching for the style encoder: a reference clip yields a voice vector
  the decoder understands (a fraction ``ref_prob`` of each batch is decoded with it instead of the label);
* rate classification from the (detached) tokens: lets decode() read the tokens' speaking rate.

``recon_grad`` scales the reconstruction gradient that reaches the encoder (1 = plain autoencoder,
0 = tokens shaped by the CTC loss alone, as in EMOVA's phone-CTC encoder): the knob between "tokens keep
everything the mel needs" and "tokens keep only content".

The run directory holds ``config.json`` (the run record), ``log.json``, ``checkpoint/`` (model and optimizer
as safetensors + ``state.json``; resumed automatically), ``tokenizer/`` and ``summary.json``. Batches are drawn
from a generator seeded with ``(seed, step)``, so a resumed run sees the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnitok.errors import OmnitokError, check_numbers
from omnitok.tokenizers.base import TRAIN_NON_NEGATIVE, TRAIN_POSITIVE, read_checkpoint
from omnitok.tokenizers.speech import SpeechTokenizer, SpeechTokenizerConfig, phone_units


@dataclass
class SpeechTrainConfig:
    """How to train; recorded in the run's config.json and checkpoint so a resume continues the same run."""

    steps: int = 1200
    batch_seconds: float = 40.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    mel_weight: float = 1.0
    ctc_weight: float = 1.0
    recon_grad: float = 1.0
    voice_weight: float = 0.1
    rate_weight: float = 0.1
    pitch_weight: float = 0.5
    # Adversarial style removal: per-token classifiers of voice and pitch class behind a gradient reversal, so
    # the encoder is pushed to drop what identifies the speaker from the tokens (0 = off).
    adv_weight: float = 0.5
    ref_prob: float = 0.3
    ref_seconds: float = 3.0
    kinds: tuple[str, ...] = ("scene", "spoken_qa")
    max_clips: int | None = None
    f0_clips_per_class: int = 12
    val_clips: int = 64
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 200
    max_minutes: float | None = None
    # None: the cores other processes leave free now (``auto_threads``). With OpenMP's busy-waiting, two threads on
    # a 2-core machine that other processes also use ran 20x slower per step than one thread (8 s against 0.35 s);
    # on an idle one two threads take 1.4x the steps of one.
    threads: int | None = None
    device: str = "cpu"
    arch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        bad = sorted(set(self.kinds) - {"scene", "spoken_qa"})
        if bad:
            raise OmnitokError(f"speech train config: kinds {bad} have no speech; expected 'scene' and/or 'spoken_qa'")
        check_numbers(
            self,
            "speech train config",
            positive=(*TRAIN_POSITIVE, "batch_seconds", "max_clips"),
            non_negative=(*TRAIN_NON_NEGATIVE, "recon_grad", "val_clips"),
        )
        if not 0.0 <= self.recon_grad <= 1.0:
            raise OmnitokError(f"speech train config: recon_grad must be in [0, 1], got {self.recon_grad}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "speech train config") -> SpeechTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OmnitokError(f"{where}: unknown training fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# Fields that change how a run is executed or observed, not what it computes: a resume may change them.
_OPERATIONAL = frozenset({"max_minutes", "threads", "device", "log_every", "checkpoint_every", "val_clips"})


def lr_at(step: int, cfg: SpeechTrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``.

    In steps only, also where ``max_minutes`` stops the run early (the demo's box: a fifth to a third of the steps on
    two cores), so such a run ends near its peak rate. Decaying with the time budget instead, as the image tokenizer
    does, ended worse in both boxes measured: phone error 0.63 against 0.43 in 72 s, 0.37 against 0.26 in 144 s
    (BENCHMARKS "The tokenizers' boxes where the LM is short of steps"; ``benchmarks/tokenizer_box.py``).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ----------------------------------------------------------------------------------------------- data


@dataclass
class SpeechClip:
    """One utterance with the world's labels (``record`` is the world's speech metadata)."""

    wav: np.ndarray
    record: dict[str, Any]
    key: str = ""


def load_world_clips(
    world: str | os.PathLike[str],
    split: str,
    kinds: tuple[str, ...] = ("scene", "spoken_qa"),
    limit: int | None = None,
) -> list[SpeechClip]:
    """Every spoken utterance of ``split`` (scene captions; spoken questions and answers), in shard order."""
    from omnitok.world.read import iter_samples, load_manifest

    manifest = load_manifest(world)
    if not manifest.get("config", {}).get("speech", True):
        raise OmnitokError(f"world {world} was built with --no-speech; rebuild it with speech to train on it")
    clips: list[SpeechClip] = []
    for kind in kinds:
        pairs = (
            [("wav", "speech")]
            if kind == "scene"
            else [("question.wav", "question_speech"), ("answer.wav", "answer_speech")]
        )
        for s in iter_samples(world, split, kind):
            for wav_key, meta_key in pairs:
                if wav_key in s and meta_key in s["meta"]:
                    clips.append(SpeechClip(np.asarray(s[wav_key], np.float32), s["meta"][meta_key], s["key"]))
            if limit is not None and len(clips) >= limit:
                return clips[:limit]
    if not clips:
        raise OmnitokError(f"world {world}: split {split!r} holds no speech clips of kinds {list(kinds)}")
    return clips


def measure_f0_centroids(clips: list[SpeechClip], per_class: int) -> dict[str, dict[str, float]]:
    """Median F0 per (voice, pitch) over up to ``per_class`` clips each: the style centroids."""
    from omnitok.world.speech import estimate_f0

    found: dict[tuple[str, str], list[float]] = {}
    for c in clips:
        key = (c.record["voice"], c.record["pitch"])
        vals = found.setdefault(key, [])
        if len(vals) < per_class:
            f0 = estimate_f0(c.wav, int(c.record.get("sample_rate", 16000)))
            if math.isfinite(f0):
                vals.append(f0)
    table: dict[str, dict[str, float]] = {}
    for (voice, pitch), vals in sorted(found.items()):
        if vals:
            table.setdefault(voice, {})[pitch] = float(np.median(vals))
    return table


@dataclass
class _Prepared:
    mels: list[torch.Tensor]  # raw log-mel [n_mels, 4n] float16
    f0: list[torch.Tensor]  # F0 per mel frame [4n], Hz, 0 where unvoiced
    tokens: np.ndarray  # tokens per clip
    phones: list[list[int]]
    voice: np.ndarray
    pitch: np.ndarray
    rate: np.ndarray


def _prepare(tok: SpeechTokenizer, clips: list[SpeechClip], progress: Callable[[int], None] | None) -> _Prepared:
    from omnitok.tokenizers.pitch import f0_contour

    cfg = tok.config
    phone_index = {p: i + 1 for i, p in enumerate(cfg.phones)}
    mels, f0s, ntok, phones, voice, pitch, rate = [], [], [], [], [], [], []
    rates = list(cfg.rates)
    for i, c in enumerate(clips):
        n = max(1, math.ceil(c.wav.size / tok.samples_per_token))
        w = torch.from_numpy(c.wav)
        need = n * tok.samples_per_token
        w = F.pad(w, (0, need - w.numel()))
        mels.append(tok.mel.log_mel(w)[:, : n * cfg.downsample].to(torch.float16))
        if cfg.f0_contour:
            f0s.append(f0_contour(w, tok.sample_rate, tok.mel.config.hop_length)[: n * cfg.downsample])
        ntok.append(n)
        units = phone_units(c.record.get("phonemes", ""), cfg.keep_stress)
        phones.append([phone_index[u] for u in units if u in phone_index])
        voice.append(cfg.voices.index(c.record["voice"]) if c.record["voice"] in cfg.voices else -1)
        pitch.append(cfg.pitches.index(c.record["pitch"]))
        rate.append(rates.index(c.record["rate"]))
        if progress and i % 64 == 0:
            progress(i)
    return _Prepared(mels, f0s, np.array(ntok), phones, np.array(voice), np.array(pitch), np.array(rate))


def _pad_mels(mels: list[torch.Tensor], n_tokens: list[int], ds: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_max = max(n_tokens)
    out = torch.zeros(len(mels), mels[0].shape[0], n_max * ds)
    mask = torch.zeros(len(mels), n_max, 1)
    for i, (m, n) in enumerate(zip(mels, n_tokens, strict=True)):
        out[i, :, : m.shape[1]] = m.float()
        mask[i, :n] = 1
    return out, mask


def _pick_batch(sorted_idx: np.ndarray, ntok: np.ndarray, budget: int, gen: np.random.Generator) -> np.ndarray:
    """Consecutive clips of similar length (sorted order) whose padded size fits ``budget`` tokens."""
    n = len(sorted_idx)
    start = int(gen.integers(n))
    end = start
    while end < n and (end - start + 1) * ntok[sorted_idx[end]] <= budget:
        end += 1
    while start > 0 and (end - start + 1) * ntok[sorted_idx[end - 1]] <= budget:
        start -= 1
    return sorted_idx[start : max(end, start + 1)]


# ----------------------------------------------------------------------------------------------- losses


class _GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-scale`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class StyleAdversary(torch.nn.Module):
    """Per-token voice and pitch-class classifiers (used only in training, never saved with the tokenizer)."""

    def __init__(self, dim: int, n_voices: int, n_pitches: int, width: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU()
        )
        self.voice = torch.nn.Linear(width, n_voices)
        self.pitch = torch.nn.Linear(width, n_pitches)

    def forward(self, zq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(_GradReverse.apply(zq, scale))
        return self.voice(h), self.pitch(h)


def _norm(tok: SpeechTokenizer, mel: torch.Tensor) -> torch.Tensor:
    return (mel - tok.mel_mean[None, :, None]) / tok.mel_std[None, :, None]


def training_losses(
    tok: SpeechTokenizer,
    batch: dict[str, Any],
    cfg: SpeechTrainConfig,
    gen: torch.Generator,
    adversary: StyleAdversary | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's weighted loss and its parts (floats, for the log)."""
    mel, mask = batch["mel"], batch["mask"]
    mel_n = _norm(tok, mel) * mask.repeat_interleave(tok.config.downsample, 1).transpose(1, 2)
    z = tok.encode_latent(mel_n, mask)
    zq, idx = tok.fsq(z)
    parts: dict[str, float] = {}
    loss = torch.zeros(())
    # content: phone CTC on the tokens
    if cfg.ctc_weight > 0:
        logp = tok.ctc_logits(zq, mask).log_softmax(-1).transpose(0, 1)
        targets = torch.tensor([p for ph in batch["phones"] for p in ph], dtype=torch.long)
        tgt_len = torch.tensor([len(ph) for ph in batch["phones"]], dtype=torch.long)
        in_len = mask[:, :, 0].sum(1).long()
        ctc = F.ctc_loss(logp, targets, in_len, tgt_len, blank=0, zero_infinity=True)
        loss = loss + cfg.ctc_weight * ctc
        parts["ctc"] = float(ctc.detach())
    # style: label embeddings, or the style encoder's vector from another clip of the same voice
    voice = batch["voice"]
    voice_vec = tok.voice_emb(voice)
    if batch.get("ref_mel") is not None:
        ref_vec = tok.style_encoder(_norm(tok, batch["ref_mel"]) * batch["ref_frame_mask"], batch["ref_mask"])
        vce = F.cross_entropy(tok.style_encoder.classify(ref_vec), voice)
        match = F.mse_loss(ref_vec, voice_vec.detach())
        loss = loss + cfg.voice_weight * (vce + match)
        parts["voice_ce"] = float(vce.detach())
        use_ref = (torch.rand(len(voice), generator=gen) < cfg.ref_prob).unsqueeze(-1)
        voice_vec = torch.where(use_ref, ref_vec, voice_vec)
    cond = tok.cond_vector(voice_vec, batch["log_f0"], batch["rate"])
    zq_dec = zq if cfg.recon_grad == 1.0 else zq.detach() + cfg.recon_grad * (zq - zq.detach())
    fmask = mask.repeat_interleave(tok.config.downsample, 1).transpose(1, 2)
    f0 = None
    if tok.config.f0_contour:
        f0 = batch["f0"] * fmask[:, 0]
        voiced = f0 > 0
        log_f0 = torch.log(f0.clamp(min=20.0))
        rel, vlogit = tok.predict_contour(zq, cond, mask)
        target = log_f0 - tok.cond_log_f0(cond)[:, None]
        f0_l1 = ((rel - target).abs() * voiced).sum() / voiced.sum().clamp(min=1)
        vce = (F.binary_cross_entropy_with_logits(vlogit, voiced.float(), reduction="none") * fmask[:, 0]).sum()
        vce = vce / fmask[:, 0].sum()
        loss = loss + cfg.pitch_weight * (f0_l1 + vce)
        parts["f0_l1"] = float(f0_l1.detach())
        parts["voicing_ce"] = float(vce.detach())
    pred = tok.decode_mel(zq_dec, cond, mask, f0)
    mel_l1 = ((pred - mel_n).abs() * fmask).sum() / (fmask.sum() * pred.shape[1])
    loss = loss + cfg.mel_weight * mel_l1
    parts["mel_l1"] = float(mel_l1.detach())
    if adversary is not None and cfg.adv_weight > 0:
        tv, tp = adversary(zq, cfg.adv_weight)
        sel = mask[:, :, 0] > 0
        adv_v = F.cross_entropy(tv[sel], voice[:, None].expand_as(sel)[sel])
        adv_p = F.cross_entropy(tp[sel], batch["pitch"][:, None].expand_as(sel)[sel])
        loss = loss + adv_v + adv_p  # the classifiers learn; the reversed gradient scrubs the encoder
        parts["adv_voice_ce"] = float(adv_v.detach())
        parts["adv_pitch_ce"] = float(adv_p.detach())
    if cfg.rate_weight > 0:
        rce = F.cross_entropy(tok.rate_logits(zq.detach(), mask), batch["rate"])
        loss = loss + cfg.rate_weight * rce
        parts["rate_ce"] = float(rce.detach())
    parts["codes_in_batch"] = float(torch.unique(idx[mask[:, :, 0] > 0]).numel())
    return loss, parts


# ----------------------------------------------------------------------------------------------- evaluation


def greedy_ctc(logits: torch.Tensor) -> list[int]:
    """Best path: argmax per frame, merge repeats, drop blanks (index 0)."""
    best = logits.argmax(-1).tolist()
    out, prev = [], -1
    for b in best:
        if b != prev and b != 0:
            out.append(b)
        prev = b
    return out


def edit_distance(a: list[Any], b: list[Any]) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


@torch.no_grad()
def evaluate_clips(tok: SpeechTokenizer, clips: list[SpeechClip]) -> dict[str, float]:
    """Mel L1 (normalised), greedy-CTC phone error rate of the tokenizer's own head, code usage."""
    from omnitok.tokenizers.quantizers import codebook_usage

    tok.eval()
    phone_index = {p: i + 1 for i, p in enumerate(tok.config.phones)}
    l1s, edits, n_ph, all_codes = [], 0, 0, []
    for c in clips:
        codes = tok.encode(c.wav, 16000)
        all_codes.append(torch.from_numpy(codes))
        zq = tok.codes_to_latents(torch.from_numpy(codes)).unsqueeze(0)
        mask = torch.ones(1, len(codes), 1)
        ref = [
            phone_index[u]
            for u in phone_units(c.record.get("phonemes", ""), tok.config.keep_stress)
            if u in phone_index
        ]
        hyp = greedy_ctc(tok.ctc_logits(zq, mask)[0])
        edits += edit_distance(ref, hyp)
        n_ph += len(ref)
        voice = c.record["voice"] if c.record["voice"] in tok.config.voices else None
        st = tok.resolve_style(
            {"voice": voice, "pitch": c.record["pitch"]} if voice else None, None if voice else c.wav
        )
        cond = tok.cond_vector(
            st.voice.unsqueeze(0), torch.tensor([st.log_f0]), torch.tensor([tok.config.rates.index(c.record["rate"])])
        )
        pred = tok.decode_mel(zq, cond)[0]
        target = tok.features(torch.from_numpy(c.wav), len(codes))
        l1s.append(float((pred - target).abs().mean()))
    usage = codebook_usage(torch.cat(all_codes), tok.codebook_size)
    return {"mel_l1": float(np.mean(l1s)), "per": edits / max(1, n_ph), **usage}


# ----------------------------------------------------------------------------------------------- training


def _progress_columns(name: str) -> tuple[Any, ...]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )


def _arch_from_clips(arch: dict[str, Any], clips: list[SpeechClip], data: Any) -> SpeechTokenizerConfig:
    """``arch`` with the tables the clips define where it names none: the phone inventory and the voices."""
    arch = dict(arch)
    phones = sorted(
        {u for c in clips for u in phone_units(c.record.get("phonemes", ""), bool(arch.get("keep_stress", True)))}
    )
    if not phones:
        raise OmnitokError(f"{data}: the training clips carry no phonemes in their metadata ('phonemes' field)")
    from omnitok.world.speech import VOICES

    order = [v.name for v in VOICES]
    voices = sorted({c.record["voice"] for c in clips}, key=lambda v: (order.index(v) if v in order else len(order), v))
    arch.setdefault("phones", phones)
    arch.setdefault("voices", voices)
    return SpeechTokenizerConfig.from_dict(arch, "arch")


def train_speech_tokenizer(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    train: SpeechTrainConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    clips: list[SpeechClip] | None = None,
    val_clips: list[SpeechClip] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the speech tokenizer on a world's ``train`` split; returns (and writes) the run summary."""
    from omnitok.threads import auto_threads, torch_threads

    train = train or SpeechTrainConfig()
    with torch_threads(train.threads or auto_threads()):
        return _train_speech_tokenizer(data, out, train, resume, progress, clips, val_clips, on_log)


def _train_speech_tokenizer(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    train: SpeechTrainConfig,
    resume: bool,
    progress: bool,
    clips: list[SpeechClip] | None,
    val_clips: list[SpeechClip] | None,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from rich.progress import Progress
    from safetensors.torch import save_file

    from omnitok.io import atomic_path, atomic_write_json, ensure_writable_dir, read_json, write_run_config
    from omnitok.optim import adamw, load_state, save_state

    out_dir = ensure_writable_dir(out, "speech tokenizer training output directory")
    t_load = time.perf_counter()
    if clips is None:
        clips = load_world_clips(data, "train", train.kinds, train.max_clips)
    elif train.max_clips is not None:
        clips = clips[: train.max_clips]
    if val_clips is None:
        try:
            val_clips = load_world_clips(data, "val", ("scene",), train.val_clips)
        except OmnitokError:
            val_clips = clips[-min(len(clips), train.val_clips) :]
    val_clips = val_clips[: train.val_clips]

    # tables learned from the data: the phone inventory, the voices, the pitch centroids (below, unless resuming)
    arch_cfg = _arch_from_clips(train.arch, clips, data)
    identity_arch = asdict(arch_cfg)

    config_record = {"data": str(data), "train": asdict(train) | {"arch": identity_arch}, "n_train": len(clips)}
    identity = {k: v for k, v in config_record["train"].items() if k not in _OPERATIONAL}
    ckpt = out_dir / "checkpoint"
    state_path = ckpt / "state.json"
    resuming = resume and state_path.is_file()
    st: dict[str, Any] = {}
    if resuming:
        st = read_json(state_path, "checkpoint state")
        if st.get("identity") != json.loads(json.dumps(identity)):
            raise OmnitokError(
                f"{out_dir}: a checkpoint from a different configuration exists ({state_path}); "
                "use a new --out directory or --no-resume"
            )
        arch_cfg = SpeechTokenizerConfig.from_dict(st["arch_tables"], f"{state_path} arch_tables")
    elif not arch_cfg.f0_centroids:
        arch_cfg.f0_centroids = measure_f0_centroids(clips, train.f0_clips_per_class)
    torch.manual_seed(train.seed)
    tok = SpeechTokenizer(arch_cfg)
    cfg = tok.config

    with Progress(*_progress_columns("speech features"), disable=not progress, transient=True) as bar:
        task = bar.add_task("mel", total=len(clips), info="")
        prep = _prepare(tok, clips, lambda i: bar.update(task, completed=i))
    if not resuming:
        sample = torch.cat([m.float() for m in prep.mels[:: max(1, len(prep.mels) // 400)]], 1)
        tok.mel_mean.copy_(sample.mean(1))
        tok.mel_std.copy_(sample.std(1).clamp(min=0.1))
    prep_seconds = time.perf_counter() - t_load

    adversary = StyleAdversary(tok.fsq.dim, len(cfg.voices), len(cfg.pitches)) if train.adv_weight > 0 else None
    params = [p for p in tok.parameters() if p.requires_grad]
    if adversary is not None:
        params += list(adversary.parameters())
    opt = adamw(params, train.device, lr=train.lr, betas=(0.9, 0.99), weight_decay=train.weight_decay)
    start, log, elapsed_before = 0, [], 0.0
    if resuming:
        tensors, opt_t = read_checkpoint(ckpt)
        tok.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("adversary.")})
        if adversary is not None:
            adversary.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("adversary.")})
        load_state(opt, "opt", opt_t, st["optimizer"])
        start, elapsed_before = int(st["step"]), float(st.get("elapsed_s", 0.0))
        log = read_json(out_dir / "log.json", "training log") if (out_dir / "log.json").is_file() else []
        log = [e for e in log if e.get("step", 0) <= start]
    write_run_config(out_dir, "omnitok tokenizer train speech", config_record)

    def save_checkpoint(step: int, elapsed: float) -> None:
        ckpt.mkdir(exist_ok=True)
        opt_t, opt_meta = save_state(opt, "opt")
        model_t = tok.state_dict() | (
            {f"adversary.{k}": v for k, v in adversary.state_dict().items()} if adversary is not None else {}
        )
        for name, t in (("model.safetensors", model_t), ("optimizer.safetensors", opt_t)):
            with atomic_path(ckpt / name) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, str(tmp))
        state = {
            "step": step,
            "elapsed_s": elapsed,
            "identity": identity,
            "optimizer": opt_meta,
            "arch_tables": json.loads(json.dumps(asdict(cfg))),
        }
        atomic_write_json(state_path, state)  # written last: it vouches for the two files above
        atomic_write_json(out_dir / "log.json", log)

    f0_table = torch.tensor([[math.log(tok.f0_for(v, p)) for p in cfg.pitches] for v in cfg.voices])
    by_voice = {v: np.nonzero(prep.voice == v)[0] for v in range(len(cfg.voices))}
    sorted_idx = np.argsort(prep.tokens, kind="stable")
    budget = max(int(prep.tokens.max()), int(train.batch_seconds * tok.frame_rate))
    ds = cfg.downsample
    ref_frames = max(ds, int(train.ref_seconds * tok.mel.config.frame_rate) // ds * ds)

    def make_batch(step: int) -> tuple[dict[str, Any], torch.Generator]:
        rng = np.random.default_rng([train.seed, step])
        idx = _pick_batch(sorted_idx, prep.tokens, budget, rng)
        mel, mask = _pad_mels([prep.mels[i] for i in idx], [int(prep.tokens[i]) for i in idx], cfg.downsample)
        f0 = torch.zeros(len(idx), mel.shape[2])
        for j, i in enumerate(idx):
            if prep.f0:
                f0[j, : prep.f0[i].numel()] = prep.f0[i]
        refs = []
        for i in idx:
            pool = by_voice[int(prep.voice[i])]
            j = int(pool[rng.integers(len(pool))]) if len(pool) > 1 else int(i)
            m = prep.mels[j]
            if m.shape[1] > ref_frames:
                s = int(rng.integers(0, m.shape[1] - ref_frames + 1)) // cfg.downsample * cfg.downsample
                m = m[:, s : s + ref_frames]
            refs.append(m)
        ref_tokens = [max(1, r.shape[1] // cfg.downsample) for r in refs]
        ref_mel, ref_mask = _pad_mels(refs, ref_tokens, cfg.downsample)
        voice = torch.from_numpy(prep.voice[idx]).long()
        batch = {
            "mel": mel,
            "mask": mask,
            "phones": [prep.phones[i] for i in idx],
            "voice": voice,
            "rate": torch.from_numpy(prep.rate[idx]).long(),
            "pitch": torch.from_numpy(prep.pitch[idx]).long(),
            "log_f0": f0_table[voice, torch.from_numpy(prep.pitch[idx]).long()],
            "f0": f0,
            "ref_mel": ref_mel,
            "ref_mask": ref_mask,
            "ref_frame_mask": ref_mask.repeat_interleave(cfg.downsample, 1).transpose(1, 2),
        }
        return batch, torch.Generator().manual_seed(train.seed * 1_000_003 + step)

    t0 = time.perf_counter()
    done = start
    stopped_early = False
    elapsed = elapsed_before
    tok.train()
    with Progress(*_progress_columns("speech tokenizer"), disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=train.steps, completed=start, info="")
        try:
            for step in range(start, train.steps):
                batch, gen = make_batch(step)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, train)
                loss, parts = training_losses(tok, batch, train, gen, adversary)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
                opt.step()
                done = step + 1
                elapsed = elapsed_before + time.perf_counter() - t0
                if done % train.log_every == 0 or done == train.steps:
                    entry = {
                        "step": done,
                        "loss": round(float(loss.detach()), 5),
                        "lr": lr_at(step, train),
                        "elapsed_s": round(elapsed, 2),
                    } | {k: round(v, 5) for k, v in parts.items()}
                    log.append(entry)
                    if on_log:
                        on_log(entry)
                    atomic_write_json(out_dir / "log.json", log)
                    bar.update(task, info=f"mel {parts['mel_l1']:.3f} ctc {parts.get('ctc', 0):.3f}")
                if done % train.checkpoint_every == 0 and done < train.steps:
                    save_checkpoint(done, elapsed)
                bar.update(task, completed=done)
                if train.max_minutes is not None and elapsed > train.max_minutes * 60:
                    stopped_early = done < train.steps
                    break
        except KeyboardInterrupt:
            save_checkpoint(done, elapsed_before + time.perf_counter() - t0)
            raise
    save_checkpoint(done, elapsed)
    tok.eval()
    tok_dir = tok.save(out_dir / "tokenizer")
    metrics = evaluate_clips(tok, val_clips) if val_clips else {}
    summary = {
        "steps": done,
        "completed": done >= train.steps,
        "stopped_by_time_limit": stopped_early,
        "train_seconds": round(elapsed, 2),
        "prepare_seconds": round(prep_seconds, 2),
        "threads": torch.get_num_threads(),
        "n_train_clips": len(clips),
        "train_audio_hours": round(sum(c.wav.size for c in clips) / 16000 / 3600, 3),
        "val": metrics,
        "codebook_size": tok.codebook_size,
        "frame_rate": tok.frame_rate,
        "bitrate": tok.bitrate,
        "tokenizer": str(tok_dir),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def read_speech_recipe(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Training fields from a YAML recipe: its ``speech_tokenizer`` section, or the whole file."""
    if path is None:
        return {}
    import yaml

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise OmnitokError(f"recipe not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise OmnitokError(f"recipe {p} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise OmnitokError(f"recipe {p}: expected a mapping at the top level")
    section = doc.get("speech_tokenizer", doc)
    if not isinstance(section, dict):
        raise OmnitokError(f"recipe {p}: 'speech_tokenizer' must be a mapping")
    return dict(section)


def default_train_config(**overrides: Any) -> SpeechTrainConfig:
    """The defaults, with fields overridden (``arch`` merged); used by tests and the benchmark."""
    arch = dict(overrides.pop("arch", {}) or {})
    cfg = SpeechTrainConfig(**overrides)
    cfg.arch = {**cfg.arch, **arch}
    return cfg


def tiny_arch() -> dict[str, Any]:
    """A very small model for unit tests (seconds to train a few steps)."""
    return {
        "width": 32,
        "enc_blocks": 1,
        "ctc_blocks": 1,
        "dec_blocks": 2,
        "post_width": 16,
        "post_blocks": 1,
        "voice_dim": 8,
        "rate_dim": 4,
        "style_width": 16,
        "levels": (5, 5, 5),
        "gl_iters": 4,
        "pitch_width": 8,
        "pitch_blocks": 1,
        "mel": {"n_mels": 40, "n_fft": 512, "win_length": 400},
    }


__all__ = [
    "SpeechClip",
    "SpeechTrainConfig",
    "default_train_config",
    "edit_distance",
    "evaluate_clips",
    "greedy_ctc",
    "load_world_clips",
    "measure_f0_centroids",
    "read_speech_recipe",
    "tiny_arch",
    "train_speech_tokenizer",
]
