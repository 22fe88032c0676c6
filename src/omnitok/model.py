"""The backbone: a Hugging Face causal LM built from a config or loaded from a local directory.

Any ``AutoModelForCausalLM`` architecture works, because the trainer only needs ``input_ids``, ``position_ids``
and an attention mask in, logits out. A pretrained text LLM is the usual start (as in MIO and AnyGPT): its
vocabulary grows by the modality tokens, and the new rows start at the mean of the old ones (``mean_resizing``),
which keeps the initial next-token distribution close to the pretrained one instead of spiking on random rows.

Weights are kept in float32 (the trainer autocasts to bf16 where it can); nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from omnitok import image_positions
from omnitok.errors import OmnitokError, is_int

DEFAULT_ARCH = "llama"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
# Keys of a recipe's ``model`` that omnitok reads itself; every other key is a field of the transformers config.
# ``image_positions``: add a learned raster-position embedding to image codes (omnitok.image_positions).
_OWN_KEYS = ("arch", "attn_implementation", "image_positions")
_PRETRAINED_KEYS = {"pretrained", "attn_implementation", "image_positions"}


def _config_class(arch: str, field: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch not in CONFIG_MAPPING or arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise OmnitokError(
            f"{field}.arch: {arch!r} is not a transformers causal-LM model type (e.g. llama, qwen2, mistral, gpt2)"
        )
    return CONFIG_MAPPING[arch]


# Config fields that count or size something: each must be a positive integer.
_SIZES = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    }
)


def check_model_spec(spec: Mapping[str, Any], field: str = "model") -> None:
    """Reject a spec that could not build, without building anything (recipes are checked before training)."""
    if not isinstance(spec, Mapping):
        raise OmnitokError(f"{field}: expected a mapping, got {type(spec).__name__}")
    attn = spec.get("attn_implementation", "sdpa")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise OmnitokError(f"{field}.attn_implementation: expected one of {list(ATTN_IMPLEMENTATIONS)}, got {attn!r}")
    if not isinstance(spec.get("image_positions", False), bool):
        raise OmnitokError(f"{field}.image_positions: expected true or false, got {spec['image_positions']!r}")
    if "vocab_size" in spec:
        raise OmnitokError(f"{field}.vocab_size: set by the token directory's vocab.json; remove it from the recipe")
    if "pretrained" in spec:
        extra = sorted(set(spec) - _PRETRAINED_KEYS)
        if extra:
            raise OmnitokError(f"{field}.{extra[0]}: not allowed with {field}.pretrained (the config comes from it)")
        path = Path(str(spec["pretrained"]))
        if not (path / "config.json").is_file():
            raise OmnitokError(f"{field}.pretrained: {path} is not a saved transformers model (no config.json)")
        return
    arch = spec.get("arch", DEFAULT_ARCH)
    if not isinstance(arch, str):
        raise OmnitokError(f"{field}.arch: expected a string, got {arch!r}")
    cls = _config_class(arch, field)
    known = set(inspect.signature(cls.__init__).parameters) | set(vars(cls()))
    for key in spec:
        if key not in known and key not in _OWN_KEYS:
            raise OmnitokError(f"{field}.{key}: not a field of {cls.__name__}")
    for key, value in spec.items():  # sizes and counts: a layer count of -1 builds a model with no layers
        if key in _SIZES and (not is_int(value) or value < 1):
            raise OmnitokError(f"{field}.{key}: expected a positive integer, got {value!r}")
    try:
        from huggingface_hub.errors import StrictDataclassError  # what transformers 5's strict configs raise
    except ImportError:  # huggingface_hub before 0.31 (transformers 4.x): configs raise TypeError / ValueError
        StrictDataclassError = ValueError
    try:  # the config class's own checks (types, heads dividing the width), before anything is written
        cls(**{k: v for k, v in spec.items() if k not in _OWN_KEYS})
    except (StrictDataclassError, TypeError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise OmnitokError(f"{field}: not a valid {cls.__name__}: {reason}") from e


def build_model(spec: Mapping[str, Any], vocab_size: int) -> PreTrainedModel:
    """A float32 causal LM whose vocabulary is exactly ``vocab_size``.

    ``model.config.omnitok_base_vocab_size`` records how many embedding rows came from a pretrained model
    (0 for a model built from scratch): rows at or above it are the *new* embeddings a first stage may train
    alone.
    """
    check_model_spec(spec)
    attn = spec.get("attn_implementation", "sdpa")
    if "pretrained" in spec:
        path = Path(str(spec["pretrained"]))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, attn_implementation=attn
            )
        except (OSError, ValueError) as e:
            raise OmnitokError(f"model.pretrained: could not load {path}: {e}") from e
        # An omnitok bundle's lm/ (continued training, a further SFT) keeps the image positions it learned.
        image_positions.restore(model, path)
        base = model.get_input_embeddings().num_embeddings
        if vocab_size < base:
            raise OmnitokError(
                f"model.pretrained: {path} has {base} embedding rows but the token vocabulary has only "
                f"{vocab_size}; the vocabulary must extend the model's, not shrink it"
            )
        if vocab_size > base:
            model.resize_token_embeddings(vocab_size, mean_resizing=True)
    else:
        kwargs = {k: v for k, v in spec.items() if k not in _OWN_KEYS}
        config = AutoConfig.for_model(spec.get("arch", DEFAULT_ARCH), vocab_size=vocab_size, **kwargs)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        base = 0
    model.config.omnitok_base_vocab_size = base
    return model


def base_vocab_size(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "omnitok_base_vocab_size", 0))


@torch.no_grad()
def init_code_embeddings(
    model: PreTrainedModel, ranges: list[tuple[int, torch.Tensor]], seed: int = 0
) -> list[tuple[int, int]]:
    """Give each codebook's embedding rows a component that is a fixed random projection of its code vectors.

    ``ranges``: (first row, code vectors [n, d]) per codebook. Each vector dimension is standardised and
    projected to the hidden size so the added part has the rows' own per-element spread; the random part of
    the rows stays, so every code keeps a row of its own. Codes the codec treats as alike then start with
    similar input rows and (tied or not) similar output rows, which is the prior an LM needs to make sense of
    thousands of code ids it sees only a few hundred times each. Returns the (start, stop) rows changed.
    """
    gen = torch.Generator().manual_seed(seed)
    matrices = [model.get_input_embeddings().weight]
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out_emb.weight)
    changed = []
    for start, vectors in ranges:
        v = vectors.float()
        v = (v - v.mean(0)) / v.std(0).clamp(min=1e-6)
        stop = start + v.shape[0]
        for w in matrices:
            if stop > w.shape[0]:
                raise OmnitokError(f"code vectors for rows {start}..{stop} exceed the {w.shape[0]} embedding rows")
            spread = float(w[start:stop].std())
            proj = torch.randn(v.shape[1], w.shape[1], generator=gen) * (spread / v.shape[1] ** 0.5)
            w[start:stop] += (v @ proj).to(w.dtype)
        changed.append((start, stop))
    return changed
