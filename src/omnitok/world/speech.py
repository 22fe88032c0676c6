"""Speech for the toy world: eSpeak NG driven in-process through its C library.

Why the C library and not the ``espeak-ng`` program: in-process we control the library's state and its
random seed, which is what makes clips reproducible (below), and we skip a process start per clip. The
speed gain itself is modest (about 1.3x on a 2-core Xeon, ``benchmarks/speech_synthesis.py``) because
synthesis dominates. The wheel ``espeakng-loader`` ships both the shared library and its data, so nothing
needs installing; a system ``libespeak-ng.so.1`` (1.51) works too.

Why the library is reset before every call: libespeak-ng keeps synthesis state in static variables
(pitch-flutter phase, gain control, waveform phase, its random generator) that neither
``espeak_Terminate`` nor ``espeak_Initialize`` clears, so the same text spoken after different earlier
texts comes out slightly different (other samples, a few more or fewer). The world's shards must be
byte-identical for a seed whichever worker made them, so before each call we terminate the library, put
its writable data (``.data`` and ``.bss``, located from the ELF section table) back to the bytes it had
right after loading, and initialise it again. The reset takes 0.1 ms; reloading the voice after it 2 ms.

This module must not import torch: the world builder runs without it.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import re
import struct
import sys
import threading
import warnings
import wave
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from omnitok.errors import OmnitokError

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Voice:
    """A named eSpeak voice: ``espeak`` is what ``espeak_SetVoiceByName`` receives (language+variant)."""

    name: str
    espeak: str
    lang: str
    gender: str


# Ten voices, five male and five female, over four accents (General American, British, Received
# Pronunciation, Scottish); variants come from espeak-ng-data's ``voices/!v``. eSpeak calls British
# English "en" (it has no voice called "en-gb"). The variants were picked by how well pocketsphinx, the
# instrument that scores generated speech, transcribes them: the f3/f4 variants and the Caribbean accent
# (en-029, any variant) sit at 30-60% WER even on clean speech, so they would make a useless yardstick
# (benchmarks/asr_ceiling.py).
VOICES: tuple[Voice, ...] = (
    Voice("us_m1", "en-us+m1", "en-us", "male"),
    Voice("us_f1", "en-us+f1", "en-us", "female"),
    Voice("us_m3", "en-us+m3", "en-us", "male"),
    Voice("us_f5", "en-us+f5", "en-us", "female"),
    Voice("gb_m2", "en+m2", "en-gb", "male"),
    Voice("gb_f2", "en+f2", "en-gb", "female"),
    Voice("rp_m6", "en-gb-x-rp+m6", "en-gb-x-rp", "male"),
    Voice("rp_f5", "en-gb-x-rp+f5", "en-gb-x-rp", "female"),
    Voice("sc_m4", "en-gb-scotland+m4", "en-gb-scotland", "male"),
    Voice("sc_f2", "en-gb-scotland+f2", "en-gb-scotland", "female"),
)
_VOICE_BY_NAME: dict[str, Voice] = {v.name: v for v in VOICES}

# eSpeak's pitch parameter (0-100, 50 = the voice's own base pitch). benchmarks/speech_synthesis.py
# measures F0 per voice: within every voice the medians of low / mid / high are 1.25-1.5x apart, and even
# the extremes over different sentences never overlap (the closest pair is still 1.19x apart).
PITCHES: dict[str, int] = {"low": 20, "mid": 50, "high": 85}

# Words per minute (eSpeak accepts 80-450, default 175). pocketsphinx transcribes "fast" as well as
# "slow" (benchmarks/asr_ceiling.py), so the range could widen if a task needs it.
RATES: dict[str, int] = {"slow": 125, "normal": 170, "fast": 220}

_VOLUME = 75  # eSpeak's default 100 clips on some voices (peaks at full scale); 75 keeps headroom.
_RANGE = 50  # intonation range, eSpeak's default; fixed so pitch is the only pitch control.


@dataclass(frozen=True)
class Style:
    """How a clip is spoken: names from ``VOICES``, ``PITCHES`` and ``RATES`` (checked on creation)."""

    voice: str
    pitch: str
    rate: str

    def __post_init__(self) -> None:
        for field, value, table in (
            ("voice", self.voice, _VOICE_BY_NAME),
            ("pitch", self.pitch, PITCHES),
            ("rate", self.rate, RATES),
        ):
            if not isinstance(value, str) or value not in table:
                raise OmnitokError(f"speech style field {field!r}: expected one of {sorted(table)}, got {value!r}")


def get_voice(name: str) -> Voice:
    """The ``Voice`` called ``name`` (an OmnitokError listing the known names otherwise)."""
    if name not in _VOICE_BY_NAME:
        raise OmnitokError(f"unknown voice {name!r}: expected one of {sorted(_VOICE_BY_NAME)}")
    return _VOICE_BY_NAME[name]


# --------------------------------------------------------------------------------------------------
# libespeak-ng binding

# espeak_ng_OUTPUT_MODE ENOUTPUT_MODE_SYNCHRONOUS: samples come back through the callback on the calling
# thread, with no background thread in the library, so a process that loaded it can still fork safely.
# (We use the espeak_ng_* initialisers because legacy espeak_Initialize calls exit(1) on a bad data path.)
_OUTPUT_SYNCHRONOUS = 1
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}
_ENS_OK = 0

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Event(ctypes.Structure):
    """espeak_EVENT (speak_lib.h): the callback's events, an array ended by type 0 (espeakEVENT_LIST_TERMINATED)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters (we synthesise with POS_CHARACTER)
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # at the library's native rate, counted from the start of the text
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # a union of int / const char* / char[8]; unread
    ]


