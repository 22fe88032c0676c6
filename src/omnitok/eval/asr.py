"""The independent speech instrument: pocketsphinx transcribes, jiwer scores.

Why pocketsphinx: its wheel ships an English acoustic model and dictionary, so generated speech can be
scored offline by a recogniser that shares nothing with the model under test (no learned speech
tokenizer, no eSpeak). Its general language model is poor on the toy world's sentences, so with a
``corpus`` we build a small trigram model of the domain instead; that measures "can the words be heard"
rather than "does a 1990s LM like this word order". ``benchmarks/asr_ceiling.py`` reports the ceiling:
the WER on clean eSpeak speech, which no generated speech can be expected to beat.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import threading
import unicodedata
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import repeat
from math import gcd
from pathlib import Path

import numpy as np

from omnitok.errors import OmnitokError

ASR_SAMPLE_RATE = 16000

# eSpeak (and any vocoder that gates its output) writes exact digital silence. pocketsphinx's cepstral
# normalisation and noise tracking then see log(0)-level frames, and its WER on eSpeak speech triples
# (about 45% against 15% on the toy world's captions). A fixed, seeded noise floor 48 dB below the
# level we normalise to, plus half a second of lead-in and tail, gives the recogniser what real
# recordings have. Values between 1e-3 and 5e-3 perform alike; 1e-2 starts to hurt.
_TARGET_PEAK = 0.5
_NOISE_STD = 2e-3
_PAD_SECONDS = 0.5
_NOISE_SEED = 0

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def normalize_text(text: str) -> str:
    """What WER compares: lowercase words without punctuation, single spaces.

    Apostrophes inside words stay (``it's`` is one dictionary word); every other punctuation or symbol
    character becomes a space, so ``left-hand`` is two words, as a recogniser would hear it.
    """
    if not isinstance(text, str):
        raise OmnitokError(f"normalize_text expects a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    chars = [" " if unicodedata.category(c)[0] in "PSZC" and c != "'" else c for c in text]
    text = re.sub(r"(?<![^\W_])'|'(?![^\W_])", " ", "".join(chars))  # quotes, not apostrophes
    return " ".join(text.split())


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: all edits over all reference words (not a mean of per-sentence WERs)."""
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise OmnitokError("wer expects sequences of sentences, got a single str; wrap it in a list")
    if len(references) != len(hypotheses):
        raise OmnitokError(f"wer: {len(references)} references but {len(hypotheses)} hypotheses; they must pair up")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    n_ref = sum(len(r.split()) for r in refs)
    if n_ref == 0:
        raise OmnitokError("wer: the references contain no words, so WER is undefined")
    # Empty references only add insertions; jiwer wants non-empty references, so count those by hand.
    edits = sum(len(h.split()) for r, h in zip(refs, hyps, strict=True) if not r)
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    import jiwer

    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    edits += out.substitutions + out.deletions + out.insertions
    return edits / n_ref


def _default_model_dir() -> Path:
    try:
        import pocketsphinx
    except ImportError as e:
        raise OmnitokError("pocketsphinx is not installed: pip install pocketsphinx") from e
    return Path(pocketsphinx.get_model_path()) / "en-us"


@functools.lru_cache(maxsize=4)
def _read_dictionary(path: Path) -> dict[str, list[str]]:
    """CMUdict-style file: ``word PH ON ES`` lines, alternates written ``word(2)``.

    Cached: parsing the 135k-word dictionary is most of a Transcriber's start-up time. Callers must not
    mutate the result.
    """
    entries: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            word = re.sub(r"\(\d+\)$", "", parts[0]).lower()
            entries.setdefault(word, []).append(" ".join(parts[1:]))
    return entries


def _check_phones(word: str, pron: str, phones: set[str]) -> str:
    units = pron.upper().split()
    bad = [p for p in units if p not in phones]
    if not units or bad:
        raise OmnitokError(
            f"pronunciation for {word!r} is {pron!r}: expected the dictionary's phones "
            f"(e.g. 'HH AH L OW'), unknown: {bad or 'none given'}"
        )
    return " ".join(units)


class Transcriber:
    """pocketsphinx with the English model from its wheel, optionally fitted to a domain's sentences.

    With ``corpus``, a trigram LM is built from those sentences and the dictionary is cut to their
    words, so the recogniser only chooses among words the domain uses. Corpus words the dictionary does
    not know raise an OmnitokError listing them; give their phones in ``pronunciations``
    (``{"zorb": "Z AO R B"}``) to add them.
    """

    def __init__(
        self,
        corpus: Sequence[str] | None = None,
        model_dir: str | None = None,
        pronunciations: Mapping[str, str] | None = None,
    ) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as e:
            raise OmnitokError("pocketsphinx is not installed: pip install pocketsphinx") from e
        self._args = (None if corpus is None else list(corpus), model_dir, dict(pronunciations or {}))
        sentences = None if corpus is None else self._corpus_sentences(corpus)
        root = Path(model_dir) if model_dir is not None else _default_model_dir()
        hmm, dictionary, general_lm = root / "en-us", root / "cmudict-en-us.dict", root / "en-us.lm.bin"
        for path, what in ((hmm / "mdef", "acoustic model"), (dictionary, "dictionary")):
            if not path.is_file():
                raise OmnitokError(
                    f"pocketsphinx model directory {root}: {what} not found at {path} "
                    "(expected the layout of pocketsphinx's model/en-us: en-us/, cmudict-en-us.dict, en-us.lm.bin)"
                )
        known = _read_dictionary(dictionary)
        phones = {p for prons in known.values() for pron in prons for p in pron.split()}
        extra = {normalize_text(w): _check_phones(w, p, phones) for w, p in (pronunciations or {}).items()}
        if any(" " in w or not w for w in extra):
            raise OmnitokError(f"pronunciations: keys must be single words, got {sorted(extra)}")
        self.domain = corpus is not None
        if sentences is None:
            if not general_lm.is_file():
                raise OmnitokError(f"pocketsphinx general language model not found at {general_lm}")
            if extra:
                raise OmnitokError("pronunciations are only used with a corpus (a domain LM)")
            config = {"lm": str(general_lm), "dict": str(dictionary)}
            self.vocabulary: frozenset[str] | None = None
        else:
            # The domain LM and dictionary live as long as this object: each transcription opens its own decoder
            # on them (see ``transcribe``).
            tmp = Path(tempfile.mkdtemp(prefix="omnitok-asr-"))
            weakref.finalize(self, shutil.rmtree, tmp, True)
            config = self._build_domain(sentences, known, extra, tmp)
        self._config = {"hmm": str(hmm), "samprate": ASR_SAMPLE_RATE, "loglevel": "FATAL", **config}
        Decoder(**self._config)  # fail here, with the model paths at hand, not in the first transcription
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[Transcriber], tuple]:
        return (Transcriber, self._args)

    @staticmethod
    def _corpus_sentences(corpus: Sequence[str]) -> list[str]:
        if isinstance(corpus, str):
            raise OmnitokError("Transcriber corpus must be a sequence of sentences, got a single str")
        sentences = [normalize_text(s) for s in corpus]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise OmnitokError("Transcriber corpus has no words: expected at least one non-empty sentence")
        return sentences

    def _build_domain(
        self, sentences: list[str], known: dict[str, list[str]], extra: dict[str, str], tmp: Path
    ) -> dict[str, str]:
        words = sorted({w for s in sentences for w in s.split()})
        missing = [w for w in words if w not in known and w not in extra]
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise OmnitokError(
                f"{len(missing)} corpus word(s) are not in the pronunciation dictionary (cmudict-en-us): "
                f"{shown}. Spell numbers as words, or pass Transcriber(pronunciations={{word: 'PH ON ES'}})"
            )
        from pocketsphinx.lm import ArpaBoLM

        lm = ArpaBoLM(text="\n".join(sentences), add_start=True)
        lm.compute()
        lm_path, dict_path = tmp / "domain.arpa", tmp / "domain.dict"
        with open(lm_path, "w", encoding="utf-8") as f:
            lm.write(f)
        with open(dict_path, "w", encoding="utf-8") as f:
            for w in words:
                prons = [extra[w]] if w in extra else known[w]
                for i, pron in enumerate(prons):
                    f.write(f"{w if i == 0 else f'{w}({i + 1})'} {pron}\n")
        self.vocabulary = frozenset(words)
        return {"lm": str(lm_path), "dict": str(dict_path)}

    @staticmethod
    def _prepare(audio: np.ndarray, sample_rate: int) -> bytes | None:
        """Checked, 16 kHz, level-normalised PCM16 with a noise floor; None for all-silent audio."""
        if not isinstance(audio, np.ndarray):
            raise OmnitokError(f"transcribe expects a numpy array, got {type(audio).__name__}")
        if audio.ndim == 2 and 1 in audio.shape:
            audio = audio.reshape(-1)
        if audio.ndim != 1:
            raise OmnitokError(f"transcribe expects mono audio (1-D samples), got shape {audio.shape}")
        if audio.size == 0:
            raise OmnitokError("transcribe got empty audio (0 samples)")
        if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
            raise OmnitokError(f"transcribe: sample_rate must be a positive int, got {sample_rate!r}")
        if np.issubdtype(audio.dtype, np.integer):
            if audio.dtype != np.int16:
                raise OmnitokError(f"transcribe: integer audio must be int16 PCM, got {audio.dtype}")
            x = audio.astype(np.float64) / 32768.0
        elif np.issubdtype(audio.dtype, np.floating):
            x = audio.astype(np.float64)
        else:
            raise OmnitokError(f"transcribe: audio dtype must be float or int16, got {audio.dtype}")
        if not np.all(np.isfinite(x)):
            raise OmnitokError("transcribe: audio contains NaN or infinity")
        if sample_rate != ASR_SAMPLE_RATE:
            from scipy.signal import resample_poly

            g = gcd(int(sample_rate), ASR_SAMPLE_RATE)
            x = resample_poly(x, ASR_SAMPLE_RATE // g, int(sample_rate) // g)
        peak = float(np.quantile(np.abs(x), 0.999))  # robust to a lone click
        if peak <= 1e-6:
            return None
        x = x * (_TARGET_PEAK / peak)
        pad = np.zeros(int(_PAD_SECONDS * ASR_SAMPLE_RATE))
        x = np.concatenate([pad, x, pad])
        x = x + _NOISE_STD * np.random.default_rng(_NOISE_SEED).standard_normal(x.size)
        return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """Normalised words heard in ``audio`` ("" for silence): a function of ``audio`` alone.

        Why a new decoder per call (~10 ms against ~300 ms of decoding): a pocketsphinx decoder carries state from
        one utterance into the next (its live cepstral mean, among others; resetting that one alone is not
        enough), so one decoder's hypothesis for a clip depended on the clips heard before it. An evaluation that
        interleaves generated speech with reference clips then scored the same reference audio differently for
        different models (tts_wer_ref 0.143 vs 0.149 on the same 30 clips).
        """
        pcm = self._prepare(audio, sample_rate)
        if pcm is None:
            return ""
        with self._lock:
            return _decode(self._config, pcm)

    def transcribe_many(self, audios: Sequence[np.ndarray], sample_rate: int, workers: int | None = None) -> list[str]:
        """``[transcribe(a, sample_rate) for a in audios]``, the clips decoded in parallel worker processes.

        Why processes: pocketsphinx holds the GIL while it decodes (two threads took as long as one on 16 clips),
        and at ~0.35 s a clip hearing was some two fifths of an evaluation (demo60p's: 88.8 s one clip after
        another, 70.8 s with two workers; docs/BENCHMARKS.md). Each clip is still a
        fresh decoder on the same PCM, so the words heard are those ``transcribe`` hears. ``workers``: at most
        this many processes (default: the CPUs, up to 8); 1, one clip, or a pool that cannot start (a
        ``__main__`` that spawned processes cannot import) decodes here, one clip after another.
        """
        pcms = [self._prepare(a, sample_rate) for a in audios]
        todo = [i for i, p in enumerate(pcms) if p is not None]
        out = [""] * len(pcms)
        n = min(workers or min(8, os.cpu_count() or 1), len(todo))
        texts: list[str] | None = None
        if n > 1:
            try:
                with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
                    chunk = max(1, len(todo) // (4 * n))
                    texts = list(pool.map(_decode, repeat(self._config), [pcms[i] for i in todo], chunksize=chunk))
            except BrokenProcessPool:
                texts = None
        if texts is None:
            with self._lock:
                texts = [_decode(self._config, pcms[i]) for i in todo]
        for i, text in zip(todo, texts, strict=True):
            out[i] = text
        return out


def _decode(config: Mapping[str, object], pcm: bytes) -> str:
    """Normalised words pocketsphinx hears in prepared PCM, with a decoder of its own (module level: picklable)."""
    from pocketsphinx import Decoder

    dec = Decoder(**config)
    dec.start_utt()
    dec.process_raw(pcm, full_utt=True)
    dec.end_utt()
    hyp = dec.hyp()
    return normalize_text(hyp.hypstr) if hyp is not None else ""


__all__ = ["ASR_SAMPLE_RATE", "Transcriber", "normalize_text", "wer"]
