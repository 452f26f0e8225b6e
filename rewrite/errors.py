"""Errors the user can act on. Each message is one line: the problem, then the fix."""


class RewriteError(Exception):
    """Bad input or an unmet precondition; the CLI prints the message and exits with code 2."""


class CaptureError(RewriteError):
    """The model could not be captured as a graph (names the module and source line)."""


class PassError(RewriteError):
    """A pass failed or broke its contract under --strict (names the pass and the passes before it)."""
