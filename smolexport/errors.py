"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class SmolexportError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""

    exit_code = 1


class UsageError(SmolexportError):
    """Bad arguments: the CLI exits with 2, like Click's own usage errors."""

    exit_code = 2
