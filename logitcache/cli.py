"""The ``logitcache`` command line: a thin click layer over the library.

Each command is a small function that parses its arguments, calls one library function and
prints the result. Errors are mapped in one place, :class:`LogitcacheGroup`: a
:class:`~logitcache.errors.LogitcacheError` prints ``error: <message>`` on stderr (no
traceback) and exits with the error's ``exit_code`` (2 for bad usage, config or cache
format, 1 for a failed job); click's own usage errors exit 2.

Exit codes: 0 success, 1 failure of the job (e.g. ``verify`` found a bad shard),
2 bad usage or bad config.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from logitcache import __version__
from logitcache.errors import LogitcacheError

_PACKAGE = Path(__file__).resolve().parent
_python_format_warning = warnings.formatwarning


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """logitcache's own warnings as one ``warning: ...`` line, as its errors are printed (the
    source line that raised one means nothing to a user); other libraries' as Python prints them."""
    if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


class LogitcacheGroup(click.Group):
    """A click group that turns deliberate logitcache errors into exit codes and prints
    logitcache's warnings as plain lines."""

    def invoke(self, ctx: click.Context) -> Any:
        warnings.formatwarning = format_warning
        try:
            return super().invoke(ctx)
        except LogitcacheError as exc:
            if ctx.meta.get(_JSON_META):
                _print_json(error_object(exc))
            else:
                click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.ClickException as exc:  # usage errors of a command asked for --json
            if not ctx.meta.get(_JSON_META):
                raise
            _print_json({"error": {"type": "UsageError", "message": exc.format_message(), "exit_code": exc.exit_code}})
            ctx.exit(exc.exit_code)


_JSON_META = "logitcache.json"


def error_object(exc: LogitcacheError) -> dict[str, Any]:
    """What ``--json`` prints for a deliberate error: its type, message and exit code, and
    what the error adds (a build with failed units: its summary with the failed list)."""
    return {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code},
            **exc.details()}


def json_option(help_text: str):
    """``--json``: print the command's result, and any error, as one JSON object on stdout."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.meta[_JSON_META] = True
        return value

    return click.option("--json", "as_json", is_flag=True, is_eager=True, expose_value=True, callback=remember,
                        help=f"{help_text} Errors too are printed as a JSON object: "
                             '{"error": {"type", "message", "exit_code"}}.')


def config_options(command):
    """The options every job command shares: CONFIG and repeated ``--set key.path=value``."""
    command = click.option(
        "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
        help="Override a config field, e.g. --set soft_labels.k=32 (repeatable).",
    )(command)
    return click.argument("config", type=click.Path(dir_okay=False))(command)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _print_result(as_json: bool, data: Callable[[], Any], text: Callable[[], str]) -> None:
    """Print a command's result: ``data()`` as JSON with ``--json``, else ``text()``."""
    if as_json:
        _print_json(data())
    else:
        click.echo(text())


@click.group(name="logitcache", cls=LogitcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="logitcache", message="%(prog)s %(version)s")
def main() -> None:
    """Run a teacher once, cache its soft labels, train many students from the cache.

    Exit codes: 0 success, 1 the job failed, 2 bad usage, config or cache.
    """


@main.command()
@click.argument("cache", metavar="CACHE")
@json_option("Print the summary as JSON.")
def inspect(cache: str, as_json: bool) -> None:
    """Summarise a cache and decode one example.

    CACHE is the cache directory: a local path or any fsspec URL.
    """
    from logitcache.storage_schemas.summary import format_summary, summarize_cache

    summary = summarize_cache(cache)
    _print_result(as_json, lambda: summary, lambda: format_summary(summary))


_FIDELITY_ONLY = ("teacher", "dtype", "device", "seed", "tolerance", "no_progress")


@main.command()
@click.argument("cache", metavar="CACHE")
@click.option("--deep", is_flag=True, help="Also decode every block and recount its contents.")
@click.option("--fidelity", type=click.IntRange(min=1), metavar="N",
              help="Also run the teacher again on N sampled records per language and compare the stored "
                   "labels with the fresh ones.")
@click.option("--teacher", metavar="PATH", help="With --fidelity: the teacher to run (default: the manifest's).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="With --fidelity: the teacher's compute dtype (default: the build's).")
@click.option("--device", help="With --fidelity: torch device of the teacher (default: auto).")
@click.option("--seed", type=int, help="With --fidelity: which records are sampled (default: 0).")
@click.option("--tolerance", type=click.FloatRange(min=0), metavar="NATS",
              help="With --fidelity: how far a fresh log-prob may differ beyond the codec's bound "
                   "(default: 1e-4 in float32, 0.25 in bfloat16 or float16).")
