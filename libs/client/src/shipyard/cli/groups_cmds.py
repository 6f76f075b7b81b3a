"""``shipyard groups``: groups (teams) and their members."""

from __future__ import annotations

import click

from shipyard.cli._output import (
    get_client,
    json_option,
    print_fields,
    print_json,
    print_table,
    when,
)
from shipyard.client import Group


@click.group()
def groups() -> None:
    """Groups (teams): quotas and deployments belong to them."""


def _print_group(group: Group) -> None:
    print_fields(
        [
            ("group", group.name),
            ("description", group.description or "-"),
            ("members", ", ".join(group.members) or "-"),
            ("created", when(group.created_at)),
        ]
    )


@groups.command("create")
@click.argument("name")
@click.option("--description", default="", help="What the group is.")
@json_option
@click.pass_context
def create(ctx: click.Context, name: str, description: str, as_json: bool) -> None:
    """Create the group NAME. Admin only."""
    group = get_client(ctx).identity.create_group(name, description=description)
    if as_json:
        print_json(group)
    else:
        _print_group(group)


@groups.command("add-member")
@click.argument("group")
@click.argument("user")
@json_option
@click.pass_context
def add_member(ctx: click.Context, group: str, user: str, as_json: bool) -> None:
    """Add USER to GROUP. Admin only."""
    updated = get_client(ctx).identity.add_member(group, user)
    if as_json:
        print_json(updated)
    else:
        _print_group(updated)


@groups.command("remove-member")
@click.argument("group")
@click.argument("user")
@json_option
@click.pass_context
def remove_member(ctx: click.Context, group: str, user: str, as_json: bool) -> None:
    """Remove USER from GROUP. Admin only."""
    updated = get_client(ctx).identity.remove_member(group, user)
    if as_json:
        print_json(updated)
    else:
        _print_group(updated)


@groups.command("list")
@json_option
@click.pass_context
def list_groups(ctx: click.Context, as_json: bool) -> None:
    """List groups (all for admins, your own otherwise)."""
    found = get_client(ctx).identity.list_groups()
    if as_json:
        print_json(found)
        return
    print_table(
        ["name", "members", "description", "created"],
        (
            [g.name, ",".join(g.members) or "-", g.description or "-", when(g.created_at)]
            for g in found
        ),
        empty="no groups (an admin creates one with `shipyard groups create NAME`)",
    )
