"""One exception type for every user-facing failure.

The CLI turns an ``OmnitokError`` into a single ``error: ...`` line and exit code 2, so messages must
name the offending file, field or argument and say what was expected versus what was received.
Anything else that escapes is a bug and keeps its traceback.
"""

import math


class OmnitokError(Exception):
    """A problem with the user's input, data or environment (not a bug in omnitok)."""


def is_int(v: object) -> bool:
    """An int that is not a bool: JSON, YAML and Python callers pass ``True`` where a count belongs, and Python
    would take it for 1."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float that is not a bool: NaN slips through every range check (each comparison with it is
    false), and infinity through the upper-bound-free ones."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_numbers(
    obj: object, where: str, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """Raise if a config's numeric fields are not finite numbers in range (None keeps the field's own meaning).

    Why: configs come from YAML and flags, and a step count of -5 or a learning rate of "1e-3" otherwise runs to
    the end (an untrained tokenizer saved over a trained one) or fails deep inside torch with a traceback.
    """
    for names, least in ((positive, "> 0"), (non_negative, ">= 0")):
        for name in names:
            v = getattr(obj, name)
            if v is None:
                continue
            if not is_number(v):
                raise OmnitokError(f"{where}: {name} must be a number {least}, got {v!r}")
            if v < 0 or (v == 0 and least == "> 0"):
                raise OmnitokError(f"{where}: {name} must be {least}, got {v}")
