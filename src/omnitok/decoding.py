"""The token-level decoding loop: KV cache, constrained sampling per modality, CFG, streaming.

Kept separate from the user-facing ``omnitok.generate`` (which turns segments into prompts and codes into
pixels and audio) so the loop can be read — and benchmarked against ``transformers.generate`` — on its own.

Classifier-free guidance runs conditional and unconditional prompts as rows of one batch:
``logits = uncond + scale * (cond - uncond)`` while a row is inside an image span (``cfg_scale``; the
unconditional row is the request without its text), and, for text about a picture (``text_cfg_scale``; the
unconditional row is the request without its pictures), the same over log-probabilities among the tokens the
conditional row itself finds plausible. Both rows receive the same sampled token so their caches stay in step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from omnitok import image_positions
from omnitok.constraints import DONE, IMAGE_CODE, SPEECH_CODE0, SPEECH_START, VIDEO_CODE, ModalityConstraint
from omnitok.errors import OmnitokError, is_int, is_number


@dataclass(frozen=True)
class Sampling:
    """Sampling for one modality; temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        typed = is_number(self.temperature) and is_number(self.top_p) and is_int(self.top_k)
        if not typed or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise OmnitokError(
                f"bad sampling settings {self}: temperature a number >= 0, 0 < top_p <= 1, top_k an integer >= 0"
            )


# Default sampling per modality, shared by the decoding loop, the Python API, the CLI, the server and the evaluation.
# Measured on toy-world bundles (BENCHMARKS, "Sampling per modality"): a picture is right or wrong code by code,
# and the most likely code is right more often than a sampled one (60-minute demo: exact text-to-image 0.12 greedy
# against 0.00 at temperature 1 with top-k 64); speech reads best a little cooler than 0.7 (WER 0.31 against 0.35).
# ``top_k`` is kept on the greedy image default so raising only its temperature samples among the 64 likeliest.
TEXT_SAMPLING = Sampling(temperature=0.0)
IMAGE_SAMPLING = Sampling(temperature=0.0, top_k=64)
SPEECH_SAMPLING = Sampling(temperature=0.5, top_k=32)
# Classifier-free guidance for text-to-image. Chosen on the val split of two 60-minute bundles (200 scenes):
# exact scenes 0.27 / 0.19 at 2 against 0.235 / 0.19 at 3, and on test the right object count 0.80 against 0.58-0.61
# (BENCHMARKS "Guidance for pictures"): a stronger scale draws objects that are not asked for, or drops some.
IMAGE_CFG_SCALE = 2.0
# Guidance for text written about a picture (a caption, an answer; ``text_cfg_scale``, off by default): what the words
# would be without the picture is subtracted, so a colour-shape pair never seen in training text is not talked out of
# by the text's habits. Only tokens within READ_CFG_PLAUSIBLE of the conditional row's likeliest are candidates:
# guidance reorders what the picture makes plausible and never promotes what it does not (unrestricted, a scale of 3
# turned captions into garbage). BENCHMARKS "Guidance for reading": on a 60-minute bundle whose captions were trained
# with the picture sometimes dropped, exact captions of held-out compositions 0.225 -> 0.31 at 3, seen ones level; on
# a 15-minute one, whose reading is weak, seen captions fall (0.23 -> 0.13), so it is the caller's choice.
READ_CFG_PLAUSIBLE = 0.1
DEFAULT_SAMPLING = {"text": TEXT_SAMPLING, "image": IMAGE_SAMPLING, "speech": SPEECH_SAMPLING}
SAMPLED_MODALITIES = tuple(DEFAULT_SAMPLING)


@dataclass
class DecodeConfig:
    max_new_tokens: int = 256
    text: Sampling = TEXT_SAMPLING
    image: Sampling = IMAGE_SAMPLING
    speech: Sampling = SPEECH_SAMPLING
    cfg_scale: float = 1.0  # image spans; 1.0 = no guidance
    text_cfg_scale: float = 1.0  # text (the unconditional row without the pictures); 1.0 = no guidance


