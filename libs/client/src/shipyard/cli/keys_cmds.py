"""``shipyard keys``: deployments' client keys, the credentials client systems send to a
private deployment (a client name plus a secret shown once)."""

from __future__ import annotations

import re
import shlex

import click

from shipyard.cli._output import (
    get_client,
    json_option,
    print_fields,
    print_json,
    print_table,
    warn,
    when,
)
from shipyard.client.deployments import predict_url

_SHELL_SAFE = re.compile(r"[A-Za-z0-9_-]+")

_SHOWN_ONCE = "this secret is shown only once and cannot be retrieved later; store it now"


def curl_examples(url: str, client: str, secret: str) -> dict[str, str]:
    """Ready-to-paste calls of the raw JSON route ``url`` with a client key: HTTP Basic
    (``client:secret``, what ``curl -u`` sends) and the ``X-API-Key`` header, each one
    shell command."""
    target = shlex.quote(url)
    header = f"X-API-Key: {secret}"
    # Secrets are URL-safe base64, safe inside double quotes (the form people know from
    # curl's documentation); anything else is quoted properly.
    quoted = f'"{header}"' if _SHELL_SAFE.fullmatch(secret) else shlex.quote(header)
    return {
        "basic": f"curl -u {shlex.quote(f'{client}:{secret}')} {target} -d @payload.json",
        "header": f"curl -H {quoted} {target} -d @payload.json",
    }


@click.group()
def keys() -> None:
    """Client keys of deployments: what client systems send to a private endpoint."""


@keys.command("create")
@click.argument("deployment")
@click.option(
    "--client",
    required=True,
    metavar="NAME",
    help="The client's name (lowercase letters, digits, '-'); the model sees it in "
    "X-Forwarded-User.",
)
@json_option
@click.pass_context
def create(ctx: click.Context, deployment: str, client: str, as_json: bool) -> None:
    """Create a client key for DEPLOYMENT and print its secret (once).

    Members of the deployment's group (and admins) may. A client name has at most one
    active key: revoke it first to replace it.
    """
    shipyard = get_client(ctx)
    created = shipyard.client_keys.create(deployment, client)
    key = created.key
    url = predict_url(key.deployment or deployment, shipyard.config.gateway_url())
    examples = curl_examples(url, key.client or client, created.secret)
    if as_json:
        print_json({**created.to_dict(), "url": url, "examples": examples})
    else:
        print_fields(
            [
                ("deployment", key.deployment),
                ("client", key.client),
                ("key id", key.key_id),
                ("group", key.group or "-"),
                ("secret", created.secret),
            ]
        )
        click.echo()
        click.echo("call the deployment with it (HTTP Basic, or the X-API-Key header):")
        click.echo(f"  {examples['basic']}")
        click.echo(f"  {examples['header']}")
    warn(_SHOWN_ONCE)


@keys.command("list")
@click.argument("deployment")
@click.option("--all", "show_all", is_flag=True, help="Include revoked keys.")
@json_option
@click.pass_context
def list_keys(ctx: click.Context, deployment: str, show_all: bool, as_json: bool) -> None:
    """List the client keys of DEPLOYMENT (never their secrets)."""
    found = get_client(ctx).client_keys.list(deployment, include_revoked=show_all)
    if as_json:
        print_json(found)
        return
    headers = ["client", "key_id", "created", "created_by", "last_used"]
    if show_all:
        headers.append("revoked")
    rows = []
    for k in found:
        row = [k.client, k.key_id, when(k.created_at), k.created_by or "-", when(k.last_used_at)]
        if show_all:
            row.append(when(k.revoked_at) if k.revoked else "-")
        rows.append(row)
    empty = f"no client keys on {deployment}"
    if not show_all:
        empty = f"no active client keys on {deployment} (--all shows revoked ones)"
    print_table(headers, rows, empty=empty)


@keys.command("revoke")
@click.argument("deployment")
@click.argument("client")
@json_option
@click.pass_context
def revoke(ctx: click.Context, deployment: str, client: str, as_json: bool) -> None:
    """Revoke the active key of CLIENT on DEPLOYMENT (repeating it is harmless)."""
    key = get_client(ctx).client_keys.revoke(deployment, client)
    if as_json:
        print_json(key)
        return
    click.echo(
        f"revoked client key {key.key_id} of client {key.client or client} on "
        f"{key.deployment or deployment} (the gateway refuses it within a second)"
    )
