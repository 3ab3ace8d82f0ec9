"""The `instructune` commands: their options, their output and their exit codes.

Exit codes, the same for every command:
    0  done (validate: the job would accept the data; watch: the tune Succeeded)
    1  the answer is no (validate: the job would refuse the data; watch: the tune Failed)
    2  wrong usage (an unknown option, a missing argument)
    3  watch --timeout ran out before the tune ended
    4  the command could not do its work (no such tune, API server or Ray refused, unreachable)
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, ParamSpec, TypeVar

import httpx
import typer
from rich.console import Console

from instructune_cli import datacheck, describe, remote, watch
from instructune_cli.connect import CliError, connect, get_tune
from instructune_cli.datareport import report_lines
from instructune_cli.proxy import ClusterHttp, ServiceNotFound
from instructune_operator.api import API_VERSION, KIND
from instructune_operator.clients.kube import Kube, KubeError

P = ParamSpec("P")
R = TypeVar("R")
EXIT_NO = 1
EXIT_TIMEOUT = 3
EXIT_ERROR = 4

app = typer.Typer(
    name="instructune",
    help="Validate data for, follow, inspect and use InstructionTunes.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback's locals would show the API client's headers: its bearer token.
    pretty_exceptions_show_locals=False,
)

Namespace = Annotated[
    str | None,
    typer.Option(
        "--namespace", "-n", help="The tune's namespace (default: the kubeconfig context's, else default)."
    ),
]
Direct = Annotated[
    bool,
    typer.Option(
        "--direct",
        help="Call the cluster addresses in the status as they are (inside the cluster), not through the API server.",
    ),
]


def _stdout() -> Console:
    # soft_wrap: a long line stays one line (file:line: reason, a log line), greppable in a pipe.
    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _session(namespace: str | None) -> tuple[Kube, str]:
    kube, default = connect()
    return kube, namespace or default


@app.callback()
def main(
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig", help="The kubeconfig to use (default: KUBECONFIG, else ~/.kube/config)."
        ),
    ] = None,
) -> None:
    if kubeconfig is not None:
        os.environ["KUBECONFIG"] = str(kubeconfig)


def _guarded(command: Callable[P, R]) -> Callable[P, R]:
    """The errors every command may meet, as one line on stderr and exit code 4 (3: a watch's time
    ran out)."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CliError as err:
            code = EXIT_TIMEOUT if isinstance(err, watch.WatchTimeout) else EXIT_ERROR
            raise _fail(str(err), code) from None
        except KubeError as err:
            raise _fail(f"the API server refused: {err}") from None
        except httpx.HTTPError as err:
            raise _fail(f"{type(err).__name__}: {err}") from None

    return run


@app.command("validate")
@_guarded
def validate_command(
    data: Annotated[
        str | None,
        typer.Argument(
            help="A JSONL/JSON/Parquet file, a folder of them, or s3://bucket/key-or-prefix (default with --tune: the tune's training data)."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="The model folder whose tokenizer (and chat template) to use: a path, s3://... or hf://org/name@revision (default with --tune: its baseModel)."
        ),
    ] = None,
    format: Annotated[
        Literal["auto", "alpaca", "dolly", "messages", "prompt-completion"] | None,
        typer.Option("--format", help="Row format (default: the tune's, else auto-detected per file)."),
    ] = None,
    max_seq_length: Annotated[
        int | None, typer.Option(help="Longest row in tokens (default: the tune's, else 2048).")
    ] = None,
    packing: Annotated[
        bool | None,
        typer.Option(
            "--packing/--no-packing", help="Pack rows into sequences (default: the tune's, else on)."
        ),
    ] = None,
    invalid_rows: Annotated[
        Literal["skip", "fail"] | None,
        typer.Option(help="invalidRows.policy (default: the tune's, else skip)."),
    ] = None,
    max_invalid_fraction: Annotated[
        float | None,
        typer.Option(help="invalidRows.maxFraction under skip (default: the tune's, else 0.01)."),
    ] = None,
    decontaminate: Annotated[
        bool | None,
        typer.Option(
            "--decontaminate/--no-decontaminate",
            help="Drop rows that ask an evaluation prompt, reading the tune's evaluation sets (default: the tune's, else on).",
        ),
    ] = None,
    tune: Annotated[
        Path | None,
        typer.Option(
            help="An InstructionTune manifest: take format, template, audits, limits and tokenizer from its spec."
        ),
    ] = None,
    max_errors: Annotated[int, typer.Option(help="Print at most this many invalid rows (0: all).")] = 50,
    findings: Annotated[
        bool, typer.Option(help="Also print every row the audits dropped, redacted or flagged.")
    ] = False,
) -> None:
    """Check data as the tuning job would: refused rows as file:line: reason, audits, token statistics; exit 1 when the job would refuse it."""
    options = datacheck.CheckOptions(
        data=data,
        tokenizer=tokenizer,
        format=format,
        max_seq_length=max_seq_length,
        packing=packing,
        invalid_policy=invalid_rows,
        max_invalid_fraction=max_invalid_fraction,
        decontaminate=decontaminate,
        tune=tune,
    )
    check = datacheck.check_data(options)
    out = _stdout()
    for line in report_lines(check, max_errors or None, findings):
        out.print(line, markup=False)
    if check.refused is not None:
        raise typer.Exit(EXIT_NO)


