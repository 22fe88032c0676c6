"""One exception type for every user-facing failure.

The CLI turns an ``OmnitokError`` into a single ``error: ...`` line and exit code 2, so messages must
name the offending file, field or argument and say what was expected versus what was received.
Anything else that escapes is a bug and keeps its traceback.
"""


class OmnitokError(Exception):
    """A problem with the user's input, data or environment (not a bug in omnitok)."""
