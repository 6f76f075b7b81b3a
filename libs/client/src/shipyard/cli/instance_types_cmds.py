"""``shipyard instance-types``: the catalog of machine shapes deployments choose from."""

from __future__ import annotations

import click

from shipyard.cli._output import get_client, json_option, num, print_fields, print_json, print_table


@click.group("instance-types")
def instance_types() -> None:
    """The instance-type catalog (cpu, memory, gpu per instance)."""


@instance_types.command("list")
@json_option
@click.pass_context
def list_types(ctx: click.Context, as_json: bool) -> None:
    """List the instance types."""
    types = get_client(ctx).quota.list_instance_types()
    if as_json:
        print_json(types)
        return
    print_table(
        ["name", "cpu", "memory_gib", "gpu", "description"],
        ([t.name, num(t.cpu), num(t.memory_gib), t.gpu, t.description] for t in types),
        empty="no instance types yet (an admin adds one with `shipyard instance-types set`)",
    )


@instance_types.command("set")
@click.argument("name")
@click.option(
    "--cpu",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    metavar="N",
    help="CPU cores per instance.",
)
@click.option(
    "--memory",
    "memory_gib",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    metavar="GIB",
    help="Memory in GiB per instance.",
)
@click.option(
    "--gpu",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="GPUs per instance.",
)
@click.option("--description", default="", help="What the type is for.")
@json_option
@click.pass_context
def set_type(
    ctx: click.Context,
    name: str,
    cpu: float,
    memory_gib: float,
    gpu: int,
    description: str,
    as_json: bool,
) -> None:
    """Create or replace the instance type NAME. Admin only."""
    itype = get_client(ctx).quota.set_instance_type(
        name, cpu=cpu, memory_gib=memory_gib, gpu=gpu, description=description
    )
    if as_json:
        print_json(itype)
        return
    print_fields(
        [
            ("name", itype.name),
            ("cpu", num(itype.cpu)),
            ("memory_gib", num(itype.memory_gib)),
            ("gpu", itype.gpu),
            ("description", itype.description or "-"),
        ]
    )