@json_option("Print the report as JSON.")
@click.option("--no-progress", is_flag=True, help="With --fidelity: do not draw a progress bar.")
@click.pass_context
def verify(ctx: click.Context, cache: str, deep: bool, fidelity: int | None, as_json: bool,
           **fidelity_options: Any) -> None:
    """Check every shard of a cache against its manifest.

    Each shard listed in CACHE's manifest is checked for presence, size, sha256, schema,
    record and block counts and config fingerprint; --deep also decodes every block.

    --fidelity N also runs the teacher (the manifest's, or --teacher) again on N sampled
    records per language and holds the stored labels to the fresh ones, within the value
    codec's error bound plus a dtype tolerance (docs/reliability.md, "verify --fidelity"):

        logitcache verify runs/cache --fidelity 20

    Exits 1 when a shard has a problem or a language is beyond the bounds (the records are
    named), 2 for a teacher of another vocabulary. Files the manifest does not list are
    reported as a warning only: readers ignore them.
    """
    from logitcache.storage_schemas.verify import verify_cache

    given = [name for name in _FIDELITY_ONLY if fidelity_options[name] is not None and fidelity_options[name] is not False]
    if given and fidelity is None:
        raise click.UsageError(f"--{given[0].replace('_', '-')} goes with --fidelity N")
    report = verify_cache(cache, deep=deep)
    if fidelity is None:
        _print_result(as_json, report.to_dict, report.to_text)
        if not report.ok:
            ctx.exit(1)
        return
    from logitcache.stages.audit_fidelity import audit_fidelity

    options = fidelity_options
    audit = audit_fidelity(cache, records_per_lang=fidelity, teacher=options["teacher"], dtype=options["dtype"],
                           device=options["device"] or "auto", seed=options["seed"] or 0,
                           tolerance=options["tolerance"], skip_shards=report.bad_shards,
                           progress=not options["no_progress"])
    _print_result(as_json, lambda: {**report.to_dict(), "fidelity": audit.to_dict()},
                  lambda: f"{report.to_text()}\n{audit.to_text()}")
    if not (report.ok and audit.ok):
        ctx.exit(1)


