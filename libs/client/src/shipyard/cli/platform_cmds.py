"""``shipyard up`` / ``down`` / ``status``: the whole suite on this machine.

The work is done by the optional ``shipyard-platform`` package, imported only when one of
these commands runs, so the client installs without the servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from shipyard.cli._output import CliState, fail, json_option, note, print_json, print_table

HOME_OPTION = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Shipyard home (data, logs, config). Default: the global --home, $SHIPYARD_HOME "
    "or ~/.shipyard.",
)


def _platform() -> ModuleType:
    try:
        import shipyard_platform
    except ModuleNotFoundError as exc:
        if exc.name != "shipyard_platform":
            raise
        raise fail(
            "running Shipyard locally needs the shipyard-platform package "
            "(pip install shipyard-platform)"
        ) from None
    return shipyard_platform


def _home(ctx: click.Context, home: Path | None) -> Path | None:
    if home is not None:
        return home
    state = ctx.find_object(CliState)
    return state.home if state is not None else None


def _print_status(statuses: Sequence[Any], as_json: bool) -> None:
    if as_json:
        print_json([s.to_dict() for s in statuses])
        return
    print_table(
        ["component", "pid", "healthy", "restarts", "address", "detail"],
        [
            [
                s.name,
                s.pid or "-",
                "yes" if s.healthy else "no",
                s.restarts,
                s.address or "-",
                s.detail,
            ]
            for s in statuses
        ],
        empty="nothing recorded: run `shipyard up`",
    )


def _raise_platform_error(exc: Exception) -> click.ClickException:
    # The details (a component's log tail) go to stderr in full; the error line stays one.
    lines = str(exc).splitlines()
    if len(lines) > 1:
        note("\n".join(lines[1:]))
    return fail(lines[0] if lines else "shipyard up failed")


@click.command()
@click.option(
    "--foreground",
    is_flag=True,
    help="Run the supervisor in this terminal until Ctrl-C instead of in the background.",
)
@HOME_OPTION
@json_option
@click.pass_context
def up(ctx: click.Context, foreground: bool, home: Path | None, as_json: bool) -> None:
    """Start Shipyard on this machine: NATS, PostgreSQL and every service.

    Returns once everything is healthy (data and logs under the home; the first run creates
    the admin user and saves its token in the home's config). Running it again is harmless.
    SHIPYARD_NATS_URL / SHIPYARD_DATABASE_URL point at existing servers instead.
    """
    platform = _platform()
    resolved = _home(ctx, home)

    def ready() -> None:
        _print_status(platform.status(resolved), as_json)
        if foreground and not as_json:
            note("Shipyard is up. Ctrl-C stops it.")

    try:
        platform.up(resolved, foreground=foreground, on_ready=ready)
    except platform.PlatformError as exc:
        raise _raise_platform_error(exc) from None
    except ValueError as exc:  # a bad port or service name in the environment
        raise fail(str(exc)) from None


@click.command()
@HOME_OPTION
@json_option
@click.pass_context
def down(ctx: click.Context, home: Path | None, as_json: bool) -> None:
    """Stop Shipyard on this machine (services, then NATS and PostgreSQL). Data is kept."""
    platform = _platform()
    resolved = _home(ctx, home)
    platform.down(resolved)
    if as_json:
        print_json({"stopped": True})
    else:
        click.echo("Shipyard stopped.")


@click.command()
@HOME_OPTION
@json_option
@click.pass_context
def status(ctx: click.Context, home: Path | None, as_json: bool) -> None:
    """Show each component's pid and health. Exits 1 unless all are healthy."""
    platform = _platform()
    statuses = platform.status(_home(ctx, home))
    _print_status(statuses, as_json)
    if not all(s.healthy for s in statuses):
        ctx.exit(1)


def register(cli: click.Group) -> None:
    """Adds ``up``, ``down`` and ``status`` to the root group."""
    cli.add_command(up)
    cli.add_command(down)
    cli.add_command(status)
