"""The `toolkit` command line: thin wrappers that parse flags and call a stage's function.

Heavy imports (torch, transformers, engines) happen inside the commands so `toolkit --help`
stays instant. A `ToolkitError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

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


def user_errors(func: F) -> F:
    """Print a `ToolkitError` as one line and exit 2 instead of showing a traceback."""

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
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="Training config YAML.")] = Path(
        "configs/model/training_config.yaml"
    ),
    data: Annotated[Path | None, typer.Option(help="Training JSONL (overrides data.train).")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out JSONL (data.eval).")] = None,
    output: Annotated[Path | None, typer.Option(help="Run folder (default runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
) -> None:
    """LoRA fine-tune a base model; extra KEY=VALUE arguments override config fields."""
    from toolkit.config import load_config
    from toolkit.train import run_training

    overrides = list(ctx.args)
    if data is not None:
        overrides.append(f"data.train={data}")
    if eval_data is not None:
        overrides.append(f"data.eval={eval_data}")
    cfg = load_config(config, overrides)
    run_training(cfg, output=output or Path("runs") / config.stem, resume=resume,
                 overwrite=overwrite, console=console)


@app.command()
@user_errors
def export(
    source: Annotated[Path, typer.Argument(help="Training run folder (or a peft adapter folder).")],
    quantize: Annotated[list[str], typer.Option(help="Format, repeatable: merged, bnb-int8, bnb-nf4, gptq-int4, onnx, onnx-int8.")],
    out: Annotated[Path | None, typer.Option(help="Parent folder of the exports (default RUN/exports).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="Calibration JSONL, our own FR/EN data (default: the run's training data, else data/train.jsonl).")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out JSONL for the quality report.")] = None,
    dtype: Annotated[str, typer.Option(help="Merged weights dtype: fp32, fp16 or bf16.")] = "fp16",
    overwrite: Annotated[bool, typer.Option(help="Replace existing export folders.")] = False,
) -> None:
    """Merge the adapters, quantize to each format, verify, and report size/quality/speed.

    Exit status: 0 every format was produced; 1 some were skipped (this machine cannot
    produce them) or failed, the others are done; 2 nothing was done.
    """
    from toolkit.export import run_export

    result = run_export(source, quantize, out=out, calibration=calibration,
                        eval_data=eval_data, dtype=dtype, overwrite=overwrite, console=console)
    if not result.complete:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Export folder, model folder, training run or model source.")],
    engine: Annotated[str, typer.Option(help="auto, vllm, transformers or onnxruntime.")] = "auto",
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Bind port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="TOOLKIT_API_KEY", help="Require this bearer key.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the bearer key from this file (keeps it out of `ps`).")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Requests generating at once.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond that; more get 429.")] = 64,
    model_name: Annotated[str | None, typer.Option(help="Name clients use (default: folder name).")] = None,
    record_completions: Annotated[bool, typer.Option(help="Store prompts and answers for feedback (off: medical content).")] = False,
    feedback_db: Annotated[str | None, typer.Option(envvar="TOOLKIT_FEEDBACK_DB", help="Feedback store: SQLite file (default $TOOLKIT_HOME/feedback.db) or postgresql:// URL shared by replicas.")] = None,
    vllm_python: Annotated[Path | None, typer.Option(envvar="TOOLKIT_VLLM_PYTHON", help="Python of the venv holding vLLM.")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM tensor parallelism.")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option(help="vLLM pipeline parallelism.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster for multi-node vLLM (sets RAY_ADDRESS, Ray executor).")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="vLLM GPU memory share.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length limit.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for embedded engines.")] = None,
    max_tokens_default: Annotated[int, typer.Option(help="Completion tokens when a request sets no max_tokens (embedded engines).")] = 1024,
    body_timeout_s: Annotated[float, typer.Option(help="Seconds a client may take to upload its body; then 408.")] = 30.0,
    shutdown_timeout_s: Annotated[float, typer.Option(help="On SIGTERM, seconds in-flight requests may finish; then they get an error.")] = 30.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body in bytes; larger ones get 413.")] = 1024 * 1024,
) -> None:
    """Serve a model behind an OpenAI-compatible gateway with Prometheus metrics.

    Arguments after `--` pass through to vLLM.
    """
    from toolkit.serve import ServeSettings, run_server

    settings = ServeSettings(
        model=model, engine=engine, host=host, port=port, api_key=api_key,
        api_key_file=api_key_file,
        max_concurrency=max_concurrency, max_queue=max_queue, model_name=model_name,
        record_completions=record_completions, feedback_db=feedback_db,
        vllm_python=vllm_python, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, ray_address=ray_address,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        threads=threads, max_tokens_default=max_tokens_default, body_timeout_s=body_timeout_s,
        shutdown_timeout_s=shutdown_timeout_s, max_body_bytes=max_body_bytes,
        engine_args=list(ctx.args),
    )
    run_server(settings)


@monitor_app.command("snapshot")
@user_errors
def monitor_snapshot(
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    prometheus: Annotated[str, typer.Option(help="Prometheus base URL.")] = "http://127.0.0.1:9090",
    range_: Annotated[str, typer.Option("--range", help="Look-back window, e.g. 15m, 1h, 1d.")] = "1h",
    dashboard: Annotated[Path, typer.Option(help="Grafana dashboard JSON.")] = Path(
        "monitoring/grafana/dashboards/toolkit.json"
    ),
    var: Annotated[list[str] | None, typer.Option(help="Dashboard variable NAME=VALUE.")] = None,
) -> None:
    """Render the dashboard's panels from Prometheus into one PNG (no Grafana needed)."""
    from toolkit.monitoring.snapshot import parse_range, render_snapshot

    variables = dict(item.split("=", 1) for item in (var or []) if "=" in item)
    result = render_snapshot(prometheus, dashboard, out, range_s=parse_range(range_),
                             variables=variables or None)
    console.print(f"{out}: {result}")


@app.command()
@user_errors
def compare(
    variants: Annotated[list[str], typer.Argument(help="Model sources, training runs or export folders.")],
    data: Annotated[Path, typer.Option(help="Held-out JSONL.")] = Path("data/test.jsonl"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/compare"),
    max_new_tokens: Annotated[int, typer.Option(help="Generation length for chrF.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """Compare variants on perplexity, chrF, speed, memory and size (overall, fr/en, category)."""
    from toolkit.compare import run_compare

    run_compare(variants, data=data, out=out, max_new_tokens=max_new_tokens,
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
