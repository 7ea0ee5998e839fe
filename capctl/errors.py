"""The one kind of failure capctl reports."""

from typing import IO, Any

import click


class CapctlError(click.ClickException):
    """A failure shown as the single line `capctl: <message>`, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"capctl: {self.format_message()}", err=True)
