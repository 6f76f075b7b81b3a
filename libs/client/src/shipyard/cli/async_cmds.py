"""``shipyard async``: asynchronous predictions of a deployment (submitted with
``shipyard predict D --data ... --async``): list, status, result, cancel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from shipyard.cli._output import (
    cut,
    get_client,
    json_option,
    print_fields,
    print_json,
    print_table,
    time_or_duration,
    when,
)
from shipyard.client import ASYNC_STATUSES, AsyncRequestView


def print_request(view: AsyncRequestView) -> None:
    """The fields of one request, for people."""
    pairs: list[tuple[str, object]] = [
        ("request id", view.request_id),
        ("deployment", view.deployment),
        ("status", view.status + (" (expired: payload and result removed)" * view.expired)),
        ("attempts", view.attempts),
        ("created", when(view.created_at)),
        ("started", when(view.started_at)),
        ("finished", when(view.finished_at)),
        ("expires", when(view.expires_at)),
    ]
    if view.error:
        pairs.append(("error", view.error))
    if view.status == "completed" and not view.expired:
        pairs.append(("result", f"shipyard async result {view.deployment} {view.request_id}"))
    print_fields(pairs)


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """``--since``: a time, or a duration before now, as ``deploy logs`` takes it."""
    moment = time_or_duration(ctx, param, value)
    return datetime.now(UTC) - moment if isinstance(moment, timedelta) else moment


@click.group("async")
def async_group() -> None:
    """Asynchronous predictions (`shipyard predict D --data ... --async`)."""


@async_group.command("list")
@click.argument("deployment")
@click.option("--status", type=click.Choice(ASYNC_STATUSES), default=None, help="Only these.")
@click.option(
    "--since",
    callback=_since,
    metavar="WHEN",
    help="Only those created since a time or a duration ago (1h).",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=None, help="At most this many.")
@json_option
@click.pass_context
def list_cmd(
    ctx: click.Context,
    deployment: str,
    status: str | None,
    since: datetime | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List DEPLOYMENT's async requests, newest first."""
    views = get_client(ctx).async_requests.list(deployment, status=status, since=since, limit=limit)
    if as_json:
        print_json([v.to_dict() for v in views])
        return
    print_table(
        ["request id", "status", "attempts", "created", "finished", "error"],
        (
            [
                v.request_id,
                v.status + ("*" if v.expired else ""),
                v.attempts,
                when(v.created_at),
                when(v.finished_at),
                cut(v.error or "-"),
            ]
            for v in views
        ),
        empty=f"no async requests of {deployment}",
    )


@async_group.command("status")
@click.argument("deployment")
@click.argument("request_id")
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, deployment: str, request_id: str, as_json: bool) -> None:
    """Show where async request REQUEST_ID of DEPLOYMENT stands."""
    view = get_client(ctx).async_requests.status(deployment, request_id)
    if as_json:
        print_json(view.to_dict())
    else:
        print_request(view)


@async_group.command("result")
@click.argument("deployment")
@click.argument("request_id")
@json_option
@click.pass_context
def result_cmd(ctx: click.Context, deployment: str, request_id: str, as_json: bool) -> None:
    """Print the result (the model's JSON answer) of a completed async request."""
    result = get_client(ctx).async_requests.result(deployment, request_id)
    if isinstance(result, str) and not as_json:
        click.echo(result)
    else:
        print_json(result)


@async_group.command("cancel")
@click.argument("deployment")
@click.argument("request_id")
@json_option
@click.pass_context
def cancel_cmd(ctx: click.Context, deployment: str, request_id: str, as_json: bool) -> None:
    """Cancel a queued async request (one that runs or ended cannot be)."""
    view = get_client(ctx).async_requests.cancel(deployment, request_id)
    if as_json:
        print_json(view.to_dict())
    else:
        click.echo(f"async request {view.request_id} of {deployment} cancelled")
