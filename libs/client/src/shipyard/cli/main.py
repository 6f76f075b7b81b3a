"""The ``shipyard`` command: ``shipyard <noun> <verb>``, a thin layer over ``shipyard.client``."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from shipyard.cli import (
    async_cmds,
    batch_cmds,
    deploy_cmds,
    events_cmds,
    groups_cmds,
    images_cmds,
    instance_types_cmds,
    keys_cmds,
    quota_cmds,
    users_cmds,
)
from shipyard.cli._output import CliState, ShipyardGroup, warn

PLATFORM_MODULE = "shipyard.cli.platform_cmds"


@click.group(cls=ShipyardGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Shipyard home (config and data). Default: $SHIPYARD_HOME or ~/.shipyard.",
)
@click.option(
    "--token",
    default=None,
    help="API token for this call. Default: $SHIPYARD_TOKEN or the one in the home's config.",
)
@click.version_option(package_name="shipyard-client", prog_name="shipyard")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, token: str | None) -> None:
    """Shipyard: trained model to monitored, access-controlled prediction endpoint.

    Every command takes --json for machine-readable output.
    """
    ctx.obj = CliState(home=home, token=token)


cli.add_command(quota_cmds.quota)
cli.add_command(instance_types_cmds.instance_types)
cli.add_command(users_cmds.users)
cli.add_command(groups_cmds.groups)
cli.add_command(events_cmds.events)
cli.add_command(images_cmds.image)
cli.add_command(deploy_cmds.deploy)
cli.add_command(deploy_cmds.predict)
cli.add_command(keys_cmds.keys)
cli.add_command(async_cmds.async_group)
cli.add_command(batch_cmds.batch)


def _register_platform_commands(group: click.Group) -> None:
    """Adds ``up``/``down``/``status`` when the platform module is installed.

    The module is optional (it lands separately); without it the rest of the CLI works.
    """
    try:
        module = importlib.import_module(PLATFORM_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == PLATFORM_MODULE:
            return
        warn(f"platform commands (up, down, status) unavailable: {exc}")
        return
    except ImportError as exc:
        warn(f"platform commands (up, down, status) unavailable: {exc}")
        return
    module.register(group)


_register_platform_commands(cli)


def main() -> None:
    """Console entry point (``shipyard``)."""
    cli.main(prog_name="shipyard")