_EVENT_END_OF_LIST, _EVENT_WORD = 0, 1

_SHF_WRITE, _SHF_ALLOC, _SHF_TLS = 0x1, 0x2, 0x400
_SHT_SYMTAB = 2
_PT_GNU_RELRO = 0x6474E552


def _writable_sections(path: str) -> list[tuple[str, int, int]] | None:
    """(name, address offset, size) of the library's plain writable data (ELF64 little-endian only).

    Excludes what the dynamic linker owns: the RELRO range (read-only after loading), the GOTs and TLS.
    Returns None for anything that is not an ELF file we understand, and the caller gives up on resets.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    relro = (0, 0)
    for i in range(e_phnum):
        p_type, _flags, _off, p_vaddr, _paddr, _filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == _PT_GNU_RELRO:
            relro = (p_vaddr, p_vaddr + p_memsz)
    if e_shoff == 0 or e_shnum == 0:
        return None
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    names_off = headers[e_shstrndx][4]
    out = []
    for sh_name, _type, sh_flags, sh_addr, _off, sh_size, *_ in headers:
        name = data[names_off + sh_name : data.index(b"\0", names_off + sh_name)].decode("ascii", "replace")
        if sh_flags & (_SHF_WRITE | _SHF_ALLOC) != (_SHF_WRITE | _SHF_ALLOC) or sh_flags & _SHF_TLS:
            continue
        if name.startswith(".got") or (relro[0] <= sh_addr < relro[1]) or sh_size == 0:
            continue
        out.append((name, sh_addr, sh_size))
    if not any(name == ".bss" for name, _, _ in out):
        return None
    return out


def _local_symbols(path: str, wanted: tuple[str, ...]) -> list[tuple[str, tuple[int, int]]]:
    """(name, (offset, size)) of every symbol in the library's symbol table whose name, less the ``.NNNN`` suffix
    compilers add to function-local statics, is in ``wanted``; none for a stripped library.

    Used only to carry a few statics across resets (heap-buffer pointers, eSpeak's voice list) so the library
    reuses what it built rather than leaking or rebuilding it per clip; a stripped library just pays for that.
    """
    data = Path(path).read_bytes()
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    found = []
    for _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize in headers:
        if sh_type != _SHT_SYMTAB or sh_entsize != 24:
            continue
        strtab_off = headers[sh_link][4]
        for j in range(sh_size // 24):
            st_name, _st_info, _other, _shndx, st_value, st_size = struct.unpack_from(
                "<IBBHQQ", data, sh_offset + j * 24
            )
            name = data[strtab_off + st_name : data.index(b"\0", strtab_off + st_name)].decode("ascii", "replace")
            if name.split(".")[0] in wanted and st_size > 0:
                found.append((name.split(".")[0], (st_value, st_size)))
    return found


class _Dl_info(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


class _Library:
    """The process-wide handle on one libespeak-ng file; every call into it holds ``lock``."""

    # Static buffers the library grows with realloc and never frees (espeak_ListVoices' result array,
    # the phoneme-string buffer with its size). Keeping them across resets lets the library reuse them;
    # restoring them to NULL would leak a few kilobytes per call.
    _KEEP_STATICS = ("voices", "phon_out_buf", "phon_out_size")
    # The list of every voice file under the data directory (a count and an array of pointers to heap entries).
    # Selecting a voice by name scans the whole directory (~290 files) when the list is empty, and a reset empties
    # it: 6 ms a selection, two a clip, the largest cost of building the world. The scan reads the same files every
    # time, so the list is built once per data directory and carried across resets (its entries kept off the free).
    _VOICE_LIST = ("n_voices_list", "voices_list")

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise OmnitokError(f"cannot load the eSpeak NG library {path}: {e}") from e
        lib = self.lib
        try:
            lib.espeak_ng_InitializePath.argtypes = [ctypes.c_char_p]
            lib.espeak_ng_InitializePath.restype = None
            lib.espeak_ng_Initialize.argtypes = [ctypes.c_void_p]
            lib.espeak_ng_Initialize.restype = ctypes.c_int
            lib.espeak_ng_InitializeOutput.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
            lib.espeak_ng_InitializeOutput.restype = ctypes.c_int
            lib.espeak_ng_GetSampleRate.restype = ctypes.c_int
            lib.espeak_ng_GetStatusCodeMessage.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
            lib.espeak_Terminate.restype = ctypes.c_int
            lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
            lib.espeak_SetSynthCallback.restype = None
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetVoiceByName.restype = ctypes.c_int
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetParameter.restype = ctypes.c_int
            lib.espeak_Synth.argtypes = [
                ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]  # fmt: skip
            lib.espeak_Synth.restype = ctypes.c_int
            lib.espeak_Synchronize.restype = ctypes.c_int
            lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
            lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
        except AttributeError as e:
            raise OmnitokError(
                f"{path} does not look like libespeak-ng (missing symbol: {e}); "
                "install the wheel 'espeakng-loader' or pass Speaker(library=...)"
            ) from e
        self.version = (lib.espeak_Info(None) or b"?").decode()
        # eSpeak's noise sources (breath, Klatt voices) draw random numbers. 1.52 has its own generator,
        # seeded from the clock by Initialize; older releases call the C library's rand().
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
            self._seed = lambda: lib.espeak_ng_SetRandSeed(0)
        else:
            libc = ctypes.CDLL(None)
            libc.srand.argtypes = [ctypes.c_uint]
            self._seed = lambda: libc.srand(0)
        self.initialized_with: str | None = None
        self._chunks: list[bytes] = []
        self._words: list[tuple[int, int]] = []  # (text_position, sample) of each word event of the current text
        self._callback = _SynthCallback(self._collect)  # kept alive for as long as the library
        self._snapshot: list[tuple[int, bytes]] = []
        self._keep: list[tuple[int, int]] = []
        self._voice_list: list[tuple[int, int]] = []  # (address, size) of n_voices_list, voices_list
        self._voice_list_from: str | None = None  # the data path the kept list was scanned from
        self.resettable = self._take_snapshot()

    def _take_snapshot(self) -> bool:
        """Record the writable data as it is now, before any espeak call has touched it."""
        sections = _writable_sections(self.path) if sys.platform.startswith("linux") else None
        if sections is None:
            return False
        info = _Dl_info()
        libdl = ctypes.CDLL(None)
        func = ctypes.cast(self.lib.espeak_Initialize, ctypes.c_void_p)
        if not libdl.dladdr(func, ctypes.byref(info)) or not info.dli_fbase:
            return False
        base = int(info.dli_fbase)
        self._snapshot = [(base + addr, ctypes.string_at(base + addr, size)) for _n, addr, size in sections]
        if any(name == ".bss" and any(raw) for (name, _, _), (_, raw) in zip(sections, self._snapshot, strict=True)):
            # Someone else in this process has already used this library file, so "as loaded" is gone.
            self._snapshot = []
            return False
        symbols = _local_symbols(self.path, self._KEEP_STATICS + self._VOICE_LIST)  # one read of the file
        kept = [(name, where) for name, where in symbols if name in self._KEEP_STATICS]
        self._keep = [(base + off, size) for _, (off, size) in kept if size in (4, 8)]
        listed = [(name, where) for name, where in symbols if name in self._VOICE_LIST]
        found = dict(listed)
        if len(listed) == len(found) == len(self._VOICE_LIST) and found["n_voices_list"][1] == 4:
            self._voice_list = [(base + found[name][0], found[name][1]) for name in self._VOICE_LIST]
        return True

    def _collect(self, wav: ctypes._Pointer, n: int, events: int | None) -> int:
        if n > 0 and wav:
            # a copy as bytes: ~70 callbacks a clip, where numpy's view of a ctypes pointer costs 9 us each
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        if events:
            ev = ctypes.cast(events, ctypes.POINTER(_Event))
            k = 0
            while (kind := ev[k].type) != _EVENT_END_OF_LIST:
                if kind == _EVENT_WORD:
                    self._words.append((ev[k].text_position, ev[k].sample))
                k += 1
        return 0

    def _status(self, code: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.espeak_ng_GetStatusCodeMessage(code, buf, len(buf))
        return f"{buf.value.decode(errors='replace')} (status 0x{code & 0xFFFFFFFF:x})"

    def reset(self, data_path: str) -> None:
        """Bring the library to the state of a fresh process that has just initialised it."""
        lib = self.lib
        voice_list: list[tuple[int, bytes]] = []
        if self.initialized_with is not None:
            if self.resettable and self._voice_list and self._voice_list_from == data_path == self.initialized_with:
                voice_list = [(addr, ctypes.string_at(addr, size)) for addr, size in self._voice_list]
                ctypes.memset(self._voice_list[0][0], 0, 4)  # an empty count: Terminate frees no entry
            lib.espeak_Terminate()
            self.initialized_with = None
        if self.resettable:
            kept = [(addr, ctypes.string_at(addr, size)) for addr, size in self._keep]
            for addr, raw in self._snapshot:
                ctypes.memmove(addr, raw, len(raw))
            for addr, raw in kept + voice_list:
                ctypes.memmove(addr, raw, len(raw))
            # Without a kept list the next voice selection scans data_path, whose list the next reset keeps.
            self._voice_list_from = data_path
        lib.espeak_ng_InitializePath(data_path.encode())
        status = lib.espeak_ng_Initialize(None)
        if status != _ENS_OK:
            raise OmnitokError(f"eSpeak NG could not initialise from data {data_path}: {self._status(status)}")
        status = lib.espeak_ng_InitializeOutput(_OUTPUT_SYNCHRONOUS, 0, None)
        if status != _ENS_OK:
            raise OmnitokError(f"eSpeak NG could not set up synchronous output: {self._status(status)}")
        lib.espeak_SetSynthCallback(self._callback)
        self._seed()
        self.initialized_with = data_path

    def set_voice(self, voice: Voice) -> None:
        code = self.lib.espeak_SetVoiceByName(voice.espeak.encode())
        if code != 0:
            raise OmnitokError(f"eSpeak NG has no voice {voice.espeak!r} (voice {voice.name!r}); error {code}")

    def synth(self, text: bytes) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """PCM at the native rate, and (text_position, sample) of each word eSpeak started."""
        self._chunks, self._words = [], []
        code = self.lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if code != 0:
            raise OmnitokError(f"eSpeak NG failed to synthesise the text (espeak_Synth returned {code})")
        self.lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        words, self._words = self._words, []
        return np.frombuffer(b"".join(chunks), dtype=np.int16), words


@functools.cache
def _resample_filter(up: int, down: int) -> np.ndarray:
    """``resample_poly``'s own default low-pass (Kaiser, beta 5), designed once instead of on every utterance.

    Why: designing it took ~7 % of a single worker's world build; passing it back gives bit-identical audio.
    """
    from scipy.signal import firwin

    rate = max(up, down)
    return firwin(2 * 10 * rate + 1, 1.0 / rate, window=("kaiser", 5.0)).astype(np.float32)


_LIBRARIES: dict[str, _Library] = {}
_LIBRARIES_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    global _LIBRARIES_LOCK
    _LIBRARIES_LOCK = threading.Lock()
    for library in _LIBRARIES.values():
        library.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _default_paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as e:
        raise OmnitokError(
            "eSpeak NG not found: install the wheel 'espeakng-loader' (pip install espeakng-loader) "
            "or pass Speaker(library=..., data_path=...)"
        ) from e
    try:
        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except RuntimeError as e:
        raise OmnitokError(f"espeakng-loader is installed but incomplete: {e}") from e


def _word_onsets(text: str, events: list[tuple[int, int]], scale: float, n_samples: int) -> list[int]:
    """The start of each white-space word of ``text`` from eSpeak's word events ((1-based character position,
    native sample)): a word's onset is that of the first event inside it. eSpeak speaks some short words with the
    one before as one word ("in the", "on the": one event); such a word is placed between the onsets around it in
    proportion to its characters. Onsets never decrease."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    found: list[float | None] = [None] * len(spans)
    w = 0
    for pos, sample in sorted(events):
        c = pos - 1
        while w < len(spans) and spans[w][1] <= c:
            w += 1
        if w < len(spans) and spans[w][0] <= c and found[w] is None:
            found[w] = min(sample * scale, n_samples)
    # the anchors: the known onsets, with the clip's start and end at the text's start and end
    chars = [0.0] + [float(spans[i][0]) for i in range(len(spans)) if found[i] is not None] + [float(len(text))]
    times = [0.0] + [f for f in found if f is not None] + [float(n_samples)]
    times = np.maximum.accumulate(times).tolist()
    onsets = [f if f is not None else float(np.interp(spans[i][0], chars, times)) for i, f in enumerate(found)]
    return np.maximum.accumulate([round(o) for o in onsets]).tolist() if onsets else []


