"""Text tokenizer: a byte-level BPE trained on the corpus, or any HF tokenizer from a local directory.

Byte-level BPE never meets an unknown character, so generated text always decodes. The same
``tokenizer.json`` format covers both cases: one we train with HF ``tokenizers`` and the one shipped with a
pretrained LLM (its own special tokens simply live inside the text id range).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omnitok.errors import OmnitokError
from omnitok.io import atomic_path


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> TextTokenizer:
        """Train a byte-level BPE; the 256 byte symbols are always kept, merges fill the rest."""
        if vocab_size < 257:
            raise OmnitokError(f"text tokenizer: vocab_size must be > 256 (the byte alphabet), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """From a directory holding ``tokenizer.json`` (ours or a pretrained model's), or that file itself."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise OmnitokError(f"text tokenizer: {file} not found (expected a HF tokenizer.json)")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            raise OmnitokError(f"text tokenizer: {file} is not a valid tokenizer.json: {e}") from e

    def save(self, path: str | os.PathLike[str]) -> None:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / "tokenizer.json") as tmp:
            self.tokenizer.save(str(tmp))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
