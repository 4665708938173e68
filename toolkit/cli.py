"""The `toolkit` command line: thin wrappers that parse flags and call a stage's function.

Heavy imports (torch, transformers, engines) happen inside the commands so `toolkit --help`
stays instant. Exit codes: 2 for a usage error (unknown option, bad choice, missing
argument: click's own), 1 for everything else, including a `ToolkitError`, which becomes
one line on stderr instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from toolkit.export.registry import ExportFormat, MergeDtype
from toolkit.serve.settings import EngineChoice, ServeSettings

app = typer.Typer(
    help="LoRA fine-tune -> quantize -> serve -> monitor, for open causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Validate and describe instruction data sets.", no_args_is_help=True)
monitor_app = typer.Typer(help="Look at the serving metrics.", no_args_is_help=True)
feedback_app = typer.Typer(help="Turn rated completions into training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(monitor_app, name="monitor")
app.add_typer(feedback_app, name="feedback")

# Tables stay readable when piped to a file or a CI log (rich would assume 80 columns).
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
DASHBOARD = "monitoring/grafana/dashboards/toolkit.json"
VERBOSE_HELP = "Also show third-party library output on the console (it always goes to the log file)."


def user_errors(func: F) -> F:
    """Print a `ToolkitError` as one line and exit 1 instead of showing a traceback.

    Exit 1, not 2: 2 is what click answers for a command line it cannot parse, and scripts
    tell "fix how you call it" from "fix the config, data or machine" by that code.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from toolkit.errors import ToolkitError

        try:
            return func(*args, **kwargs)
        except ToolkitError as exc:
            # The message is plain text: escape it so "pip install 'toolkit[bnb]'" stays intact.
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _print_version(value: bool) -> None:
    if value:
        from toolkit import __version__

        console.print(f"toolkit {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _toolkit(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """LoRA fine-tune -> quantize -> serve -> monitor, for open causal LMs."""


@app.command()
@user_errors
def validate(config: Annotated[Path, typer.Argument(help="Training config YAML.")]) -> None:
    """Validate a training config (types, choices, cross-field rules) without loading a model."""
    from toolkit.config import load_config

    cfg = load_config(config)
    console.print(
        f"{config}: ok ({cfg.model.source}, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} "
        f"on {', '.join(cfg.lora.target_modules)}, {cfg.training.precision.value})"
    )


@data_app.command("validate")
@user_errors
def data_validate(path: Annotated[Path, typer.Argument(help="JSONL data file.")]) -> None:
    """Check every line of a data file; exit 1 listing each problem with its line number."""
    from toolkit.data.schema import validate_file

    examples, issues = validate_file(path)
    for issue in issues:
        console.print(f"{path}:{issue}", highlight=False)
    if issues:
        console.print(f"{path}: {len(issues)} problem(s), {len(examples)} valid example(s)")
        raise typer.Exit(1)
    console.print(f"{path}: ok, {len(examples)} examples")


@data_app.command("stats")
@user_errors
def data_stats(
    path: Annotated[Path, typer.Argument(help="JSONL data file.")],
    model: Annotated[str | None, typer.Option(help="Model source for token lengths.")] = None,
) -> None:
    """Counts and percentages by language and category (and token lengths with --model)."""
    from toolkit.data.report import print_stats

    print_stats(path, model, console)


def split_train_args(config: Path | None, positional: list[str]) -> tuple[Path, list[str]]:
    """Tell the config from the KEY=VALUE overrides among `toolkit train`'s arguments.

    The config comes positionally as in `llamafactory-cli train x.yaml` and `axolotl train
    x.yaml`, or with --config as before (then the first override lands in the CONFIG slot:
    an argument with `=` is always an override). There is no default config: the seed recipe
    is a 7B model, whose 14 GB download nobody should start by typing a bare `toolkit train`.

    Raises:
        typer.BadParameter: no config, or two of them (a usage error: exit 2).
    """
    from toolkit.shipped import ROOT

    paths = [Path(item) for item in positional if "=" not in item]
    overrides = [item for item in positional if "=" in item]
    if config is not None:
        paths.insert(0, config)
    if len(paths) > 1:
        raise typer.BadParameter(
            f"one config, got {', '.join(map(str, paths))}; overrides are KEY=VALUE, "
            "e.g. training.epochs=1", param_hint="CONFIG")
    if not paths:
        shipped = ", ".join(sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")))
        raise typer.BadParameter(
            "no config given; pass one, e.g. `toolkit train configs/model/smollm2-135m.yaml` "
            "(the embedded SmolLM2-135M, fit for a CPU)"
            + (f"; shipped in configs/model/: {shipped}" if shipped else ""), param_hint="CONFIG")
    return paths[0], overrides


@app.command()
@user_errors
def train(
    config_arg: Annotated[str | None, typer.Argument(
        metavar="CONFIG", show_default=False, help="Training config YAML.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(
        metavar="KEY=VALUE", show_default=False,
        help="Overrides of config fields, e.g. training.epochs=1 lora.r=16.")] = None,
    config: Annotated[Path | None, typer.Option(help="Training config YAML (instead of the positional CONFIG).")] = None,
    data: Annotated[Path | None, typer.Option(help="Training JSONL (overrides data.train).")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out JSONL (data.eval).")] = None,
    output: Annotated[Path | None, typer.Option(help="Run folder (default runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    verbose: Annotated[bool, typer.Option(help=VERBOSE_HELP)] = False,
) -> None:
    """LoRA fine-tune a base model: `toolkit train CONFIG.yaml [KEY=VALUE]...`."""
    from toolkit.config import load_config
    from toolkit.train import run_training

    config_path, extra = split_train_args(config, [*([config_arg] if config_arg else []),
                                                   *(overrides or [])])
    if data is not None:
        extra.append(f"data.train={data}")
    if eval_data is not None:
        extra.append(f"data.eval={eval_data}")
    cfg = load_config(config_path, extra)
    run_training(cfg, output=output or Path("runs") / config_path.stem, resume=resume,
                 overwrite=overwrite, console=console, verbose=verbose)


def _export_formats(value: str) -> list[ExportFormat]:
    """One --quantize value, which may list several formats: `merged,onnx-int8`."""
    formats = []
    for name in value.split(","):
        try:
            formats.append(ExportFormat(name.strip()))
        except ValueError:
            choices = ", ".join(f.value for f in ExportFormat)
            raise typer.BadParameter(f"{name.strip()!r} is not one of {choices}") from None
    return formats


def _flatten_formats(groups: list[list[ExportFormat]]) -> list[ExportFormat]:
    return [fmt for group in groups for fmt in group]


@app.command()
@user_errors
def export(
    source: Annotated[Path, typer.Argument(help="Training run folder (or a peft adapter folder).")],
    quantize: Annotated[list[ExportFormat], typer.Option(
        parser=_export_formats, callback=_flatten_formats,
        help="Formats, repeatable or comma-separated: --quantize merged,onnx-int8.")],
    out: Annotated[Path | None, typer.Option(help="Parent folder of the exports (default RUN/exports).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="Calibration JSONL, our own FR/EN data (default: the run's training data, else data/train.jsonl).")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out JSONL for the quality report.")] = None,
    dtype: Annotated[MergeDtype, typer.Option(help="Merged weights dtype.")] = MergeDtype.fp16,
    overwrite: Annotated[bool, typer.Option(help="Replace existing export folders.")] = False,
    verbose: Annotated[bool, typer.Option(help=VERBOSE_HELP)] = False,
    vllm_proof: Annotated[bool, typer.Option(help="Load each format vLLM may serve in the vLLM venv (TOOLKIT_VLLM_PYTHON, else .venv-vllm) and generate; the report's vllm block and engine_hint record the result (one vLLM start per format).")] = False,
) -> None:
    """Merge the adapters, quantize to each format, verify, and report size/quality/speed.

    Exit status: 0 every format was produced; 1 some were skipped (this machine cannot
    produce them) or failed, or nothing was done (the error says why); 2 a usage error.
    """
    from toolkit.export import run_export

    result = run_export(source, quantize, out=out, calibration=calibration,
                        eval_data=eval_data, dtype=dtype, overwrite=overwrite, console=console,
                        verbose=verbose, vllm_proof=vllm_proof)
    if not result.complete:
        raise typer.Exit(1)


def _setting(name: str, *param_decls: str, **kwargs: Any) -> Any:
    """A `toolkit serve` option whose default and help are those of the `ServeSettings` field.

    One source of truth: a new setting gets its CLI default and help from its field, and the
    command passes every option to `ServeSettings` by name (`ctx.params`). Called in the
    parameter defaults on purpose (ruff's B008 is silenced there): typer reads them once, at
    definition, and the alternative writes each default twice.
    """
    field = ServeSettings.model_fields[name]
    return typer.Option(field.get_default(call_default_factory=True), *param_decls,
                        help=field.description, **kwargs)


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help=ServeSettings.model_fields["model"].description)],
    engine: EngineChoice = _setting("engine"),  # noqa: B008
    host: str = _setting("host"),
    port: int = _setting("port"),
    api_key: str | None = _setting("api_key", envvar="TOOLKIT_API_KEY"),
    api_key_file: Path | None = _setting("api_key_file"),  # noqa: B008
    max_concurrency: int = _setting("max_concurrency"),
    max_queue: int = _setting("max_queue"),
    model_name: str | None = _setting("model_name", "--model-name", "--served-model-name"),
    record_completions: bool = _setting("record_completions"),
    feedback_db: str | None = _setting("feedback_db", envvar="TOOLKIT_FEEDBACK_DB"),
    vllm_python: Path | None = _setting("vllm_python", envvar="TOOLKIT_VLLM_PYTHON"),  # noqa: B008
    tensor_parallel_size: int | None = _setting("tensor_parallel_size"),
    pipeline_parallel_size: int | None = _setting("pipeline_parallel_size"),
    ray_address: str | None = _setting("ray_address"),
    gpu_memory_utilization: float | None = _setting("gpu_memory_utilization"),
    max_model_len: int | None = _setting("max_model_len"),
    threads: int | None = _setting("threads"),
    prefix_cache_mb: int = _setting("prefix_cache_mb"),
    speculative_tokens: int = _setting("speculative_tokens"),
    max_tokens_default: int = _setting("max_tokens_default"),
    body_timeout_s: float = _setting("body_timeout_s"),
    shutdown_timeout_s: float = _setting("shutdown_timeout_s"),
    max_body_bytes: int = _setting("max_body_bytes"),
) -> None:
    """Serve a model behind an OpenAI-compatible gateway with Prometheus metrics.

    Arguments after `--` pass through to vLLM: `toolkit serve MODEL -- --enforce-eager`.
    """
    from toolkit.serve import run_server

    run_server(ServeSettings(**ctx.params, engine_args=list(ctx.args)))


@monitor_app.command("snapshot")
@user_errors
def monitor_snapshot(
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    prometheus: Annotated[str, typer.Option(help="Prometheus base URL.")] = "http://127.0.0.1:9090",
    range_: Annotated[str, typer.Option("--range", help="Look-back window, e.g. 15m, 1h, 1d.")] = "1h",
    dashboard: Annotated[Path | None, typer.Option(help="Grafana dashboard JSON (default: the shipped monitoring/grafana/dashboards/toolkit.json).")] = None,
    var: Annotated[list[str] | None, typer.Option(help="Dashboard variable NAME=VALUE.")] = None,
) -> None:
    """Render the dashboard's panels from Prometheus into one PNG (no Grafana needed)."""
    from toolkit.monitoring.snapshot import parse_range, render_snapshot
    from toolkit.shipped import shipped_file

    dashboard = dashboard or shipped_file(DASHBOARD, "--dashboard")
    variables = dict(item.split("=", 1) for item in (var or []) if "=" in item)
    result = render_snapshot(prometheus, dashboard, out, range_s=parse_range(range_),
                             variables=variables or None)
    console.print(f"{out}: {result}")


@app.command()
@user_errors
def compare(
    variants: Annotated[list[str], typer.Argument(help="Model sources, training runs or export folders.")],
    data: Annotated[Path | None, typer.Option(help="Held-out JSONL (default: the shipped data/test.jsonl).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/compare"),
    max_new_tokens: Annotated[int, typer.Option(help="Generation length for chrF.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """Compare variants on perplexity, chrF, speed, memory and size (overall, fr/en, category)."""
    from toolkit.compare import run_compare
    from toolkit.shipped import shipped_file

    run_compare(variants, data=data or shipped_file("data/test.jsonl", "--data"), out=out, max_new_tokens=max_new_tokens,
                overwrite=overwrite, console=console)


@feedback_app.command("export")
@user_errors
def feedback_export(
    out: Annotated[Path, typer.Option(help="JSONL to write (training schema).")],
    min_rating: Annotated[float, typer.Option(help="Keep completions rated at least this (normalised 0..1 or raw).")] = 1,
    since: Annotated[str | None, typer.Option(help="Only feedback from this date (YYYY-MM-DD).")] = None,
    db: Annotated[str | None, typer.Option(envvar="TOOLKIT_FEEDBACK_DB", help="Feedback store: SQLite file or postgresql:// URL.")] = None,
) -> None:
    """Write rated completions (the correction when given) as training examples."""
    from toolkit.feedback import export_feedback

    count = export_feedback(db=db, min_rating=min_rating, since=since, out=out)
    console.print(f"{out}: {count} example(s); check with `toolkit data validate {out}`")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="toolkit")


if __name__ == "__main__":
    sys.exit(main())