class Speaker:
    """One per process; wraps libespeak-ng (global state inside the C lib).

    Several ``Speaker`` objects in one process share the library and take turns through a lock. A Speaker
    pickles as its paths, so it can be sent to ``multiprocessing`` workers (fork or spawn) and reopens
    the library there.
    """

    def __init__(self, library: str | None = None, data_path: str | None = None) -> None:
        default_lib, default_data = (None, None) if library and data_path else _default_paths()
        self.library = str(Path(library or default_lib).resolve())  # type: ignore[arg-type]
        self.data_path = str(Path(data_path or default_data).resolve())  # type: ignore[arg-type]
        if not Path(self.library).is_file():
            raise OmnitokError(f"eSpeak NG library not found: {self.library}")
        if not (Path(self.data_path) / "phontab").is_file():
            raise OmnitokError(
                f"eSpeak NG data directory {self.data_path} is not valid: expected a 'phontab' file in it"
            )
        with _LIBRARIES_LOCK:
            if self.library not in _LIBRARIES:
                _LIBRARIES[self.library] = _Library(self.library)
            self._lib = _LIBRARIES[self.library]
        if not self._lib.resettable:
            warnings.warn(
                f"cannot reset eSpeak NG state for {self.library} on this platform; synthesis will depend "
                "on the order of earlier calls in this process",
                RuntimeWarning,
                stacklevel=2,
            )
        with self._lib.lock:
            self._lib.reset(self.data_path)
            native = int(self._lib.lib.espeak_ng_GetSampleRate())
        if native <= 0:
            raise OmnitokError(f"eSpeak NG reported an invalid sample rate {native}")
        self.native_rate = native

    def __reduce__(self) -> tuple[type[Speaker], tuple[str, str]]:
        return (Speaker, (self.library, self.data_path))

    @property
    def version(self) -> str:
        return self._lib.version

    @property
    def deterministic(self) -> bool:
        """Whether output depends only on (text, style), i.e. the library state can be reset."""
        return self._lib.resettable

    @staticmethod
    def _check_text(text: str) -> bytes:
        if not isinstance(text, str):
            raise OmnitokError(f"speech text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise OmnitokError("speech text is empty: eSpeak needs at least one word to speak")
        if "\0" in text:
            raise OmnitokError("speech text contains a NUL character")
        return text.encode("utf-8")

    def _prepare(self, style: Style) -> None:
        if not isinstance(style, Style):
            raise OmnitokError(f"style must be an omnitok.world.speech.Style, got {type(style).__name__}")
        lib = self._lib
        lib.reset(self.data_path)
        lib.set_voice(get_voice(style.voice))
        for param, value in (
            ("rate", RATES[style.rate]),
            ("pitch", PITCHES[style.pitch]),
            ("range", _RANGE),
            ("volume", _VOLUME),
        ):
            if lib.lib.espeak_SetParameter(_PARAM[param], value, 0) != 0:
                raise OmnitokError(f"eSpeak NG rejected {param}={value}")

    def synthesize(self, text: str, style: Style) -> np.ndarray:
        """Speak ``text``: float32 mono in [-1, 1] at ``SAMPLE_RATE``, identical for identical inputs."""
        return self.synthesize_timed(text, style)[0]

    def synthesize_timed(self, text: str, style: Style) -> tuple[np.ndarray, list[int]]:
        """``synthesize``, and where each of the text's words (split on white space) starts, in samples at
        ``SAMPLE_RATE``. The synthesiser knows where it put every word; a clip that carries these onsets can be
        cut at its words without a forced aligner (the read-aloud layout, ``omnitok.sequence``)."""
        raw = self._check_text(text)
        with self._lib.lock:
            self._prepare(style)
            pcm, events = self._lib.synth(raw)
        if pcm.size == 0:
            raise OmnitokError(f"eSpeak NG produced no audio for text {text[:60]!r}")
        audio = pcm.astype(np.float32) / 32768.0
        if self.native_rate != SAMPLE_RATE:
            from scipy.signal import resample_poly

            g = gcd(SAMPLE_RATE, self.native_rate)
            up, down = SAMPLE_RATE // g, self.native_rate // g
            audio = resample_poly(audio, up, down, window=_resample_filter(up, down)).astype(np.float32)
        onsets = _word_onsets(text, events, SAMPLE_RATE / self.native_rate, len(audio))
        return np.clip(audio, -1.0, 1.0), onsets

    def phonemes(self, text: str, style: Style) -> str:
        """IPA in the voice's accent: phonemes joined by '_' inside a word, words by ' '.

        eSpeak returns one clause per call (it stops at commas and full stops), so we loop until it has
        consumed the whole text.
        """
        raw = self._check_text(text)
        buf = ctypes.create_string_buffer(raw)
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        mode = _PHONEMES_IPA | (ord("_") << 8)
        clauses: list[str] = []
        with self._lib.lock:
            self._prepare(style)
            while ptr.value:
                out = self._lib.lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, mode)
                if out:
                    clause = " ".join(out.decode("utf-8", errors="replace").split())
                    if clause:
                        clauses.append(clause)
            # Selecting a voice queues a copy of it (1.3 KB) that only synthesis consumes and frees;
            # speaking nothing drains the queue so phoneme-only calls do not leak.
            self._lib.synth(b"")
        return " ".join(clauses)


