"""Where each image code sits in its picture: a learned embedding of its raster index, added to its input embedding.

A decoder with rotary positions knows how far apart two tokens are, not which cell of an 8x8 grid a code depicts:
to name "the star in the top left" a small LM first has to learn to count inside a 64-code span. Giving every code
its raster index (0..n-1 after ``<image>`` or ``<frame>``) as an added embedding, the way a vision encoder gives
patches theirs, hands it that for free. At the demo's budget captions, pictures, edits and interleaved documents end
with a lower held-out loss in two seeds, at no measurable cost in speed (docs/BENCHMARKS.md, "Where image codes sit").

The table lives inside the transformers model (``model.image_positions``), so optimizers, DDP/FSDP and checkpoints
see it like any other weight; a forward pre-hook on the base model turns ``input_ids`` into ``inputs_embeds`` with
the table added. Full sequences (training, a prompt) find each code's index from its opener; a KV-cached decoding
step sees one token, so the decoder passes ``image_positions=`` (from :meth:`ImagePositions.positions` with the
previous chunk's ``last_opener``). It starts at zero, so adding it to a trained or pretrained model changes nothing
until it learns. A bundle keeps it next to the transformers weights (``lm/image_positions.safetensors``) and its
shape in the LM's ``config.json`` (``omnitok_image_positions``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from omnitok.errors import OmnitokError
from omnitok.io import read_safetensors

CONFIG_KEY = "omnitok_image_positions"
FILENAME = "image_positions.safetensors"
STATE_KEY = "image_positions.weight"


class ImagePositions(nn.Module):
    """``weight[i]``: what is added to the input embedding of the ``i``-th code after an image or frame opener."""

    def __init__(self, tokens: int, hidden: int, codes: tuple[int, int], openers: list[int]) -> None:
        super().__init__()
        if tokens < 1 or codes[0] >= codes[1] or not openers:
            raise OmnitokError(f"image positions: need tokens >= 1, a code range and openers, got {tokens}, {codes}")
        self.tokens, self.codes = int(tokens), (int(codes[0]), int(codes[1]))
        self.weight = nn.Parameter(torch.zeros(self.tokens, hidden))
        self.register_buffer("openers", torch.tensor(list(openers), dtype=torch.long), persistent=False)

    def spec(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "codes": list(self.codes), "openers": self.openers.tolist()}

    def positions(
        self, ids: torch.Tensor, start: int = 0, last_opener: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raster index of every image code in ``ids`` [B, T] (-1 elsewhere), and each row's last opener index.

        ``start``: the column of ``ids[:, 0]`` in the whole sequence; ``last_opener`` [B]: where the previous chunk's
        last opener was (-1: none yet). A decoder calls this on the prompt, then on each new token with both.
        """
        b, t = ids.shape
        idx = torch.arange(start, start + t, device=ids.device).expand(b, t)
        opened = torch.where(torch.isin(ids, self.openers.to(ids.device)), idx, torch.full_like(idx, -1))
        if last_opener is not None:
            opened = torch.maximum(opened, last_opener.to(ids.device).view(b, 1))
        last = opened.cummax(dim=1).values
        is_code = (ids >= self.codes[0]) & (ids < self.codes[1]) & (last >= 0)
        return torch.where(is_code, idx - last - 1, torch.full_like(idx, -1)), last[:, -1]

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inside = (positions >= 0) & (positions < self.tokens)
        added = self.weight.to(embeds.dtype)[positions.clamp(0, self.tokens - 1)]
        return embeds + added * inside.unsqueeze(-1).to(embeds.dtype)


def _has_cache(kwargs: dict[str, Any]) -> bool:
    # transformers 5 renamed the argument past_key_values -> cache; either may arrive, the other as None
    caches = [kwargs.get(k) for k in ("cache", "past_key_values")]
    return any(c is not None and hasattr(c, "get_seq_length") and int(c.get_seq_length()) > 0 for c in caches)


def _pre_hook(base: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    table: ImagePositions = base._omnitok_image_positions  # type: ignore[assignment]
    given = kwargs.pop("image_positions", None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:  # the caller built inputs_embeds itself
        return args, kwargs
    if given is None:
        given, _ = table.positions(ids)
        stray = (given < 0) & (ids >= table.codes[0]) & (ids < table.codes[1])
        if _has_cache(kwargs) and bool(stray.any()):
            raise OmnitokError(
                "this LM adds image position embeddings: a KV-cached step that continues an image must pass "
                "image_positions= (omnitok.decoding does; transformers' generate does not)"
            )
    embeds = table(base.get_input_embeddings()(ids), given.to(ids.device))
    args = args[1:] if args else args
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = embeds
    return args, kwargs


def add_image_positions(model: nn.Module, tokens: int, codes: tuple[int, int], openers: list[int]) -> ImagePositions:
    """Give ``model`` (a transformers causal LM) a zero-initialised table of ``tokens`` image positions."""
    if get(model) is not None:
        raise OmnitokError("this LM already has image position embeddings")
    table = ImagePositions(tokens, model.config.hidden_size, codes, openers)
    table.to(model.get_input_embeddings().weight.device)
    model.image_positions = table
    base = model.base_model
    # A reference, not a submodule: registered twice, the table would appear twice in every state dict.
    object.__setattr__(base, "_omnitok_image_positions", table)
    base.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    setattr(model.config, CONFIG_KEY, table.spec())
    return table


def get(model: nn.Module) -> ImagePositions | None:
    table = getattr(model, "image_positions", None)
    return table if isinstance(table, ImagePositions) else None


def save(model: nn.Module, out: str | os.PathLike[str], state: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` without the table (transformers would not load it back), plus the table's own file."""
    table = get(model)
    if table is None:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        return
    full = state if state is not None else model.state_dict()
    model.save_pretrained(out, state_dict={k: v for k, v in full.items() if k != STATE_KEY}, safe_serialization=True)
    weight = full.get(STATE_KEY, table.weight)
    save_file({"weight": weight.detach().to("cpu").contiguous()}, str(Path(out) / FILENAME))


def restore(model: nn.Module, lm_dir: str | os.PathLike[str]) -> None:
    """After ``from_pretrained``: re-attach the table its ``config.json`` records and load its weights."""
    spec = getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return
    path = Path(lm_dir) / FILENAME
    if not path.is_file():
        raise OmnitokError(f"{lm_dir}: config.json has {CONFIG_KEY} but {FILENAME} is missing")
    try:
        tokens, codes, openers = int(spec["tokens"]), tuple(spec["codes"]), [int(i) for i in spec["openers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise OmnitokError(f"{lm_dir}/config.json: field {CONFIG_KEY} is malformed ({spec!r}): {e}") from e
    table = add_image_positions(model, tokens, (int(codes[0]), int(codes[1])), openers)
    weight = read_safetensors(path, "image position table").get("weight")
    if weight is None or tuple(weight.shape) != tuple(table.weight.shape):
        got = None if weight is None else list(weight.shape)
        raise OmnitokError(f"{path}: expected a 'weight' of shape {list(table.weight.shape)}, got {got}")
    with torch.no_grad():
        table.weight.copy_(weight)