def sampling_overrides(
    temperature: list[str] | None = None, top_k: list[str] | None = None, top_p: list[str] | None = None
) -> dict[str, Sampling]:
    """Per-modality settings from command-line values such as ``image=0.7``, each on top of that modality's default.

    Returns only the modalities that were named, so callers pass them as keyword options (``image=...``) and leave
    the rest at their defaults.
    """
    changes: dict[str, dict[str, float | int]] = {}
    for flag, field_name, cast, values in (
        ("--temperature", "temperature", float, temperature),
        ("--top-k", "top_k", int, top_k),
        ("--top-p", "top_p", float, top_p),
    ):
        for item in values or []:
            modality, sep, raw = item.partition("=")
            modality = modality.strip()
            if not sep or modality not in DEFAULT_SAMPLING:
                raise OmnitokError(
                    f"{flag} {item!r}: expected MODALITY=VALUE with MODALITY one of {list(SAMPLED_MODALITIES)}, "
                    "e.g. image=0.7"
                )
            try:
                value = cast(raw.strip())
            except ValueError:
                kind = "an integer" if cast is int else "a number"
                raise OmnitokError(f"{flag} {item!r}: {raw.strip()!r} is not {kind}") from None
            changes.setdefault(modality, {})[field_name] = value
    out = {}
    for modality, fields in changes.items():
        try:
            out[modality] = replace(DEFAULT_SAMPLING[modality], **fields)
        except OmnitokError as e:
            raise OmnitokError(f"{modality} sampling: {e}") from None
    return out


