"""``shipyard image``: build images from model folders, follow builds, and the catalog."""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO

import click

from shipyard.cli._output import (
    confirm_delete,
    cut,
    fail,
    get_client,
    json_option,
    note,
    print_fields,
    print_json,
    print_json_line,
    print_readme,
    print_table,
    readme_set_option,
    when,
    yes_no,
)
from shipyard.client import (
    Build,
    BuildFailed,
    Client,
    Image,
    NotFound,
)
from shipyard.client.images import split_image

# After a build succeeds its image can take a moment to show in the catalog (a projection).
_CATALOG_RETRIES = (0.2, 0.5, 1.0, 1.5)

_group_option = click.option(
    "--group", default=None, help="The image's group. Default: your only group."
)
_group_filter = click.option(
    "--group", default=None, help="Only this group. Default: every group you may see."
)


def _size(n: int) -> str:
    """Bytes for people: ``145 MiB``, ``3.4 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "B":
        return f"{n} B"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def _image_size(image: Image) -> str:
    """An image's size; ``-`` for an OCI image, whose size the registry knows, not the
    build."""
    if image.kind == "oci" and not image.size_bytes:
        return "-"
    return _size(image.size_bytes)


def _short_digest(digest: str) -> str:
    """``sha256:`` and the first 12 hex digits, enough to tell images apart."""
    if not digest:
        return "-"
    algo, sep, hexdigits = digest.partition(":")
    if not sep:
        algo, hexdigits = "sha256", digest
    return f"{algo}:{hexdigits[:12]}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _ref(build: Build) -> str:
    return build.image or (f"{build.name}:{build.version}" if build.version else build.name)


@click.group()
def image() -> None:
    """Images: build them from model folders, follow builds, browse the catalog."""


@image.command("build")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Image name; each build that succeeds adds a version.")
@_group_option
@click.option(
    "--python",
    default=None,
    metavar="VERSION",
    help="Python version (e.g. 3.11). Default: the folder's shipyard.yaml, else the server's.",
)
@click.option(
    "--skip-dependency-install",
    is_flag=True,
    help="Record the requirements without installing or checking them (offline sites).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow the build's log until it ends.",
)
@json_option
@click.pass_context
def build(
    ctx: click.Context,
    folder: Path,
    name: str,
    group: str | None,
    python: str | None,
    skip_dependency_install: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Build an image NAME from the model folder DIR.

    Uploads DIR (without __pycache__, .git, .venv and *.pyc) and queues the build;
    with --wait (the default) prints the build log live and exits 1 if the build fails.
    With --json the log goes to stderr and stdout gets {"build": ..., "image": ...}.
    """
    client = get_client(ctx)

    def say(text: str) -> None:
        # With --json, stdout holds only the final document.
        click.echo(text, err=as_json)

    started = client.images.build(
        folder,
        name=name,
        group=group,
        python=python,
        skip_dependency_install=skip_dependency_install,
        source_name=str(folder),
    )
    say(f"build {started.build_id} {started.state} ({name}, group {started.group or '-'})")
    if not wait and not started.done:
        if as_json:
            print_json({"build": started, "image": None})
        else:
            note(f"follow it with `shipyard image logs {started.build_id} --follow`")
        return
    try:
        if started.failed:
            raise BuildFailed(started)
        finished = started if started.done else client.images.wait(started.build_id, on_log=say)
    except BuildFailed as exc:
        if as_json:
            print_json({"build": exc.build, "image": None})
        raise fail(f"build {exc.build.build_id} failed: {exc.reason}") from None
    except KeyboardInterrupt:
        note(
            f"stopped following; build {started.build_id} goes on "
            f"(`shipyard image logs {started.build_id} --follow`)"
        )
        raise
    built = _catalog_entry(client, finished)
    if as_json:
        print_json({"build": finished, "image": built})
    elif finished.cache_hit:
        click.echo(f"{_ref(finished)} is up to date (cache hit)")
    elif built is not None:
        click.echo(
            f"built {built.ref} ({_short_digest(built.digest)}, {_size(built.size_bytes)}, "
            f"{_seconds(finished.seconds)})"
        )
    else:
        click.echo(f"built {_ref(finished)} ({_seconds(finished.seconds)})")


