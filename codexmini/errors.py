"""Errors the CLI reports as one line (what went wrong and what to do), not as a traceback."""


class CodexMiniError(Exception):
    """Base of codexmini's own user-facing errors."""


class StageFailed(CodexMiniError):
    """A stage ran but its result must not ship (non-finite metrics, a failed check): it is not marked complete."""


class RunLocked(CodexMiniError):
    """Another process holds the run folder."""