@main.command()
@click.argument("source", metavar="SOURCE")
@click.argument("dest", metavar="DEST")
@click.option("--backend", type=click.Choice(["parquet", "zarr"]), help="Shard format of DEST.")
@click.option("--compression", type=click.Choice(["zstd", "lz4", "none"]), help="Compression of DEST's shards.")
@click.option("--compression-level", type=click.IntRange(1, 22), help="zstd level of DEST's shards.")
@click.option("--row-group-tokens", type=click.IntRange(min=1), help="Parquet row groups of about this many tokens.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), help="Zarr inner chunks of this many tokens.")
@click.option("--overwrite", is_flag=True, help="Discard an existing cache at DEST first.")
@json_option("Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def repack(source: str, dest: str, backend: str | None, compression: str | None, compression_level: int | None,
           row_group_tokens: int | None, chunk_tokens: int | None, overwrite: bool, as_json: bool,
           no_progress: bool) -> None:
    """Copy a cache's records into a new cache with other storage settings.

    Settings not given are SOURCE's. The teacher is not needed: the stored soft labels are
    copied as they are, only the bytes around them change. For example, to train from an
    lz4 copy of a zstd cache (in our benchmark 2 to 2.6 times as fast to read, and 40 to
    60% larger):

        logitcache repack runs/cache runs/cache-lz4 --compression lz4

    A killed repack resumes with the same command. Later builds with the new settings add
    to DEST as they would have to SOURCE.
    """
    from logitcache.stages.repack_cache import repack_cache

    changes = {"backend": backend, "compression": compression, "compression_level": compression_level,
               "row_group_tokens": row_group_tokens, "chunk_tokens": chunk_tokens}
    summary = repack_cache(source, dest, storage=changes, overwrite=overwrite, progress=not no_progress)
    _print_result(as_json, summary.to_dict, summary.to_text)


@main.command()
@click.argument("cache", metavar="CACHE")
@click.argument("dest", metavar="DEST")
@click.option("--format", "fmt", type=click.Choice(["axolotl", "hf"]), required=True,
              help="axolotl: the columns of axolotl's KD plugin; hf: the cache's own columns, decoded.")
@click.option("--renormalize/--no-renormalize", default=True, show_default=True,
              help="With --format axolotl: scale each position's targets to sum to 1, as axolotl's loaders do.")
@click.option("--overwrite", is_flag=True, help="Replace an export of another cache or format at DEST.")
@json_option("Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def export(cache: str, dest: str, fmt: str, renormalize: bool, overwrite: bool, as_json: bool,
           no_progress: bool) -> None:
    """Write a cache as a Hugging Face Parquet dataset that other trainers read.

    DEST gets one file per cache shard under data/ and a dataset card (README.md); load it
    with datasets.load_dataset("parquet", data_dir=DEST, split="train"). For axolotl's KD
    plugin:

        logitcache export runs/cache runs/cache-axolotl --format axolotl

    Each shard is checked against the cache's sha256 first; a killed export resumes with the
    same command, and a cache that has grown since adds only its new shards.
    """
    from logitcache.stages.export_cache import export_cache

    summary = export_cache(cache, dest, format=fmt, renormalize=renormalize, overwrite=overwrite,
                           progress=not no_progress)
    _print_result(as_json, summary.to_dict, summary.to_text)


@main.command()
@config_options
@click.option("--overwrite", is_flag=True, help="Discard an existing cache at the configured path first.")
@click.option("--repair", is_flag=True, help="First check every committed shard (as `logitcache verify` does) "
              "and build the units of damaged or missing ones again.")
@json_option("Print the build summary as JSON.")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def build(config: str, overrides: tuple[str, ...], overwrite: bool, repair: bool, as_json: bool,
          no_progress: bool) -> None:
    """Stage one: run the teacher over the corpus and write its soft labels to the cache.

    Re-running the same CONFIG skips work units already committed, so an interrupted build
    resumes where it stopped and a grown corpus adds only its new units. A different
    configuration into an existing cache is refused with the fields that differ. A shard
    damaged or lost after its commit (`logitcache verify` names it) is built again with
    --repair.
    """
    from logitcache.config import load_config
    from logitcache.stages.build_cache import build_cache

    _refuse_torchrun("build")
    if overwrite and repair:
        raise click.UsageError("--repair keeps the cache and rebuilds its damaged shards; --overwrite discards it: "
                               "give one of them")
    summary = build_cache(load_config(config, overrides), overwrite=overwrite, repair=repair,
                          progress=not no_progress)
    _print_result(as_json, summary.to_dict, summary.to_text)


@main.command()
@config_options
@json_option("Print the plan as JSON.")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
@click.pass_context
def plan(ctx: click.Context, config: str, overrides: tuple[str, ...], as_json: bool, no_progress: bool) -> None:
    """What `logitcache build CONFIG` would do now, without loading the teacher.

    Reads the corpus as the build does and lists the work units a build would label (whole,
    or only rows appended to a source since its last unit was committed), skip as committed,
    or refuse because committed rows changed, with the tokens, shard bytes and time it would
    take at the rates of the cache's committed shards and last build. A teacher whose weights
    changed under the same path is only caught by the build itself.

    Exits 0 when a build has work to do, 3 when the cache is up to date (nothing to do),
    1 when a build would be refused, 2 for a bad config. For example, in a scheduled job:

        logitcache plan job.yaml; [ $? -eq 0 ] && logitcache build job.yaml
    """
    from logitcache.config import load_config
    from logitcache.stages.plan_build import plan_build

    result = plan_build(load_config(config, overrides), progress=not no_progress)
    _print_result(as_json, result.to_dict, result.to_text)
    ctx.exit(result.exit_code)


@main.command()
@config_options
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the newest checkpoint under train.output, or start afresh.")
@json_option("Print the training summary as JSON.")
@click.option("--no-progress", is_flag=True, help="Do not draw progress bars.")
def train(config: str, overrides: tuple[str, ...], resume: bool, as_json: bool, no_progress: bool) -> None:
    """Stage two: train every student of CONFIG from the cache, reading each batch once.

    Checkpoints (every train.save_every batches and at the end) hold all students and the
    reader's position; running the same CONFIG again resumes exactly where the newest one
    stopped. Ends with an evaluation on the held-out split and a report.

    Data-parallel over N processes: torchrun --nproc_per_node=N -m logitcache train CONFIG
    (each rank reads its own part of the cache; rank 0 logs, evaluates and saves).
    """
    from logitcache.config import load_config
    from logitcache.stages.train_students import interrupted_message, train_students

    cfg = load_config(config, overrides)
    try:
        summary = train_students(cfg, resume=resume, progress=not no_progress)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            click.echo(interrupted_message(cfg), err=True)
        raise SystemExit(130) from None
    if summary.rank != 0:  # under torchrun, rank 0 speaks for the run
        return
    _print_result(as_json, summary.to_dict, summary.format)


def _model_option(value: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its last path component) of ``eval --model``."""
    import re

    name, sep, path = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        path = value
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(value.rstrip("/\\")).name or value).lstrip(".-") or "model"
    if not path:
        raise click.BadParameter(f"{value!r}: give PATH or NAME=PATH", param_hint="--model")
    return name, path


@main.command(name="eval")
@click.argument("configs", nargs=-1, required=True, metavar="CONFIG [CONFIG ...]",
                type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a field of every CONFIG, e.g. --set eval.max_records=500 (repeatable).")
@click.option("--model", "models", multiple=True, metavar="[NAME=]PATH",
              help="Also evaluate this pretrained model directory (or hub name) as it is (repeatable).")
@click.option("--report", "report", type=click.Path(file_okay=False),
              help="Write the report here (default: the first CONFIG's eval.report, or <train.output>/report).")
@json_option("Print the evaluation as JSON.")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def evaluate(configs: tuple[str, ...], overrides: tuple[str, ...], models: tuple[str, ...], report: str | None,
             as_json: bool, no_progress: bool) -> None:
    """Evaluate the students of CONFIG on its cache's held-out split, per language.

    Reads each student's final model from train.output (a student never trained whose
    model.path names a pretrained model is evaluated from there as it is), writes eval.json
    beside it and the markdown + PNG report (eval.report, default <train.output>/report).

    With several CONFIGs, the students of all of them (and each --model) are evaluated on the
    same records, the held-out split of the FIRST config's cache, and compared in one report
    with a row per student; their caches must have been built with the same teacher
    tokenizer. For example, students of a top-k cache against those of a sampled one:

        logitcache eval topk.yaml sampled.yaml --model base=runs/pretrained
    """
    from logitcache.config import load_config
    from logitcache.stages.evaluate import evaluate_configs

    loaded = [(path, load_config(path, overrides)) for path in configs]
    if len(loaded) == 1 and not models:
        loaded[0][1].require_train_sections("logitcache eval")
    summary = evaluate_configs(loaded, models=[_model_option(m) for m in models], report=report,
                               progress=not no_progress)
    _print_result(as_json, summary.to_dict, summary.format)


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a config field, e.g. --set train.steps=50 (repeatable).")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache and retrain the students from scratch.")
@json_option("Print the run summary as JSON at the end.")
@click.option("--no-progress", is_flag=True, help="Do not draw progress bars.")
@click.option("--print-config", is_flag=True,
              help="Print the job's whole config as YAML (without CONFIG: the embedded default) and exit, "
                   "e.g. as a start for a job of your own.")
def run(config: str | None, overrides: tuple[str, ...], overwrite: bool, as_json: bool, no_progress: bool,
        print_config: bool) -> None:
    """Build, train and evaluate in one go: the whole job of CONFIG.

    Without CONFIG, runs the embedded default offline under ./runs/demo: the shipped
    multilingual sample corpus, a demo teacher trained from it, its cache, two KD students
    of different sizes and a CE-only baseline, and the report (a few minutes on 2 CPU
    cores). Running it again reuses the teacher, the cache and the students.
    """
    from logitcache.config import load_config
    from logitcache.stages.run_job import default_job, run_job

    _refuse_torchrun("run")
    cfg = load_config(config, overrides, default=default_job())
    if print_config:
        import yaml

        from logitcache.config import config_to_dict

        click.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), nl=False)
        return
    summary = run_job(cfg, overwrite=overwrite, progress=not no_progress,
                      echo=(lambda text: click.echo(text, err=True)) if as_json else click.echo)
    if as_json:
        _print_json(summary.to_dict())


def _refuse_torchrun(command: str) -> None:
    """Stage one has one driver; under torchrun every rank would build the same cache."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise click.UsageError(
            f"`logitcache {command}` runs as one process (WORLD_SIZE is {world} here: started by torchrun?). "
            "Run it without torchrun; to spread stage one over many workers or GPUs use executor.kind: dask "
            "(docs/scale.md). Only `logitcache train` runs under torchrun.")


if __name__ == "__main__":  # pragma: no cover
    main()