def _filter(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def _sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = _filter(logits / s.temperature, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


class ConstraintProcessor:
    """The same automaton as a ``transformers`` logits processor, for use with ``model.generate``.

    ``generate`` hands over the whole sequence each step, so the state is built from the prompt on the first
    call and advanced by the last token afterwards.
    """

    def __init__(self, constraint: ModalityConstraint) -> None:
        self.constraint = constraint
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            self.state = self.constraint.after_prompt(input_ids)
        else:
            self.state = self.constraint.advance(self.state, input_ids[:, -1])
        return self.constraint.apply(scores, self.state)


def iter_decode(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    constraint: ModalityConstraint,
    cfg: DecodeConfig,
    uncond_prompts: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(tokens [B], automaton state after them)`` once per step, until every row ended or the limit.

    A generator so that streaming consumers (speech chunks, server-sent events) act on each token as it
    arrives; rows that already ended keep yielding ``<|pad|>``.
    """
    if not prompts:
        raise OmnitokError("decoding needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise OmnitokError("every prompt needs at least one token")
    use_cfg = uncond_prompts is not None and (cfg.cfg_scale != 1.0 or cfg.text_cfg_scale != 1.0)
    if use_cfg and len(uncond_prompts) != len(prompts):  # type: ignore[arg-type]
        raise OmnitokError("uncond_prompts must have one prompt per conditional prompt")
    with torch.inference_mode():
        yield from _decode_steps(model, prompts, constraint, cfg, uncond_prompts if use_cfg else None, generator)


def _decode_steps(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    constraint: ModalityConstraint,
    cfg: DecodeConfig,
    uncond_prompts: list[torch.Tensor] | None,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    use_cfg = uncond_prompts is not None
    b = len(prompts)
    rows = prompts + (list(uncond_prompts) if uncond_prompts is not None else [])
    # a request whose guidance row is its own prompt (a batch where only some requests show a picture) is not guided:
    # the plausibility cut of guided reading would still change what it samples
    device = next(model.parameters()).device
    guided = torch.tensor(
        [not torch.equal(p, u) for p, u in zip(prompts, uncond_prompts or [], strict=False)] or [False] * b,
        device=device,
    )
    ids, attn = _left_pad(rows, constraint.ids["pad"])
    ids, attn = ids.to(device), attn.to(device)
    st = constraint.initial(b, device)
    for i, p in enumerate(prompts):  # state after each prompt (a prompt may end inside a span it opened)
        one = constraint.after_prompt(p.view(1, -1).to(device))
        for k in st:
            st[k][i] = one[k][0]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    # An LM with image position embeddings needs each cached step's index inside its picture (omnitok.image_positions).
    table = image_positions.get(model)
    where: dict[str, torch.Tensor] = {}
    last_opener = None
    if table is not None:
        where["image_positions"], last_opener = table.positions(ids)
    # only the last prompt position's logits are used: skip the LM head (the largest matmul) for the others
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    # transformers 5 renamed the KV cache argument and output field ``past_key_values`` -> ``cache`` (the old name
    # warns, and goes in 5.40); older releases only know the old one. The output field has the argument's name.
    cache_arg = "cache" if "cache" in params else "past_key_values"
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=True, **extra, **where)
    past = getattr(out, cache_arg)
    logits = out.logits[:, -1, :].float()
    for step in range(cfg.max_new_tokens):
        cond = logits[:b]
        state = st["state"]
        groups = {
            "image": (state == IMAGE_CODE) | (state == VIDEO_CODE),
            "speech": (state == SPEECH_START) | (state >= SPEECH_CODE0),
        }
        groups["text"] = ~(groups["image"] | groups["speech"])
        if use_cfg:
            uncond = logits[b:]
            if cfg.cfg_scale != 1.0:
                cond = torch.where(groups["image"].unsqueeze(-1), uncond + cfg.cfg_scale * (cond - uncond), cond)
            if cfg.text_cfg_scale != 1.0:
                # over what the automaton allows: a plausible token it forbids must not crowd out every allowed one
                read = (groups["text"] & guided).unsqueeze(-1)
                banned = ~constraint.mask(st)
                c, u = cond.masked_fill(banned, float("-inf")), uncond.masked_fill(banned, float("-inf"))
                cond = torch.where(read, guided_reading(c, u, cfg.text_cfg_scale), cond)
        cond = constraint.apply(cond, st)
        tokens = torch.empty(b, dtype=torch.long, device=device)
        active = [(name, rows_mask) for name, rows_mask in groups.items() if rows_mask.any()]
        if len(active) == 1:  # the usual case: every row in the same modality, no gather/scatter
            tokens = _sample(cond, getattr(cfg, active[0][0]), generator)
        else:
            for name, rows_mask in active:
                tokens[rows_mask] = _sample(cond[rows_mask], getattr(cfg, name), generator)
        st = constraint.advance(st, tokens)
        yield tokens, st
        if bool((st["state"] == DONE).all()) or step == cfg.max_new_tokens - 1:
            return
        step_tokens = torch.cat([tokens, tokens]) if use_cfg else tokens
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        if table is not None:
            where["image_positions"], last_opener = table.positions(
                step_tokens.view(-1, 1), start=attn.shape[1] - 1, last_opener=last_opener
            )
        out = model(
            input_ids=step_tokens.view(-1, 1),
            attention_mask=attn,
            position_ids=position_ids,
            use_cache=True,
            **{cache_arg: past},
            **where,
        )
        past = getattr(out, cache_arg)
        logits = out.logits[:, -1, :].float()


def guided_reading(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided log-probabilities for text [B, V]: ``u + scale * (c - u)`` over log-softmaxed rows, -inf for every token
    the conditional row gives less than ``READ_CFG_PLAUSIBLE`` of its likeliest token's probability.

    Why the restriction: where both rows agree (grammar, punctuation) ``c - u`` is noise, and a scale above 1
    amplifies it into tokens neither row would write; the picture's evidence lives in tokens it already finds likely.
    Tokens masked to -inf in ``cond`` (forbidden where the row stands) are never candidates.
    """
    c, u = cond.log_softmax(-1), uncond.log_softmax(-1)
    plausible = (c >= c.max(-1, keepdim=True).values + math.log(READ_CFG_PLAUSIBLE)) & torch.isfinite(c)
    return torch.where(plausible, u + scale * (c - u), torch.full_like(c, float("-inf")))


def decode_tokens(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    constraint: ModalityConstraint,
    cfg: DecodeConfig,
    uncond_prompts: list[torch.Tensor] | None = None,
    on_token: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; rows stop after EOS. Returns the new ids per row.

    ``on_token(tokens [B], states [B])`` is called after every step. ``uncond_prompts`` (one per prompt)
    enables classifier-free guidance with ``cfg.cfg_scale``.
    """
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for tokens, st in iter_decode(model, prompts, constraint, cfg, uncond_prompts, generator):
        for i, t in enumerate(tokens.tolist()):  # one device read a step, not one per row
            if not done[i]:
                new[i].append(t)
        done = (st["state"] == DONE).tolist()
        if on_token is not None:
            on_token(tokens, st["state"])
    return new
