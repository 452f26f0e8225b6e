"""Errors the user can act on. Each message is one line: the problem, then the fix."""
import re


class RewriteError(Exception):
    """Bad input or an unmet precondition; the CLI prints the message and exits with code 2."""


class CaptureError(RewriteError):
    """The model could not be captured as a graph (names the module and source line)."""


class PassError(RewriteError):
    """A pass failed or broke its contract under --strict (names the pass and the passes before it)."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message (ANSI colors removed), or its type's name."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    line = next((s.strip() for s in text.splitlines() if s.strip()), type(exc).__name__)
    return line[:limit]


class ArtifactError(RewriteError):
    """An artifact was not written or does not compute what the verified model does. The output folder
    (its report.json says status "failed") was written; `.result` holds what optimize would have returned."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class InvalidValue(RewriteError, ValueError):
    """A value the user gave (a pass option, an input shape) is out of range; still a ValueError for callers."""


class NoCompressedForm(Exception):
    """A rewritten layer that the compressed-tensors format cannot describe: its model goes to rewrite's own
    layers folder instead (an input rotated online, which transformers' loader would not apply)."""