def _catalog_entry(client: Client, build: Build) -> Image | None:
    """The image a successful build made; ``None`` if the catalog has not caught up."""
    ref = _ref(build)
    if ":" not in ref:
        return None
    for pause in (*_CATALOG_RETRIES, None):
        try:
            return client.images.get(ref, group=build.group or None)
        except NotFound:
            if pause is None:
                return None
            time.sleep(pause)
    return None


@image.command("list")
@_group_filter
@click.option("--name", default=None, help="Only this image name (all its versions).")
@json_option
@click.pass_context
def list_images(ctx: click.Context, group: str | None, name: str | None, as_json: bool) -> None:
    """List images: every version of every name."""
    images = get_client(ctx).images.list_images(group=group, name=name)
    if as_json:
        print_json(images)
        return
    print_table(
        ["name:version", "group", "size", "python", "created", "by"],
        (
            [i.ref, i.group, _image_size(i), i.python or "-", when(i.created_at), i.created_by]
            for i in images
        ),
        empty="no images yet (build one with `shipyard image build DIR --name NAME`)",
    )


@image.command("show")
@click.argument("ref", metavar="IMAGE")
@_group_option
@json_option
@click.pass_context
def show(ctx: click.Context, ref: str, group: str | None, as_json: bool) -> None:
    """Show IMAGE: kind, digest, size, Python, packages, source, where it is, ...

    IMAGE is NAME:VERSION, or NAME for its latest version. Its kind is "pack" (an
    environment pack in the object store) or "oci" (a container image built on a
    cluster, shown with its registry reference).
    """
    found = get_client(ctx).images.get(ref, group=group)
    if as_json:
        print_json(found)
        return
    if found.kind == "oci":
        where = ("reference", found.image_ref or "-")
    else:
        where = ("pack", found.pack_url or "-")
    size = _image_size(found)
    if size != "-":
        size += f" ({found.size_bytes} bytes)"
    print_fields(
        [
            ("image", found.ref),
            ("group", found.group),
            ("kind", found.kind),
            ("digest", found.digest or "-"),
            ("size", size),
            ("python", found.python or "-"),
            ("script", found.script or "-"),
            ("workers", found.workers or "-"),
            ("source", found.source or "-"),
            ("build", found.build_id or "-"),
            ("created", when(found.created_at)),
            ("created by", found.created_by or "-"),
            where,
        ]
    )
    click.echo()
    print_table(
        ["package", "version"],
        ([p.name, p.version] for p in found.packages),
        empty="no packages recorded",
    )


@image.command("logs")
@click.argument("build_or_image", metavar="BUILD_OR_IMAGE")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the build ends.")
@click.option(
    "--tail",
    "-n",
    type=click.IntRange(1, 100_000),
    default=None,
    metavar="N",
    help="Only the last N lines [default: all].",
)
@click.option("--grep", default=None, metavar="TEXT", help="Only lines containing TEXT (any case).")
@_group_option
@json_option
@click.pass_context
def logs(
    ctx: click.Context,
    build_or_image: str,
    follow: bool,
    tail: int | None,
    grep: str | None,
    group: str | None,
    as_json: bool,
) -> None:
    """Print the log of a build: BUILD_OR_IMAGE is a build id, or an image (NAME:VERSION,
    NAME for the latest) whose build it shows.

    The whole log comes from imagebuild; --tail and --grep ask the logging service (which
    keeps build logs 3 days) and fall back to imagebuild's copy. With --json: one JSON
    object ({"seq", "line", "at"}) per line.
    """
    try:
        for line in get_client(ctx).logs.build_log(
            build_or_image, tail=tail, grep=grep, follow=follow, group=group
        ):
            if as_json:
                print_json_line(line)
            else:
                click.echo(line.line)
    except KeyboardInterrupt:
        # Ctrl-C is how a follow ends; it is not a failure, and the build goes on.
        return


