"""``shipyard deploy``: deployments (create, update, stop, start, scale, delete, list,
show, history, instances, readme), and ``shipyard predict`` through the gateway."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from shipyard.cli._output import (
    confirm_delete,
    cut,
    fail,
    get_client,
    json_option,
    markdown_file_option,
    note,
    print_fields,
    print_json,
    print_json_line,
    print_readme,
    print_table,
    readme_set_option,
    time_or_duration,
    when,
)
from shipyard.client import (
    DEPLOYMENT_STATUSES,
    Client,
    DeploymentFailed,
    DeploymentView,
)
from shipyard.client.deployments import DEFAULT_WAIT_TIMEOUT, MAX_INSTANCES
from shipyard.client.logs import DEFAULT_TAIL as LOGS_DEFAULT_TAIL
from shipyard.client.logs import LogLine as InstanceLogLine

F = TypeVar("F", bound=Callable[..., Any])

# What `deploy update` can change; without any of them there is nothing to do.
_UPDATE_FLAGS = (
    "--image, --instance-type, --replicas, --min/--max, --target-inflight, "
    "--public/--private, --description, --meta, --clear-meta"
)


def _scale(low: int, high: int) -> str:
    """``2`` for a fixed count, ``1-4`` for an autoscaled range."""
    return str(low) if low == high else f"{low}-{high}"


def _replicas(low: int, high: int) -> str:
    """``1 replica``, ``2 replicas``, ``0-4 replicas``."""
    return f"{_scale(low, high)} replica{'' if low == high == 1 else 's'}"


def _ready(d: DeploymentView) -> str:
    return f"{d.ready_replicas}/{d.replicas}"


def _short_digest(digest: str) -> str:
    algo, sep, hexdigits = digest.partition(":")
    return f"{algo}:{hexdigits[:12]}" if sep else digest[:12]


# Options shared by several commands.


def _replica_options(func: F) -> F:
    """``--replicas N`` | ``--min N --max N`` and ``--target-inflight N``."""
    func = click.option(
        "--target-inflight",
        type=click.IntRange(min=0),
        default=None,
        metavar="N",
        help="Autoscaling target: in-flight requests per instance (0: the default).",
    )(func)
    func = click.option(
        "--max",
        "max_replicas",
        type=click.IntRange(min=0),
        default=None,
        metavar="N",
        help="Autoscale up to N instances (with --min).",
    )(func)
    func = click.option(
        "--min",
        "min_replicas",
        type=click.IntRange(min=0),
        default=None,
        metavar="N",
        help="Autoscale down to N instances, 0 to scale to zero when idle (with --max).",
    )(func)
    func = click.option(
        "--replicas",
        type=click.IntRange(min=0),
        default=None,
        metavar="N",
        help="A fixed number of instances (min = max = N).",
    )(func)
    return func


def _check_replicas(replicas: int | None, low: int | None, high: int | None) -> None:
    """Refuses --replicas with --min/--max, and one bound without the other."""
    if replicas is not None and (low is not None or high is not None):
        raise click.UsageError(
            "--replicas and --min/--max exclude each other: --replicas N for a fixed "
            "count, or --min N --max M for an autoscaled range"
        )
    if (low is None) != (high is None):
        given, missing = ("--min", "--max") if high is None else ("--max", "--min")
        raise click.UsageError(f"{given} needs {missing} too (or --replicas N for a fixed count)")


def _wait_options(func: F) -> F:
    """``--wait`` and ``--timeout``."""
    func = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_WAIT_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help="How long --wait waits.",
    )(func)
    func = click.option(
        "--wait",
        is_flag=True,
        help="Wait until it is deployed, showing its progress on stderr; exit 1 if it fails.",
    )(func)
    return func


def _parse_meta(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``("a=1", "b=2")`` → ``{"a": "1", "b": "2"}``."""
    metadata: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        metadata[key.strip()] = value
    return metadata


_meta_option = click.option(
    "--meta",
    "metadata",
    multiple=True,
    callback=_parse_meta,
    metavar="KEY=VALUE",
    help="A metadata entry (repeat for more).",
)