@app.command("describe")
@_guarded
def describe_command(name: str, namespace: Namespace = None) -> None:
    """Phase, conditions, progress, checkpoints, data, evaluation against the gate, lineage, serving."""
    kube, ns = _session(namespace)
    _stdout().print(describe.render(describe.describe(get_tune(kube, ns, name))))


@app.command("watch")
@_guarded
def watch_command(
    name: str,
    namespace: Namespace = None,
    interval: Annotated[float, typer.Option(help="Seconds between reads of the tune.")] = 2.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).")] = None,
) -> None:
    """Follow a tune until it ends: exit 0 when it Succeeded, 1 when it Failed."""
    kube, ns = _session(namespace)
    get_tune(kube, ns, name)  # a tune that does not exist is an error now, not after a timeout
    last = watch.follow(
        f"{ns}/{name}", lambda: kube.get(API_VERSION, KIND, ns, name), _stdout(), interval, timeout
    )
    if not last.succeeded:
        raise typer.Exit(EXIT_NO)


@app.command("plot")
@_guarded
def plot_command(
    name: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the PNG.")],
    namespace: Namespace = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            help="The run's root (s3://... or a folder) instead of the tune's spec.checkpointing.uri."
        ),
    ] = None,
) -> None:
    """A PNG of the training loss per step and of the tuned model against its base."""
    from instructune_cli import plot  # matplotlib takes ~0.6 s to import: only this command needs it

    status = None
    if artifacts is None:
        kube, ns = _session(namespace)
        tune = get_tune(kube, ns, name)
        artifacts = str(((tune.get("spec") or {}).get("checkpointing") or {}).get("uri") or "")
        status = tune.get("status") or {}
        title = f"{ns}/{name}"
    else:
        title = name
    run = plot.read_run(artifacts, status)
    plot.save(plot.draw(run, title), out)
    steps = sum(len(curve.steps) for curve in run.curves)
    _stdout().print(
        f"wrote {out}: {steps} steps in {len(run.curves)} attempt(s), "
        f"{len(run.scores) + len(run.losses)} metrics tuned vs base (from {', '.join(run.sources)})",
        markup=False,
    )


@app.command("logs")
@_guarded
def logs_command(
    name: str,
    namespace: Namespace = None,
    attempt: Annotated[
        int | None, typer.Option(help="This attempt's job instead of the current one.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between reads when following.")] = 2.0,
    ray_address: Annotated[
        str | None, typer.Option(help="The Ray Jobs API address (default: status.rayCluster.dashboardUrl).")
    ] = None,
    direct: Direct = False,
) -> None:
    """The Ray job logs of the tune's current attempt (or of --attempt N)."""
    kube, ns = _session(namespace)
    tune = get_tune(kube, ns, name)
    job = remote.RayJob(
        ClusterHttp(kube, direct),
        ray_address or remote.ray_address_of(tune),
        remote.job_of(tune, attempt),
        remote.ray_token(kube, ns, name),
    )

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        remote.follow_logs(job, write, follow, interval)
    except ServiceNotFound as err:
        raise CliError(
            f"{err}: the tune's Ray cluster is gone (deleted when a tune finishes or is suspended), "
            "and its jobs' logs with it"
        ) from None


@app.command("ask")
@_guarded
def ask_command(
    name: str,
    question: str,
    namespace: Namespace = None,
    system: Annotated[
        str | None,
        typer.Option(
            help="A system message (default: the tune's template.systemPrompt, added by the server)."
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    temperature: Annotated[
        float, typer.Option(help="0: greedy, the decoding the evaluation gate scored.")
    ] = 0.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
    direct: Direct = False,
) -> None:
    """Ask the tune's served model a question; the server renders it with the trained template."""
    kube, ns = _session(namespace)
    tune = get_tune(kube, ns, name)
    model = ((tune.get("status") or {}).get("serving") or {}).get("model")
    body = remote.chat_body(model, question, system, max_tokens, temperature)
    _stdout().print(remote.ask(ClusterHttp(kube, direct), tune, body, timeout), markup=False)
