"""How every command reports errors a user can cause: one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import sys

import click

from .errors import SmolexportError


def user_errors(command):
    """Prints a user-caused error as one line on stderr and exits non-zero, never with a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from smolexport_runtime import SmolexportRuntimeError

        try:
            return command(*args, **kwargs)
        except SmolexportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except SmolexportRuntimeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
