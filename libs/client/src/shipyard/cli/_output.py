"""What every command shares: the client from the global options, ``--json`` and table
output, and the one place where failures become a one-line ``error:`` and an exit code."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from shipyard.client import Client, DeploymentReadme, Readme, ShipyardClientError
from shipyard.client._convert import plain
from shipyard.client.logs import parse_duration

# Exit codes: 1 for a failed call or operation, 2 for a bad command line (click's own
# convention for usage errors), 130 for Ctrl-C (128 + SIGINT, what shells expect).
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])

# How wide a free-text cell (a reason, a message) may be in a table row.
CELL_WIDTH = 60


@dataclass
class CliState:
    """The root group's options, on ``ctx.obj``; commands get the client through it."""

    home: Path | None = None
    token: str | None = None
    client: Client | None = None


def get_client(ctx: click.Context) -> Client:
    """The client for this invocation, made on first use from ``--home`` and ``--token``
    and closed when the command ends."""
    state = ctx.find_object(CliState)
    if state is None:  # a command invoked on its own (tests), without the root group
        state = CliState()
        ctx.obj = state
    if state.client is None:
        state.client = Client(token=state.token, home=state.home)
        ctx.find_root().call_on_close(state.client.close)
    return state.client


def json_option(func: F) -> F:
    """Adds ``--json`` (machine-readable output, passed as ``as_json``) to a command."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
    )(func)


def print_json(data: Any) -> None:
    """Prints data (dataclasses with ``to_dict``, lists, dicts) as indented JSON."""
    click.echo(json.dumps(plain(data), indent=2, ensure_ascii=False))


def print_json_line(data: Any) -> None:
    """Prints data as one compact JSON line (for streams: one object per line)."""
    click.echo(json.dumps(plain(data), ensure_ascii=False, separators=(",", ":")))


def markdown_file_option(*param_decls: str, help: str) -> Callable[[F], F]:
    """An option taking a Markdown FILE (``-`` reads stdin), passed as an open text file
    or ``None`` when not given."""
    return click.option(
        *param_decls,
        type=click.File("r", encoding="utf-8"),
        default=None,
        metavar="FILE",
        help=help,
    )


# ``readme --set FILE``: the same option on every command that shows and replaces a readme.
readme_set_option = markdown_file_option(
    "--set", "source", help="Replace the readme with FILE's Markdown (- reads stdin)."
)


def num(value: float | int) -> str:
    """A number without noise: ``4.0`` → ``4``, ``0.5`` → ``0.5``."""
    return f"{value:g}"


def when(value: datetime | None) -> str:
    """A timestamp as UTC text for tables; ``-`` when unknown."""
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def time_or_duration(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | timedelta | None:
    """``--since``/``--until``: a duration before now (``30s``, ``15m``, ``1h``, ``2d``) or
    an ISO 8601 time (UTC unless it names its zone)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a duration (30s, 15m, 1h, 2d) nor a time (2026-11-22T08:00:00Z)",
            ctx=ctx,
            param=param,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def yes_no(value: bool) -> str:
    """``yes`` / ``no``."""
    return "yes" if value else "no"


def cut(text: str, width: int = CELL_WIDTH) -> str:
    """Text on one line, cut to ``width`` (ending in ``…`` when cut) so a row stays readable."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str) -> None:
    """Prints aligned columns under upper-case headers, or ``empty`` when there are no rows."""
    cells = [[str(c) for c in row] for row in rows]
    if not cells:
        click.echo(empty)
        return
    table = [[h.upper() for h in headers], *cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """Prints ``name: value`` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    for key, value in pairs:
        click.echo(f"{(key + ':').ljust(width)} {value}")


def print_readme(readme: Readme | DeploymentReadme, *, as_json: bool, missing: str) -> None:
    """Prints a readme's Markdown as is (its JSON with ``as_json``); notes ``missing`` on
    stderr when it is empty."""
    if as_json:
        print_json(readme)
    elif readme.markdown:
        click.echo(readme.markdown, nl=not readme.markdown.endswith("\n"))
    else:
        note(missing)


def confirm_delete(prompt: str, *, yes: bool, as_json: bool) -> None:
    """Asks ``prompt`` on stderr unless ``--yes``; aborts on no. ``--json`` without
    ``--yes`` is a usage error: a script has no one to answer."""
    if yes:
        return
    if as_json:
        raise click.UsageError("--json needs --yes: there is no one to confirm the delete")
    click.confirm(prompt, abort=True, err=True)


def warn(message: str) -> None:
    """A one-line warning on stderr (never on stdout, which ``--json`` keeps parseable)."""
    click.echo(f"warning: {message}", err=True)


def note(message: str) -> None:
    """A one-line remark on stderr."""
    click.echo(message, err=True)


def fail(message: str) -> click.ClickException:
    """An error to ``raise`` from a command: printed as ``error: <message>``, exit code 1."""
    return click.ClickException(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)


def _usage_message(exc: click.UsageError) -> str:
    message = exc.format_message()
    if exc.ctx is not None:
        message = f"{message} (see `{exc.ctx.command_path} --help`)"
    return message


class ShipyardGroup(click.Group):
    """The root group: runs the command and turns every failure into ONE line
    ``error: <reason>`` on stderr and an exit code (2 bad usage, 1 otherwise), never a
    traceback for the caller's mistake or an unreachable server."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Like :meth:`click.Group.main`, with Shipyard's error reporting."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            _error(_usage_message(exc))
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code or EXIT_FAILURE)
        except ShipyardClientError as exc:
            _error(str(exc))
            sys.exit(EXIT_FAILURE)
        except click.Abort as exc:
            # click turns Ctrl-C into Abort when not in standalone mode.
            interrupted = isinstance(exc.__context__, KeyboardInterrupt | EOFError)
            _error("interrupted" if interrupted else "aborted")
            sys.exit(EXIT_INTERRUPTED if interrupted else EXIT_FAILURE)
        except KeyboardInterrupt:
            _error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            # The reader went away (`shipyard events list | head`): stop quietly, and
            # point stdout at /dev/null so the interpreter's final flush does not fail too.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_FAILURE)
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