def _progress(d: DeploymentView) -> None:
    message = f" ({cut(d.message)})" if d.message else ""
    note(f"{d.name}: {d.status}, {_ready(d)} ready{message}")


def _wait_and_report(
    client: Client, result: DeploymentView, *, wait: bool, timeout: float, as_json: bool
) -> None:
    """Prints ``result`` (or, with ``wait``, the deployment once it is deployed)."""
    final = result
    if wait:
        note(f"waiting for {result.name} to be deployed (Ctrl-C stops waiting, not the rollout)")
        try:
            final = client.deployments.wait(
                result.name, "deployed", timeout=timeout, after=result, on_change=_progress
            )
        except DeploymentFailed as exc:
            if as_json:
                print_json(exc.deployment)
            raise
        except KeyboardInterrupt:
            note(f"stopped waiting; the rollout goes on (`shipyard deploy show {result.name}`)")
            raise
    if as_json:
        print_json(final)
    elif wait:
        click.echo(
            f"{final.name} is deployed: {_ready(final)} ready at "
            f"{client.deployments.predict_url(final.name)}"
        )


@click.group()
def deploy() -> None:
    """Deployments: serve an image as a prediction endpoint, change it, watch it."""


@deploy.command("create")
@click.argument("name")
@click.option("--image", required=True, metavar="NAME[:VERSION]", help="The image to serve.")
@click.option("--group", default="", help="The deployment's group. Default: your only group.")
@click.option(
    "--instance-type", required=True, metavar="TYPE", help="Machine shape of each instance."
)
@_replica_options
@click.option("--public", is_flag=True, help="Answer predictions without a key.")
@click.option("--description", default="", help="What it is for.")
@_meta_option
@markdown_file_option(
    "--readme", "readme_file", help="The readme (Markdown) from FILE (- reads stdin)."
)
@_wait_options
@json_option
@click.pass_context
def create(
    ctx: click.Context,
    name: str,
    image: str,
    group: str,
    instance_type: str,
    replicas: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
    target_inflight: int | None,
    public: bool,
    description: str,
    metadata: dict[str, str],
    readme_file: IO[str] | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Deploy IMAGE as NAME: a prediction endpoint on the gateway.

    One instance unless --replicas N (fixed) or --min N --max M (autoscaled; --min 0
    scales to zero when idle). Private unless --public: predictions then need a key or
    a group member's token.
    """
    _check_replicas(replicas, min_replicas, max_replicas)
    client = get_client(ctx)
    created = client.deployments.create(
        name,
        image,
        group=group,
        instance_type=instance_type,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_inflight=target_inflight or 0,
        public=public,
        description=description,
        metadata=metadata,
        readme=readme_file.read() if readme_file is not None else "",
    )
    if not as_json:
        click.echo(
            f"created {created.name} ({created.status}): {created.image or image} on "
            f"{created.instance_type or instance_type}, "
            f"{_replicas(created.min_replicas, created.max_replicas)}, {created.access}"
        )
        if not wait:
            note(f"follow it with `shipyard deploy show {created.name}`")
    _wait_and_report(client, created, wait=wait, timeout=timeout, as_json=as_json)


@deploy.command("update")
@click.argument("name")
@click.option("--image", default=None, metavar="NAME[:VERSION]", help="Serve this image.")
@click.option("--instance-type", default=None, metavar="TYPE", help="Move to this machine shape.")
@_replica_options
@click.option(
    "--public/--private",
    "public",
    default=None,
    help="Answer predictions without a key, or only with one.",
)
@click.option("--description", default=None, help="Replace the description.")
@_meta_option
@click.option("--clear-meta", is_flag=True, help="Empty the metadata (before any --meta).")
@click.option("-m", "--message", default="", help="Why: kept in the history.")
@_wait_options
@json_option
@click.pass_context
def update(
    ctx: click.Context,
    name: str,
    image: str | None,
    instance_type: str | None,
    replicas: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
    target_inflight: int | None,
    public: bool | None,
    description: str | None,
    metadata: dict[str, str],
    clear_meta: bool,
    message: str,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Change deployment NAME; what is not given stays as it is.

    Makes a new revision, rolled out with no downtime. --meta entries are merged into
    the current metadata.
    """
    _check_replicas(replicas, min_replicas, max_replicas)
    changes = (
        image,
        instance_type,
        replicas,
        min_replicas,
        max_replicas,
        target_inflight,
        public,
        description,
    )
    if all(c is None for c in changes) and not metadata and not clear_meta:
        raise click.UsageError(f"nothing to update: give at least one of {_UPDATE_FLAGS}")
    client = get_client(ctx)
    updated = client.deployments.update(
        name,
        image=image,
        instance_type=instance_type,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_inflight=target_inflight,
        public=public,
        description=description,
        metadata=metadata or None,
        clear_metadata=clear_meta,
        message=message,
    )
    if not as_json:
        click.echo(f"updated {updated.name} to revision {updated.revision} ({updated.status})")
    _wait_and_report(client, updated, wait=wait, timeout=timeout, as_json=as_json)


@deploy.command("scale")
@click.argument("name")
@_replica_options
@json_option
@click.pass_context
def scale(
    ctx: click.Context,
    name: str,
    replicas: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
    target_inflight: int | None,
    as_json: bool,
) -> None:
    """Set NAME's replicas: --replicas N, or --min N --max M (no new revision)."""
    _check_replicas(replicas, min_replicas, max_replicas)
    if replicas is None and min_replicas is None and target_inflight is None:
        raise click.UsageError("give --replicas N, or --min N --max M (or --target-inflight N)")
    scaled = get_client(ctx).deployments.scale(
        name, replicas, min_replicas, max_replicas, target_inflight=target_inflight
    )
    if as_json:
        print_json(scaled)
        return
    low, high = scaled.min_replicas, scaled.max_replicas
    how = _replicas(low, high) + ("" if low == high else " (autoscaled)")
    click.echo(f"scaled {scaled.name} to {how} ({scaled.status})")


@deploy.command("stop")
@click.argument("name")
@json_option
@click.pass_context
def stop(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop NAME's instances and release its quota; the definition stays."""
    stopped = get_client(ctx).deployments.stop(name)
    if as_json:
        print_json(stopped)
    else:
        click.echo(f"stopped {stopped.name} (start it again with `shipyard deploy start {name}`)")


@deploy.command("start")
@click.argument("name")
@_wait_options
@json_option
@click.pass_context
def start(ctx: click.Context, name: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Start a stopped (or failed) deployment NAME again."""
    client = get_client(ctx)
    started = client.deployments.start(name)
    if not as_json:
        click.echo(f"started {started.name} ({started.status})")
    _wait_and_report(client, started, wait=wait, timeout=timeout, as_json=as_json)


@deploy.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_context
def delete(ctx: click.Context, name: str, yes: bool, as_json: bool) -> None:
    """Delete NAME: stop it and remove it. Its history and instances stay readable."""
    confirm_delete(
        f"Delete deployment {name}? Its endpoint stops answering", yes=yes, as_json=as_json
    )
    get_client(ctx).deployments.delete(name)
    if as_json:
        print_json({"name": name, "deleted": True})
    else:
        click.echo(f"deleted {name} (its history stays: `shipyard deploy history {name}`)")


@deploy.command("list")
@click.option("--search", default="", metavar="TEXT", help="Names containing TEXT.")
@click.option("--group", default="", help="Only this group. Default: every group you may see.")
@click.option(
    "--status",
    type=click.Choice(DEPLOYMENT_STATUSES, case_sensitive=False),
    default=None,
    help="Only this status. Default: all but deleted.",
)
@click.option("--mine", is_flag=True, help="Only deployments you created.")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted deployments.")
@json_option
@click.pass_context
def list_deployments(
    ctx: click.Context,
    search: str,
    group: str,
    status: str | None,
    mine: bool,
    include_deleted: bool,
    as_json: bool,
) -> None:
    """List deployments."""
    found = get_client(ctx).deployments.list(
        search=search,
        group=group,
        status=(status or "").lower(),
        mine=mine,
        include_deleted=include_deleted,
    )
    if as_json:
        print_json(found)
        return
    filtered = search or group or status or mine
    print_table(
        ["name", "group", "status", "image", "type", "ready", "scale", "access", "updated"],
        (
            [
                d.name,
                d.group,
                d.status,
                d.image or "-",
                d.instance_type or "-",
                _ready(d),
                _scale(d.min_replicas, d.max_replicas),
                d.access,
                when(d.updated_at or d.created_at),
            ]
            for d in found
        ),
        empty=(
            "no deployments match"
            if filtered
            else "no deployments yet (create one with "
            "`shipyard deploy create NAME --image IMAGE --instance-type TYPE`)"
        ),
    )


def _replicas_line(d: DeploymentView) -> str:
    ready = f"{d.ready_replicas}/{d.replicas} ready"
    if d.fixed:
        return f"{ready} (fixed {d.min_replicas})"
    target = f", target {d.target_inflight} in flight" if d.target_inflight else ""
    return f"{ready} (autoscaled {d.min_replicas}-{d.max_replicas}{target})"


def curl_example(url: str, *, public: bool) -> list[str]:
    """A copy-paste curl command for the raw JSON route (with the token when private)."""
    lines = [f"curl -X POST '{url}'", "-H 'Content-Type: application/json'"]
    if not public:
        lines.append('-H "Authorization: Bearer $SHIPYARD_TOKEN"')
    lines.append("-d @payload.json")
    # One shell command: continuation lines end in a backslash and are indented.
    return [f"{lines[0]} \\"] + [f"  {line} \\" for line in lines[1:-1]] + [f"  {lines[-1]}"]


@deploy.command("show")
@click.argument("name")
@json_option
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show NAME: status, image, replicas, endpoint, and how to call it."""
    deployments = get_client(ctx).deployments
    d = deployments.get(name)
    url = deployments.predict_url(d.name or name)
    if as_json:
        print_json({**d.to_dict(), "url": url})
        return
    image = d.image or "-"
    if d.image_kind == "oci" and d.image_reference:
        image = f"{image} (container image {d.image_reference})"
    elif d.image_digest:
        image = f"{image} ({_short_digest(d.image_digest)})"
    revision = str(d.revision)
    if d.active_revision and d.active_revision != d.revision:
        revision = f"{d.revision} (serving {d.active_revision})"
    metadata = ", ".join(f"{k}={v}" for k, v in sorted(d.metadata.items()))
    print_fields(
        [
            ("name", d.name),
            ("group", d.group),
            ("status", d.status),
            ("message", d.message or "-"),
            ("image", image),
            ("instance type", d.instance_type or "-"),
            ("replicas", _replicas_line(d)),
            ("access", d.access),
            ("revision", revision),
            ("endpoint", url),
            ("description", d.description or "-"),
            ("metadata", metadata or "-"),
            ("created", f"{when(d.created_at)} by {d.created_by or '-'}"),
            ("updated", f"{when(d.updated_at)} by {d.updated_by or '-'}"),
        ]
    )
    click.echo()
    click.echo("predict (payload.json holds the model's input):")
    for line in curl_example(url, public=d.public):
        click.echo(f"  {line}")
    click.echo(f"  shipyard predict {d.name or name} --data @payload.json")
    if not d.public:
        # Client systems should not hold a person's token: give them a client key.
        click.echo()
        click.echo("for a client system, create a key (its secret is shown once):")
        click.echo(f"  shipyard keys create {d.name or name} --client CLIENT")
        click.echo(f"  curl -u CLIENT:$KEY -X POST '{url}' -d @payload.json")


@deploy.command("history")
@click.argument("name")
@json_option
@click.pass_context
def history(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show NAME's history: one row per revision or action, newest first."""
    entries = get_client(ctx).deployments.history(name)
    if as_json:
        print_json(entries)
        return
    print_table(
        ["rev", "action", "by", "at", "image", "type", "scale", "access", "message"],
        (
            [
                e.revision,
                e.action + (" (stopped)" if e.stopped and e.action != "stop" else ""),
                e.actor or "-",
                when(e.at),
                e.image or "-",
                e.instance_type or "-",
                _scale(e.min_replicas, e.max_replicas),
                e.access,
                cut(e.message) or "-",
            ]
            for e in entries
        ),
        empty=f"no history for {name}",
    )


@deploy.command("instances")
@click.argument("name")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_INSTANCES),
    default=MAX_INSTANCES,
    show_default=True,
    metavar="N",
    help="At most N instances, newest first.",
)
@json_option
@click.pass_context
def instances(ctx: click.Context, name: str, limit: int, as_json: bool) -> None:
    """List NAME's last instances (replicas), newest first, with why any failed."""
    found = get_client(ctx).deployments.instances(name, limit=limit)
    if as_json:
        print_json(found)
        return
    print_table(
        ["instance", "rev", "status", "address", "restarts", "created", "ended", "message"],
        (
            [
                i.instance_id,
                i.revision,
                i.status,
                i.address or "-",
                i.restarts,
                when(i.created_at),
                when(i.ended_at),
                cut(i.message) or "-",
            ]
            for i in found
        ),
        empty=f"{name} has no instances",
    )


def _log_line(line: InstanceLogLine, with_instance: bool) -> str:
    at = line.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z" if line.at else "-"
    text = line.text + ("…" if line.cut else "")
    return f"{at} {line.instance} {text}" if with_instance else f"{at} {text}"


@deploy.command("logs")
@click.argument("name")
@click.option("--instance", "-i", default=None, metavar="ID", help="Only this instance (replica).")
@click.option(
    "--tail",
    "-n",
    type=click.IntRange(1, 100_000),
    default=None,
    metavar="N",
    help=f"The last N lines [default: {LOGS_DEFAULT_TAIL}; 10 with --follow].",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C ends it).")
@click.option(
    "--since", callback=time_or_duration, metavar="WHEN", help="From a time or a duration ago (1h)."
)
@click.option(
    "--until", callback=time_or_duration, metavar="WHEN", help="Up to a time or a duration ago."
)
@click.option("--grep", default=None, metavar="TEXT", help="Only lines containing TEXT (any case).")
@click.option(
    "--download",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="Write the whole stored log of one instance to FILE.",
)
@json_option
@click.pass_context
def logs(
    ctx: click.Context,
    name: str,
    instance: str | None,
    tail: int | None,
    follow: bool,
    since: Any,
    until: Any,
    grep: str | None,
    download: Path | None,
    as_json: bool,
) -> None:
    """Print the log lines of NAME's instances (stdout and stderr, UTC times).

    Lines are kept for 3 days (the logging service's retention), also after the
    deployment scaled to zero or was stopped. Without --instance every instance's lines
    are shown, each prefixed with its instance id. With --json: one JSON object per line.
    """
    client = get_client(ctx)
    if download is not None:
        if follow or tail is not None or since is not None or until is not None or grep:
            raise click.UsageError("--download writes the whole log; leave out the filters")
        if instance is None:
            sources = client.logs.sources(name)
            if len(sources) != 1:
                ids = ", ".join(s.instance for s in sources) or "none"
                raise click.UsageError(
                    f"--download needs --instance ID ({name}'s instances with logs: {ids})"
                )
            instance = sources[0].instance
        count = client.deployments.download_logs(name, instance, download)
        if as_json:
            print_json({"instance": instance, "path": str(download), "lines": count})
        else:
            note(f"wrote {count} lines of {instance} to {download}")
        return
    show_instance = instance is None

    def emit(line: InstanceLogLine) -> None:
        if as_json:
            print_json_line(line)
        else:
            click.echo(_log_line(line, show_instance))

    if follow:
        if until is not None:
            raise click.UsageError("--follow shows new lines as they come; leave out --until")
        try:
            for line in client.deployments.follow_logs(
                name, instance=instance, tail=10 if tail is None else tail, since=since, grep=grep
            ):
                emit(line)
        except KeyboardInterrupt:
            # Ctrl-C is how a follow ends; it is not a failure.
            return
        return
    lines = client.deployments.logs(
        name,
        instance=instance,
        tail=LOGS_DEFAULT_TAIL if tail is None else tail,
        since=since,
        until=until,
        grep=grep,
    )
    for line in lines:
        emit(line)
    if not lines and not as_json:
        if grep:
            note(f"no log line of {instance or name} in this range contains {grep!r}")
        else:
            note(f"no log lines of {instance or name} stored (yet)")


def _qps(value: float) -> str:
    """Requests per second with the digits that matter: 13 requests in an hour are
    0.0036 qps, not 0.00."""
    if value == 0:
        return "0"
    if value < 1:
        return f"{value:.2g}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None]) -> str:
    """Values as a row of block characters, lowest to highest (a flat row when all are
    equal); None (no requests in that step) is a blank."""
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    low, high = min(known), max(known)
    scale = (len(_SPARKS) - 1) / (high - low) if high > low else 0.0
    flat = _SPARKS[0 if high == 0 else 3]
    return "".join(
        " " if v is None else (_SPARKS[round((v - low) * scale)] if scale else flat) for v in values
    )


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _ms(value: float, above: bool = False) -> str:
    if above and value >= 10000:
        return ">10 s"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


@deploy.command("metrics")
@click.argument("name")
@click.option(
    "--since",
    callback=time_or_duration,
    metavar="WHEN",
    help="From a time or a duration ago [default: 1h].",
)
@click.option(
    "--until", callback=time_or_duration, metavar="WHEN", help="Up to a time or a duration ago."
)
@click.option(
    "--step",
    "step_minutes",
    type=click.IntRange(min=1),
    default=None,
    metavar="MINUTES",
    help="Minutes per point of the sparklines [default: at most 60 points].",
)
@json_option
@click.pass_context
def metrics(
    ctx: click.Context,
    name: str,
    since: Any,
    until: Any,
    step_minutes: int | None,
    as_json: bool,
) -> None:
    """Show NAME's request metrics: QPS, success rate, 4xx and 5xx rates, latency
    percentiles, with a sparkline per minute (kept 3 days; the gateway reports every
    10 s)."""
    found = get_client(ctx).deployments.metrics(
        name, since=since, until=until, step_minutes=step_minutes or 0
    )
    if as_json:
        print_json(found)
        return
    t = found.total
    points = len(found.series)
    click.echo(
        f"{found.deployment or name}: {when(t.start)} to {when(t.end)} "
        f"({points} point{'' if points == 1 else 's'} of {found.step_minutes} min)"
    )
    print_table(
        ["requests", "qps", "success", "4xx", "5xx", "p50", "p95", "p99", "async"],
        [
            [
                t.requests,
                _qps(t.qps),
                _pct(t.success_rate) if t.requests else "-",
                _pct(t.rate_4xx) if t.requests else "-",
                _pct(t.rate_5xx) if t.requests else "-",
                _ms(t.latency_p50_ms, t.latency_above_range) if t.requests else "-",
                _ms(t.latency_p95_ms, t.latency_above_range) if t.requests else "-",
                _ms(t.latency_p99_ms, t.latency_above_range) if t.requests else "-",
                t.async_requests,
            ]
        ],
        empty="",
    )
    if not t.requests:
        note(f"no requests to {name} in this range")
        return
    series = found.series
    served = [p for p in series if p.requests]
    rows: list[tuple[str, list[float | None], str]] = [
        ("qps", [p.qps for p in series], f"max {_qps(max(p.qps for p in series))}"),
        (
            "success",
            [p.success_rate if p.requests else None for p in series],
            f"min {_pct(min(p.success_rate for p in served))}",
        ),
        (
            "5xx",
            [p.rate_5xx if p.requests else None for p in series],
            f"max {_pct(max(p.rate_5xx for p in served))}",
        ),
        (
            "p95",
            [p.latency_p95_ms if p.requests else None for p in series],
            f"max {_ms(max(p.latency_p95_ms for p in served), True)}",
        ),
    ]
    for label, values, remark in rows:
        click.echo(f"{label:<8} {sparkline(values)}  {remark}")


@deploy.command("readme")
@click.argument("name")
@readme_set_option
@json_option
@click.pass_context
def readme(ctx: click.Context, name: str, source: IO[str] | None, as_json: bool) -> None:
    """Print NAME's readme (Markdown), or replace it with --set FILE."""
    deployments = get_client(ctx).deployments
    if source is None:
        current = deployments.get_readme(name)
        missing = f"{current.name or name} has no readme (add one with --set FILE)"
        print_readme(current, as_json=as_json, missing=missing)
        return
    markdown = source.read()
    saved = deployments.set_readme(name, markdown)
    if as_json:
        print_json(saved)
    else:
        click.echo(f"readme of {saved.name or name} saved ({len(markdown.encode())} bytes)")


# shipyard predict


def load_data(text: str) -> Any:
    """``--data``: JSON text, ``@file.json``, or ``@-`` (stdin), parsed (so a typo is
    caught here, with a clear message, rather than by the model)."""
    source = "--data"
    if text.startswith("@"):
        path = text[1:]
        if not path:
            raise click.UsageError("--data @: name a file after @ (or @- for stdin)")
        if path == "-":
            raw = sys.stdin.read()
            source = "stdin"
        else:
            try:
                raw = Path(path).expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise click.UsageError(
                    f"--data {text}: cannot read {path}: {exc.strerror or exc}"
                ) from None
            source = path
    else:
        raw = text
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise click.UsageError(f"{source} is not valid JSON: {exc}") from None


@click.command("predict")
@click.argument("deployment")
@click.option(
    "--data",
    "-d",
    required=True,
    metavar="JSON|@FILE",
    help="The input: JSON text, @file.json, or @- for stdin.",
)
@click.option(
    "--gateway",
    default=None,
    metavar="URL",
    help="The gateway. Default: $SHIPYARD_GATEWAY_URL, the config's gateway_http, "
    "http://127.0.0.1:8080.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the answer (with --async --wait: for the request to end).",
)
@click.option(
    "--async",
    "is_async",
    is_flag=True,
    help="Submit it as an async request (X-Async-Request: true): print its id at once.",
)
@click.option(
    "--wait", is_flag=True, help="With --async: wait for it to end, then print its result."
)
@json_option
@click.pass_context
def predict(
    ctx: click.Context,
    deployment: str,
    data: str,
    gateway: str | None,
    timeout: float,
    is_async: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Send one prediction request to DEPLOYMENT and print the JSON answer.

    Posts the input as is to the raw route /deployments/DEPLOYMENT/predict on the
    gateway, with your token ($SHIPYARD_TOKEN or the config's) when you have one. For a
    private deployment of another group, pass a client key: `shipyard --token KEY
    predict ...`.

    With --async the gateway answers at once with a request id (follow it with
    `shipyard async status|result DEPLOYMENT ID`); --wait then waits for it and prints
    its result (exit 1 when it failed or was cancelled).
    """
    payload = load_data(data)
    if wait and not is_async:
        raise click.UsageError("--wait goes with --async")
    if is_async:
        _predict_async(ctx, deployment, payload, gateway, timeout, wait=wait, as_json=as_json)
        return
    result = get_client(ctx).deployments.predict(
        deployment, payload, gateway_url=gateway, timeout=timeout
    )
    if isinstance(result, str) and not as_json:
        click.echo(result)
    else:
        print_json(result)


def _predict_async(
    ctx: click.Context,
    deployment: str,
    payload: Any,
    gateway: str | None,
    timeout: float,
    *,
    wait: bool,
    as_json: bool,
) -> None:
    requests = get_client(ctx).async_requests
    submitted = requests.submit(deployment, payload, gateway_url=gateway)
    if not wait:
        if as_json:
            print_json(submitted.to_dict())
        else:
            click.echo(submitted.request_id)
        return
    # On stderr: the result alone stays on stdout for scripts, and the id is at hand to
    # look the request up again.
    click.echo(f"async request {submitted.request_id} accepted; waiting for it", err=True)
    final = requests.wait(deployment, submitted.request_id, timeout=timeout, gateway_url=gateway)
    if final.status != "completed":
        reason = f": {final.error}" if final.error else ""
        raise fail(f"async request {final.request_id} {final.status}{reason}")
    result = requests.result(deployment, final.request_id, gateway_url=gateway)
    if isinstance(result, str) and not as_json:
        click.echo(result)
    else:
        print_json(result)