# --------------------------------------------------------------------------------------------------
# measurement and files


def estimate_f0(audio: np.ndarray, sample_rate: int, fmin: float = 60.0, fmax: float = 500.0) -> float:
    """Median fundamental frequency (Hz) of the voiced frames, or NaN when nothing is voiced.

    A small YIN estimator (difference function, cumulative-mean normalisation, absolute threshold). It
    is the yardstick for "did the model speak at the requested pitch", so it has to be robust to octave
    errors on eSpeak's buzzy source more than it has to be exact; the median over frames absorbs the rest.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise OmnitokError(f"estimate_f0 expects mono audio (1-D), got shape {x.shape}")
    if not 0 < fmin < fmax < sample_rate / 2:
        raise OmnitokError(f"estimate_f0: need 0 < fmin < fmax < sample_rate/2, got {fmin}, {fmax}, {sample_rate}")
    tau_min = max(2, int(sample_rate / fmax))
    tau_max = int(np.ceil(sample_rate / fmin))
    win = tau_max  # one period of the lowest pitch fits in the window
    hop = max(1, sample_rate // 100)
    if x.size < win + tau_max + 1:
        return float("nan")
    n_frames = 1 + (x.size - win - tau_max - 1) // hop
    idx = np.arange(win + tau_max + 1)[None, :] + hop * np.arange(n_frames)[:, None]
    frames = x[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    energy = np.sqrt((frames[:, :win] ** 2).mean(axis=1))
    loud = energy > 0.1 * energy.max() if energy.max() > 0 else np.zeros(n_frames, bool)
    if not loud.any():
        return float("nan")
    frames = frames[loud]
    # d(tau) = sum_j (x_j - x_{j+tau})^2 over the window, from FFT cross-correlation and running energies. The
    # correlation is linear as long as n_fft covers a frame: j + tau < win + tau_max + 1 never wraps around.
    n_fft = 1 << int(np.ceil(np.log2(frames.shape[1])))
    spec_full = np.fft.rfft(frames, n_fft)
    spec_win = np.fft.rfft(frames[:, :win], n_fft)
    cross = np.fft.irfft(np.conj(spec_win) * spec_full, n_fft)[:, : tau_max + 1]
    sq = np.concatenate([np.zeros((frames.shape[0], 1)), np.cumsum(frames**2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    e0 = sq[:, win][:, None]
    e_tau = sq[:, win : win + tau_max + 1] - sq[:, : tau_max + 1]
    diff = np.maximum(e0 + e_tau - 2 * cross, 0.0)
    cum = np.cumsum(diff[:, 1:], axis=1) / np.arange(1, tau_max + 1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] / np.maximum(cum, 1e-12)
    # per frame: the first tau >= tau_min below the threshold, then down to the local minimum after it (the first
    # tau from there whose successor is not lower), then a parabola through the minimum's neighbours
    below = cmnd[:, tau_min:] < 0.15
    found = below.any(axis=1)
    if not found.any():
        return float("nan")
    cmnd, first = cmnd[found], tau_min + below[found].argmax(axis=1)
    stop = np.ones_like(cmnd, dtype=bool)
    stop[:, :-1] = cmnd[:, 1:] >= cmnd[:, :-1]
    t = (stop & (taus[None, :] >= first[:, None])).argmax(axis=1)
    inner = (t > 0) & (t < tau_max)
    rows = np.arange(len(t))
    a = cmnd[rows, np.clip(t - 1, 0, tau_max)]
    b = cmnd[rows, t]
    c = cmnd[rows, np.clip(t + 1, 0, tau_max)]
    den = a - 2 * b + c
    shift = np.where(inner & (den > 0), 0.5 * (a - c) / np.where(den > 0, den, 1.0), 0.0)
    return float(np.median(sample_rate / (t + shift)))


def encode_wav(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """PCM16 mono WAV bytes; no timestamps or metadata, so equal samples give equal bytes."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise OmnitokError(f"encode_wav expects mono samples (1-D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise OmnitokError(f"encode_wav expects float samples in [-1, 1], got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise OmnitokError("encode_wav: samples contain NaN or infinity")
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise OmnitokError(f"encode_wav: sample_rate must be a positive int, got {sample_rate!r}")
    pcm = np.round(np.clip(x.astype(np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Read mono PCM WAV (8, 16 or 32 bit) into float32 in [-1, 1] and its sample rate."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise OmnitokError(f"decode_wav expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise OmnitokError(f"not a WAV file: expected a RIFF/WAVE header, got {data[:12]!r}")
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise OmnitokError(f"unsupported or corrupt WAV (only integer PCM is read): {e}") from e
    if channels != 1:
        raise OmnitokError(f"WAV must be mono: expected 1 channel, got {channels}")
    if width == 1:
        x = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = (np.frombuffer(frames, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    else:
        raise OmnitokError(f"WAV sample width {8 * width} bit is not supported: expected 8, 16 or 32")
    return x, rate


__all__ = [
    "PITCHES",
    "RATES",
    "SAMPLE_RATE",
    "VOICES",
    "Speaker",
    "Style",
    "Voice",
    "decode_wav",
    "encode_wav",
    "estimate_f0",
    "get_voice",
]
