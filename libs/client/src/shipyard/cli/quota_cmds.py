"""``shipyard quota``: group quotas and their usage."""

from __future__ import annotations

import click

from shipyard.cli._output import (
    get_client,
    json_option,
    num,
    print_fields,
    print_json,
    print_table,
    when,
)
from shipyard.client import GroupUsage


@click.group()
def quota() -> None:
    """Group quotas: limits, usage and what is free."""


@quota.command("set")
@click.argument("group")
@click.option("--cpu", type=click.FloatRange(min=0), required=True, metavar="N", help="CPU cores.")
@click.option(
    "--memory",
    "memory_gib",
    type=click.FloatRange(min=0),
    required=True,
    metavar="GIB",
    help="Memory in GiB.",
)
@click.option(
    "--gpu", type=click.IntRange(min=0), default=0, show_default=True, metavar="N", help="GPUs."
)
@click.option(
    "--instances",
    type=click.IntRange(min=0),
    required=True,
    metavar="N",
    help="Model instances (replicas) across the group's deployments.",
)
@json_option
@click.pass_context
def set_quota(
    ctx: click.Context,
    group: str,
    cpu: float,
    memory_gib: float,
    gpu: int,
    instances: int,
    as_json: bool,
) -> None:
    """Set (replace) GROUP's quota. Admin only."""
    usage = get_client(ctx).quota.set_group_quota(
        group, cpu=cpu, memory_gib=memory_gib, gpu=gpu, instances=instances
    )
    if as_json:
        print_json(usage)
    else:
        _print_usage(usage)


@quota.command("show")
@click.argument("group", required=False)
@json_option
@click.pass_context
def show(ctx: click.Context, group: str | None, as_json: bool) -> None:
    """Show GROUP's limits, used and free resources and its reservations.

    Without GROUP: every group you may see (all of them for admins).
    """
    client = get_client(ctx)
    if group is not None:
        usage = client.quota.usage(group)
        if as_json:
            print_json(usage)
        else:
            _print_usage(usage)
        return
    groups = client.quota.list_usage()
    if as_json:
        print_json(groups)
        return
    print_table(
        ["group", "cpu", "memory_gib", "gpu", "instances", "reservations"],
        (
            [
                g.group,
                _cell(g.used.cpu, g.limits.cpu, g.free.cpu),
                _cell(g.used.memory_gib, g.limits.memory_gib, g.free.memory_gib),
                _cell(g.used.gpu, g.limits.gpu, g.free.gpu),
                _cell(g.used.instances, g.limits.instances, g.free.instances),
                len(g.reservations),
            ]
            for g in groups
        ),
        empty="no group quotas yet (an admin sets one with `shipyard quota set GROUP ...`)",
    )


def _cell(used: float, limit: float, free: float) -> str:
    """``used/limit (free N)``: the three numbers an operator compares at a glance."""
    return f"{num(used)}/{num(limit)} (free {num(free)})"


def _print_usage(usage: GroupUsage) -> None:
    print_fields([("group", usage.group), ("updated", when(usage.updated_at))])
    click.echo()
    resources = ("cpu", "memory_gib", "gpu", "instances")
    print_table(
        ["resource", "limit", "used", "free"],
        (
            [
                name,
                num(getattr(usage.limits, name)),
                num(getattr(usage.used, name)),
                num(getattr(usage.free, name)),
            ]
            for name in resources
        ),
        empty="",
    )
    click.echo()
    print_table(
        ["deployment", "instance_type", "instances", "cpu", "memory_gib", "gpu", "reserved_at"],
        (
            [
                r.deployment,
                r.instance_type,
                r.instances,
                num(r.resources.cpu),
                num(r.resources.memory_gib),
                r.resources.gpu,
                when(r.reserved_at),
            ]
            for r in usage.reservations
        ),
        empty="no reservations",
    )
