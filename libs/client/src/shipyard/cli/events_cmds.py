"""``shipyard events``: stored events, consumer lag, projection replay and a live tail."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from shipyard.cli._output import (
    cut,
    fail,
    get_client,
    json_option,
    note,
    num,
    print_fields,
    print_json,
    print_json_line,
    print_table,
    when,
    yes_no,
)
from shipyard.client import (
    EVENT_SOURCED_SERVICES,
    ConsumerLag,
    InvalidArgument,
    LiveEvent,
    ShipyardClientError,
    tail_events,
)
from shipyard.client.config import DEFAULT_PORTS
from shipyard.client.events import nats_url_from_env, tail_subject

_SERVICES = click.Choice(sorted(DEFAULT_PORTS))
_PAYLOAD_WIDTH = 80


def _compact(value: Any, width: int = _PAYLOAD_WIDTH) -> str:
    """A payload on one line, cut to ``width`` so a table row stays readable."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return cut(text, width)


@click.group()
def events() -> None:
    """Domain events: list, lag, replay projections, tail live."""


@events.command("list")
@click.option(
    "--service", type=_SERVICES, default="quota", show_default=True, help="Whose event store."
)
@click.option("--stream", "stream_id", default=None, help="Only this stream (aggregate id).")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start after this position (the last_position of the previous page).",
)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="Page size."
)
@json_option
@click.pass_context
def list_events(
    ctx: click.Context,
    service: str,
    stream_id: str | None,
    after: int,
    limit: int,
    as_json: bool,
) -> None:
    """List a service's stored events in commit order."""
    page = (
        get_client(ctx).events(service).list_events(stream_id=stream_id, after=after, limit=limit)
    )
    if as_json:
        print_json({"service": service, **page.to_dict()})
        return
    print_table(
        ["position", "recorded_at", "stream", "version", "type", "payload"],
        (
            [
                e.position,
                when(e.recorded_at),
                e.stream_id,
                e.version,
                f"{e.event_type}/v{e.schema_version}",
                _compact(e.payload),
            ]
            for e in page.events
        ),
        empty=f"no events after position {after}",
    )
    if len(page.events) >= limit:
        note(f"more events may follow: add --after {page.last_position}")


@events.command("lag")
@click.option(
    "--service",
    type=_SERVICES,
    default=None,
    help="Only this service. Default: every event-sourced one "
    f"({', '.join(EVENT_SOURCED_SERVICES)}).",
)
@json_option
@click.pass_context
def lag(ctx: click.Context, service: str | None, as_json: bool) -> None:
    """Show projections' and consumers' lag and the outbox backlog."""
    client = get_client(ctx)
    services = [service] if service else list(EVENT_SOURCED_SERVICES)
    consumers: list[ConsumerLag] = []
    failures: list[ShipyardClientError] = []
    for name in services:
        try:
            consumers.extend(client.events(name).lag())
        except ShipyardClientError as exc:
            # One service down should not hide the others' lag; the failure still
            # decides the exit code below.
            failures.append(exc)
    if failures and len(failures) == len(services):
        raise failures[0]
    if as_json:
        print_json(consumers)
    else:
        print_table(
            [
                "service",
                "consumer",
                "pending",
                "ack_pending",
                "redelivered",
                "dead_lettered",
                "outbox_pending",
            ],
            (
                [
                    c.service,
                    c.name,
                    c.pending,
                    c.ack_pending,
                    c.redelivered,
                    c.dead_lettered,
                    c.outbox_pending,
                ]
                for c in consumers
            ),
            empty="no consumers reported",
        )
    if failures:
        raise failures[0]


@events.command("replay")
@click.argument("projection")
@click.option("--service", type=_SERVICES, required=True, help="The service owning PROJECTION.")
@click.option(
    "--check",
    is_flag=True,
    help="Only rebuild and compare with the live tables; swap nothing. Exits 1 if they differ.",
)
@json_option
@click.pass_context
def replay(ctx: click.Context, projection: str, service: str, check: bool, as_json: bool) -> None:
    """Rebuild PROJECTION from the event store and swap it in. Admin only."""
    result = get_client(ctx).events(service).replay(projection, check=check)
    if as_json:
        print_json(result)
    else:
        print_fields(
            [
                ("projection", result.projection),
                ("events", result.events),
                ("seconds", f"{result.seconds:.3f}"),
                ("events/s", num(round(result.events_per_second, 1))),
                ("equal", yes_no(result.equal)),
                ("swapped", yes_no(result.swapped)),
            ]
        )
        if result.differences:
            click.echo("differences:")
            for diff in result.differences:
                click.echo(f"  - {diff}")
    if check and not result.equal:
        # --check is what scripts and CI use to detect drift, so drift must fail the command.
        raise fail(
            f"projection {result.projection} rebuilt from {result.events} events differs "
            "from the live tables (run without --check to swap the rebuilt tables in)"
        )


@events.command("tail")
@click.option("--service", type=_SERVICES, default=None, help="Only this service's events.")
@click.option("--aggregate", default=None, help="Only this aggregate type (e.g. group_quota).")
@click.option(
    "--nats-url",
    default=None,
    help="NATS server. Default: $SHIPYARD_NATS_URL or nats://127.0.0.1:4222.",
)
@json_option
def tail(service: str | None, aggregate: str | None, nats_url: str | None, as_json: bool) -> None:
    """Print domain events live from JetStream as they are published. Ctrl-C stops."""
    url = nats_url or nats_url_from_env()
    try:
        tail_subject(service, aggregate)  # a bad filter is a usage error (exit 2), found early
    except InvalidArgument as exc:
        raise click.UsageError(exc.message) from None

    def _show(live: LiveEvent) -> None:
        if as_json:
            print_json_line(live.envelope)
            return
        e = live.event
        stamp = e.recorded_at.isoformat(timespec="milliseconds") if e.recorded_at else "-"
        click.echo(
            f"{stamp}  {e.service}  {e.aggregate}  {e.stream_id}  v{e.version}  "
            f"{e.event_type}  {_compact(e.payload, 200)}"
        )

    async def _run() -> None:
        async for live in tail_events(
            nats_url=url, service=service, aggregate=aggregate, on_status=note
        ):
            _show(live)

    try:
        asyncio.run(_run())
    except KeyboardInterrupt:
        # Ctrl-C is how a tail ends; it is not a failure.
        return
