"""``shipyard users``: users and their API tokens."""

from __future__ import annotations

import click

from shipyard.cli._output import (
    get_client,
    json_option,
    print_fields,
    print_json,
    print_table,
    warn,
    when,
    yes_no,
)

_SHOWN_ONCE = "this token is shown only once and cannot be retrieved later; store it now"


@click.group()
def users() -> None:
    """Users and their API tokens."""


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make the user an administrator.")
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="GROUP",
    help="A group to join (repeatable); each must exist.",
)
@json_option
@click.pass_context
def create(
    ctx: click.Context, name: str, admin: bool, groups: tuple[str, ...], as_json: bool
) -> None:
    """Create the user NAME and print their first API token (once). Admin only."""
    created = get_client(ctx).identity.create_user(name, admin=admin, groups=groups)
    if as_json:
        print_json(created)
    else:
        print_fields(
            [
                ("user", created.user.name),
                ("admin", yes_no(created.user.admin)),
                ("groups", ", ".join(created.user.groups) or "-"),
                ("token id", created.token_id),
                ("token", created.token),
            ]
        )
    warn(_SHOWN_ONCE)


@users.command("list")
@json_option
@click.pass_context
def list_users(ctx: click.Context, as_json: bool) -> None:
    """List users. Admin only."""
    found = get_client(ctx).identity.list_users()
    if as_json:
        print_json(found)
        return
    print_table(
        ["name", "admin", "groups", "created", "created_by"],
        (
            [u.name, yes_no(u.admin), ",".join(u.groups) or "-", when(u.created_at), u.created_by]
            for u in found
        ),
        empty="no users",
    )


@users.command("whoami")
@json_option
@click.pass_context
def whoami(ctx: click.Context, as_json: bool) -> None:
    """Show who the current token belongs to."""
    principal = get_client(ctx).identity.whoami()
    if as_json:
        print_json(principal)
        return
    print_fields(
        [
            ("user", principal.user),
            ("admin", yes_no(principal.admin)),
            ("groups", ", ".join(principal.groups) or "-"),
            ("token id", principal.token_id or "-"),
        ]
    )


@users.command("issue-token")
@click.argument("name")
@click.option("--description", default="", help="What the token is for (shown in listings).")
@json_option
@click.pass_context
def issue_token(ctx: click.Context, name: str, description: str, as_json: bool) -> None:
    """Issue another API token for the user NAME (admins, or users for themselves)."""
    issued = get_client(ctx).identity.issue_token(name, description=description)
    if as_json:
        print_json({"user": name, "token": issued.token, "token_id": issued.token_id})
    else:
        print_fields([("user", name), ("token id", issued.token_id), ("token", issued.token)])
    warn(_SHOWN_ONCE)


@users.command("revoke-token")
@click.argument("name")
@click.argument("token_id")
@json_option
@click.pass_context
def revoke_token(ctx: click.Context, name: str, token_id: str, as_json: bool) -> None:
    """Revoke the API token TOKEN_ID of the user NAME."""
    get_client(ctx).identity.revoke_token(name, token_id)
    if as_json:
        print_json({"user": name, "token_id": token_id, "revoked": True})
    else:
        click.echo(f"revoked token {token_id} of user {name}")
