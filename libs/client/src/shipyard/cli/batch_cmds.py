"""``shipyard batch``: run a deployment over every object under an object store prefix."""

from __future__ import annotations

import click

from shipyard.cli._output import (
    cut,
    fail,
    get_client,
    json_option,
    print_fields,
    print_json,
    print_table,
    when,
)
from shipyard.client import BatchJobView

_deployment = click.option(
    "--deployment", "-D", required=True, metavar="NAME", help="The deployment that predicts."
)


def print_job(job: BatchJobView) -> None:
    """One job's fields and failures, for people."""
    print_fields(
        [
            ("job id", job.job_id),
            ("deployment", job.deployment),
            ("status", job.status),
            ("input", job.input),
            ("output", job.output),
            ("progress", f"{job.done + job.failed}/{job.total} ({job.failed} failed)"),
            ("created", when(job.created_at)),
            ("finished", when(job.finished_at)),
            *([("error", job.error)] if job.error else []),
        ]
    )
    if job.failures:
        click.echo("")
        print_table(
            ["object", "reason"], ([f.key, cut(f.reason, 100)] for f in job.failures), empty=""
        )


@click.group("batch")
def batch() -> None:
    """Batch jobs: one prediction per object under an S3 (or file://) prefix."""


@batch.command("create")
@_deployment
@click.option(
    "--input", "source", required=True, metavar="URL", help="s3://bucket/in/ or file:///path/"
)
@click.option(
    "--output", "target", required=True, metavar="URL", help="s3://bucket/out/ or file:///path/"
)
@click.option("--wait", is_flag=True, help="Wait for the job to end (exit 1 if it failed).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --wait: give up waiting after this long (the job goes on).",
)
@json_option
@click.pass_context
def create(
    ctx: click.Context,
    deployment: str,
    source: str,
    target: str,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Run DEPLOYMENT over every object under --input; one OUTPUT/<key>.out per object.

    Inputs: .json (one prediction), .jsonl (one per line), .csv (one per row, as
    {column: value}). A failing object is recorded with its reason; the rest go on.
    """
    client = get_client(ctx).batch
    job = client.create(deployment, source, target)
    if wait:
        job = client.wait(deployment, job.job_id, timeout=timeout)
    if as_json:
        print_json(job.to_dict())
    elif wait:
        print_job(job)
    else:
        click.echo(job.job_id)
    if wait and job.status != "completed":
        raise fail(f"batch job {job.job_id} {job.status}" + (f": {job.error}" if job.error else ""))


@batch.command("list")
@_deployment
@json_option
@click.pass_context
def list_cmd(ctx: click.Context, deployment: str, as_json: bool) -> None:
    """List a deployment's batch jobs, newest first."""
    jobs = get_client(ctx).batch.list(deployment)
    if as_json:
        print_json([j.to_dict() for j in jobs])
        return
    print_table(
        ["job id", "status", "total", "done", "failed", "created", "input"],
        (
            [j.job_id, j.status, j.total, j.done, j.failed, when(j.created_at), cut(j.input)]
            for j in jobs
        ),
        empty=f"no batch jobs of {deployment}",
    )


@batch.command("status")
@_deployment
@click.argument("job_id")
@json_option
@click.pass_context
def status(ctx: click.Context, deployment: str, job_id: str, as_json: bool) -> None:
    """Show a batch job's progress and failed objects."""
    job = get_client(ctx).batch.status(deployment, job_id)
    if as_json:
        print_json(job.to_dict())
    else:
        print_job(job)


@batch.command("cancel")
@_deployment
@click.argument("job_id")
@json_option
@click.pass_context
def cancel(ctx: click.Context, deployment: str, job_id: str, as_json: bool) -> None:
    """Cancel a batch job (objects finished stay written)."""
    job = get_client(ctx).batch.cancel(deployment, job_id)
    if as_json:
        print_json(job.to_dict())
    else:
        click.echo(f"batch job {job.job_id} cancelled ({job.done + job.failed}/{job.total} done)")