@image.command("builds")
@_group_filter
@click.option("--name", default=None, help="Only builds of this image name.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    metavar="N",
    help="At most N builds.",
)
@json_option
@click.pass_context
def builds(
    ctx: click.Context, group: str | None, name: str | None, limit: int, as_json: bool
) -> None:
    """List recent builds, newest first."""
    found = get_client(ctx).images.list_builds(group=group, name=name, limit=limit)
    if as_json:
        print_json(found)
        return
    print_table(
        ["build", "image", "group", "state", "cached", "queued", "took", "by", "reason"],
        (
            [
                b.build_id,
                _ref(b),
                b.group,
                b.state,
                yes_no(b.cache_hit),
                when(b.queued_at),
                _seconds(b.seconds),
                b.requested_by or "-",
                cut(b.reason) or "-",
            ]
            for b in found
        ),
        empty="no builds yet",
    )


@image.command("usage")
@click.argument("ref", metavar="IMAGE")
@_group_option
@json_option
@click.pass_context
def usage(ctx: click.Context, ref: str, group: str | None, as_json: bool) -> None:
    """Show which deployments use IMAGE (NAME:VERSION)."""
    found = get_client(ctx).images.usage(ref, group=group)
    if as_json:
        print_json(found)
        return
    name = found.image or ref
    if not found.deployments:
        click.echo(f"{name} is not used by any deployment")
        return
    count = len(found.deployments)
    click.echo(f"{name} is used by {count} deployment{'s' if count != 1 else ''}:")
    for deployment in found.deployments:
        click.echo(f"  {deployment}")


@image.command("readme")
@click.argument("ref", metavar="IMAGE")
@_group_option
@readme_set_option
@click.option("--edit", is_flag=True, help="Edit the readme in $EDITOR, then save it.")
@json_option
@click.pass_context
def readme(
    ctx: click.Context,
    ref: str,
    group: str | None,
    source: IO[str] | None,
    edit: bool,
    as_json: bool,
) -> None:
    """Print IMAGE's readme, or replace it.

    The readme is GitHub-flavoured Markdown; --set FILE (- for stdin) or --edit
    replaces it.
    """
    if source is not None and edit:
        raise click.UsageError("--set and --edit exclude each other")
    images = get_client(ctx).images
    if source is None and not edit:
        current = images.get_readme(ref, group=group)
        missing = f"{current.image or ref} has no readme (add one with --set FILE or --edit)"
        print_readme(current, as_json=as_json, missing=missing)
        return
    if source is not None:
        markdown = source.read()
    else:
        before = images.get_readme(ref, group=group)
        edited = click.edit(before.markdown, extension=".md", require_save=True)
        # click.edit ends the text with a newline; that alone is no change.
        if edited is None or edited.rstrip("\n") == before.markdown.rstrip("\n"):
            note("readme unchanged")
            if as_json:
                print_json(before)
            return
        markdown = str(edited)
    saved = images.set_readme(ref, markdown, group=group)
    if as_json:
        print_json(saved)
    else:
        click.echo(f"readme of {saved.image or ref} saved ({_size(len(markdown.encode()))})")


@image.command("delete")
@click.argument("ref", metavar="IMAGE")
@_group_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_context
def delete(ctx: click.Context, ref: str, group: str | None, yes: bool, as_json: bool) -> None:
    """Delete IMAGE (NAME:VERSION). Refused while a deployment uses it."""
    _, version = split_image(ref)
    if version is None:
        raise click.UsageError(f"IMAGE must be NAME:VERSION (e.g. {ref}:1), not just a name")
    where = f" in group {group}" if group else ""
    confirm_delete(f"Delete image {ref}{where}? This cannot be undone", yes=yes, as_json=as_json)
    get_client(ctx).images.delete(ref, group=group)
    if as_json:
        print_json({"image": ref, "group": group, "deleted": True})
    else:
        click.echo(f"deleted {ref}")
