"""The `precompile` command line: a thin layer over the library API.

Bad input prints one line and exits 2; a failed verification exits 1; --debug
shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import click

from precompile.errors import UserError, VerificationError, one_line
from precompile.io.generation_config import GENERATION_CONFIG
from precompile.io.process_memory import skip_exit_collection, use_huge_pages
from precompile.io.progress import Progress
from precompile.plan.convert_options import ConvertOptions, cli_flag, meta, option_fields
from precompile.version import __version__

_DEVICE = click.Choice(meta("device").choices)
_QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress output.")


def _dry_run(help: str):
    """--dry-run, worded for what the command would do."""
    return click.option("--dry-run", is_flag=True, help=help)


def _field_options(fields: tuple[dataclasses.Field, ...], helps: dict[str, str]):
    """Click options derived from option dataclass fields (ConvertOptions, VerifyOptions), in their order, from
    each field's metadata (`OptionMeta`, `VerifyFlag`); `helps` rewords a flag's help for a command that uses it
    on another kind of output."""

    def decorate(command):
        for f in reversed(fields):
            m = meta(f)
            kw = {"help": helps.get(f.name, m.help)}
            if getattr(m, "metavar", None):
                kw["metavar"] = m.metavar
            if isinstance(f.default, bool):
                kw.update(is_flag=True, flag_value=not f.default, default=f.default)
            elif m.choices:
                kw.update(type=click.Choice(m.choices), default=f.default, show_default=True)
            elif m.minimum is not None:
                kw.update(type=click.IntRange(min=m.minimum), default=f.default, show_default=True)
            elif m.path:
                kw.update(type=click.Path())
            elif "/" in cli_flag(f):  # "--a/--no-a": a flag, on, off or unset (None)
                kw.update(default=f.default)
            elif getattr(m, "kind", None):
                kw.update(type=m.kind, default=f.default, show_default=m.show_default)
            command = click.option(cli_flag(f), f.name, **kw)(command)
        return command
    return decorate


def _convert_options(*names: str, **helps: str):
    """The ConvertOptions fields `names` (default: all) as click options."""
    return _field_options(tuple(f for f in option_fields() if not names or f.name in names), helps)


def _verify_options(*names: str):
    """The VerifyOptions fields `names` as click options (those with a flag)."""
    from precompile.check.verify_options import flag_of, verify_fields

    return _field_options(tuple(f for f in verify_fields() if f.name in names and flag_of(f).cli), {})


_reported: list[int] = []  # the exit status of the one line already printed (see _fail)


def _fail(line: str, status: int) -> None:
    """Print the run's one final line and exit. In the program, SIGINT/SIGTERM are held from here on (one
    arriving while the process exits would add a second line), and one that came before is what the line
    reports."""
    from precompile.io.signals import in_program, interrupted

    if in_program():
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if interrupted():
            line, status = "error: interrupted", 130
    click.echo(line, err=True)
    _reported.append(status)
    sys.exit(status)


class _Group(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):  # noqa: D102 - one-line errors for every failure
        debug = "--debug" in (sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            hint = f"; see '{e.ctx.command_path} --help'" if e.ctx else ""
            _fail(f"error: {one_line(e.format_message())}{hint}", 2)
        except click.ClickException as e:
            _fail(f"error: {one_line(e.format_message())}", 2)
        except UserError as e:
            if debug:
                raise
            _fail(f"error: {e}", 2)
        except VerificationError as e:
            if debug:
                raise
            _fail(f"verification failed: {e}", 1)
        except Exception as e:
            from precompile.loader import PrecompileLoadError

            if isinstance(e, PrecompileLoadError) and not debug:
                _fail(f"error: {one_line(str(e))}", 2)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="precompile")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Precompute the token-only part of a causal LM's first layer (arXiv 2402.13388).

    A converted checkpoint stores, per token, layer 0's residual input and its q/k/v
    projections, so layer 0 reads one table row instead of its weights.
    """


@main.command()
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=True, dir_okay=True))
@_convert_options()
@click.option("--force", is_flag=True, help="Replace an existing OUT_DIR (only once the new one is complete).")
@_dry_run("Print what would be read, eliminated and written; write nothing.")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Then upload OUT_DIR to this hub repo, as "
              "`precompile push` does (the token and an overlay's base are checked before converting).")
@_QUIET
def convert(source, out_dir, force, dry_run, push_to, quiet, **options):
    """Convert SOURCE (hub id or local directory) into OUT_DIR."""
    opts = ConvertOptions(**options)
    progress = Progress(quiet=quiet)
    if push_to and not dry_run:
        from precompile.publish.push import check_push_source

        check_push_source(push_to, source, opts.overlay)
    if dry_run:
        from precompile.plan.conversion_plan import describe_plan, planned

        with planned(source, opts) as plan:
            click.echo(describe_plan(plan))
            click.echo(_dry_run_files(plan))
        return
    from precompile.convert import convert as run_convert

    run_convert(source, out_dir, opts, force=force, progress=progress)
    if push_to:
        from precompile.publish.push import push as run_push

        run_push(out_dir, push_to, progress=progress)


@main.command()
@click.argument("overlay_dir", type=click.Path(file_okay=False))
@click.argument("full_dir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--base", type=click.Path(file_okay=False), help="The base model's directory (default: the source "
              "recorded in the overlay, from the HF cache at its revision or its local path).")
@_convert_options("profile", "link", "self_check",
                  profile="Architecture profile YAML (default: the one recorded in the overlay's precompile.json).",
                  link="How unchanged shards enter FULL_DIR.",
                  self_check="Skip comparing layer 0 with transformers' own model before FULL_DIR is written.")
@click.option("--force", is_flag=True, help="Replace an existing FULL_DIR (only once the new one is complete).")
@_QUIET
def materialize(overlay_dir, full_dir, base, profile, link, self_check, force, quiet):
    """Turn OVERLAY_DIR into a full conversion in FULL_DIR (the same bytes as `convert` without --overlay, on
    the machine that made the overlay: its table is copied, not recomputed)."""
    from precompile.materialize import materialize as run_materialize

    run_materialize(overlay_dir, full_dir, base=base, profile=profile, force=force, link=link,
                    progress=Progress(quiet=quiet), self_check=self_check)


@main.command()
@click.argument("out_dir")
@_verify_options("prompts", "reference", "max_new_tokens", "rows", "seed", "device", "fp32_reference", "profile")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@_verify_options("max_abs_diff", "mean_abs_diff", "kl", "top1", "generation_tie", "rows_lambda", "rows_z",
                 "fp32_ratio")
@click.option("--update-card", is_flag=True, help="Write the checks, thresholds and outcome into OUT_DIR's "
              "README.md model card (and its sha256 into precompile.json); no other file changes.")
@_QUIET
def verify(out_dir, json_path, update_card, quiet, **options):
    """Check OUT_DIR against its original model: files, table rows, logits, generation.

    Exit 0 when every check passes, 1 when any fails, 2 for bad input.
    """
    import json as _json
    from contextlib import ExitStack
    from pathlib import Path

    from precompile.check.check_report import format_report, summary_line
    from precompile.check.verify import verify as run_verify
    from precompile.check.verify_options import VerifyOptions
    from precompile.io.file_safety import check_report_path, write_report

    if json_path is not None:
        check_report_path(json_path, "--json", Path(out_dir))
    opts = VerifyOptions(**options)
    with ExitStack() as held:
        if update_card:  # the card and manifest verify checks are the ones it rewrites: no other writer meanwhile
            from precompile.publish.card import check_card
            from precompile.io.out_dir import OutDir

            check_card(Path(out_dir))
            held.enter_context(OutDir.resolve(out_dir).lock())
        result = run_verify(out_dir, opts, progress=Progress(quiet=quiet))
        click.echo(format_report(result))
        if update_card:
            from precompile.publish.card import update_card as run_update_card

            click.echo(run_update_card(out_dir, result))
    if json_path is not None:
        write_report(json_path, _json.dumps(result, indent=2) + "\n", "--json")
    if not result["passed"]:
        raise VerificationError(summary_line(result))


@main.command()
@click.argument("zoo", type=click.Path())
@click.option("--out-root", required=True, type=click.Path(file_okay=False), help="Directory that receives one "
              "OUT_DIR per entry.")
@click.option("--shard", help="I/N: convert only this job's share of the entries (for CI job matrices).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Convert this many models at once, within the memory budget.")
@click.option("--memory-budget", type=click.FloatRange(min=0.1), help="GiB that concurrent conversions may use "
              "(default: half of the available memory).")
@click.option("--verify", "verify_all", is_flag=True, help="Verify each converted model against its original.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write JUnit XML here.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed entry.")
@_dry_run("List what would be converted or skipped; write nothing.")
@_QUIET
def batch(zoo, out_root, shard, jobs, memory_budget, verify_all, report_path, junit_path, fail_fast, dry_run,
          quiet):
    """Convert every model listed in ZOO.yaml; exit 1 if any entry failed."""
    import json as _json
    from pathlib import Path

    from precompile import batch as b
    from precompile.io.file_safety import check_report_path, write_report

    for flag, path in (("--report", report_path), ("--junit", junit_path)):
        if path:
            check_report_path(path, flag)
    if dry_run:
        for entry, action in b.dry_run(zoo, out_root, shard):
            click.echo(f"[{entry.index + 1}] {entry.source} -> {Path(out_root) / entry.out}: {action}")
        return
    results = b.run_batch(zoo, out_root, shard=shard, jobs=jobs, verify=verify_all, fail_fast=fail_fast,
                          memory_budget=int(memory_budget * 2**30) if memory_budget else None,
                          progress=Progress(quiet=quiet))
    if report_path:
        write_report(report_path, _json.dumps(b.report(results), indent=2) + "\n", "--report")
    if junit_path:
        write_report(junit_path, b.junit_xml(results), "--junit")
    click.echo(b.summary_table(results))
    return 1 if b.summary(results)["failed"] else 0


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--source", help="The original checkpoint (default: the source recorded in OUT_DIR's manifest).")
@click.option("--device", type=_DEVICE, default="auto", show_default=True, help="Where to run both models.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Run dtype (default: the table's).")
@click.option("--batches", default="1,16", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per prefill.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Decode steps timed per repetition.")
@click.option("--reps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Least interleaved repetitions (figures are medians).")
@click.option("--max-reps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most repetitions: they go on until the batch-1 decode saving's 95% interval is narrower than "
              "its theoretical value.")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=120, show_default=True,
              help="Seconds after which bench stops (once it has 2 repetitions, even below --reps) and reports "
              "what it resolved.")
@_QUIET
def bench(out_dir, source, device, dtype, batches, prompt_len, decode_tokens, reps, max_reps, budget, quiet):
    """Time OUT_DIR's model with and without its lookups, next to the theoretical saving."""
    from precompile.check.bench import bench as run_bench
    from precompile.plan.plan_report import parse_batch_sizes

    sizes = parse_batch_sizes(batches, "--batches", "1,16")
    result = run_bench(out_dir, source, device=device, dtype=dtype, batches=sizes, prompt_len=prompt_len,
                       decode_tokens=decode_tokens, reps=reps, max_reps=max_reps, budget=budget,
                       progress=Progress(quiet=quiet))
    for line in result.summary():
        click.echo(line)
    click.echo(result.table())
    for note in result.notes:
        click.echo(note)


@main.command()
@click.argument("out_dir")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to, created if needed (default: main).")
@click.option("--commit-message", metavar="M", help="The commit's message (default: names the source and tool).")
@_dry_run("Check OUT_DIR and print the repo, revision and every file with its size; upload nothing.")
@_QUIET
def push(out_dir, repo_id, private, revision, commit_message, dry_run, quiet):
    """Upload OUT_DIR to the hub repo REPO_ID after checking every sha256 in its manifest.

    HF_TOKEN (or `hf auth login`) gives the write access; HF_ENDPOINT picks another hub.
    """
    from precompile.publish.push import push as run_push

    plan = run_push(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                    dry_run=dry_run, progress=Progress(quiet=quiet))
    if dry_run:
        click.echo(plan.describe())
        click.echo("nothing uploaded (--dry-run)")


def _dry_run_files(plan) -> str:
    from precompile.plan.trade import output_files

    files = output_files(plan)
    lines = ["reads: " + ", ".join(plan.read_tensors),
             "eliminates: " + (", ".join(plan.layout.eliminated) or "nothing"),
             "would write (file sizes exact, headers included):"]
    actions = {s.out_file: f"{s.action} of {s.source_file}" for s in plan.shards if s.out_file}
    for name, size in files.items():
        lines.append(f"  {name}  {size:,} bytes ({actions.get(name, 'table')})")
    for s in plan.shards:
        if s.out_file is None:
            lines.append(f"  (drops {s.source_file}: every tensor in it is eliminated)")
    lines.append(f"  + index, config.json, precompile.json, precompile_loader.py, README.md, "
                 f"{len(plan.carried)} tokenizer/generation files" + ("" if GENERATION_CONFIG in plan.carried else
                                        f", {GENERATION_CONFIG} (derived from config.json, as transformers does)"))
    lines.append(f"total: {sum(files.values()):,} bytes in weight files; tensor data {plan.out_bytes:,} bytes")
    lines.append("nothing written (--dry-run)")
    return "\n".join(lines)


@main.command()
@click.argument("source")
@click.option("--batch-sizes", default="1,16,256,1024", show_default=True,
              help="Comma-separated batch sizes (tokens) for the read-reduction figures.")
@click.option("--assume-parallel", is_flag=True, help="Size the model as if its blocks were parallel (the paper's "
              "hypothetical Mixtral column).")
@click.option("--profile", "profile_path", type=click.Path(), help="Architecture profile YAML (default: chosen "
              "from config.json; for a converted OUT_DIR, the one recorded in its precompile.json).")
@click.option("--revision", help="Hub revision (branch, tag or commit) for a hub SOURCE.")
@click.option("--dtype", type=click.Choice(meta("dtype").choices), default="auto", show_default=True,
              help="The output dtype `convert --dtype` would write: the exact figures compare the source converted "
              "to it with the output.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write every figure as one JSON object to FILE ('-': stdout).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table for a model card.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw reduction vs batch size and the memory change to FILE.png (needs matplotlib).")
def plan(source, batch_sizes, assume_parallel, profile_path, revision, dtype, json_path, markdown, plot_path):
    """What precomputing layer 0 buys SOURCE: the paper's figures, and exact bytes when the weights are local.

    SOURCE: hub id (only config.json is downloaded), model directory, converted OUT_DIR or a config.json path.
    """
    import json

    from precompile.plan.plan_report import parse_batch_sizes, plan_model, plot, to_markdown, to_text
    from precompile.plan.trade import verdict_line

    result = plan_model(source, profile=profile_path, assume_parallel=assume_parallel,
                        batch_sizes=parse_batch_sizes(batch_sizes), revision=revision, dtype=dtype)
    if plot_path:
        plot(result, plot_path)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if json_path == "-":
        click.echo(text, nl=False)
        return
    if json_path:
        from precompile.io.file_safety import write_report

        write_report(json_path, text, "--json")
    click.echo(f"{verdict_line(result['verdict'])}\n\n{to_markdown(result)}" if markdown else to_text(result))


@main.command()
def profiles():
    """How each causal LM of transformers stands: supported (profile, block), refused or not yet (the reason);
    the classification of docs/support.md, shipped with the package."""
    from precompile.profiles.shipped import profiles_text

    click.echo(profiles_text())


def run() -> None:
    """The `precompile` program (console script and `python -m precompile`): `main` plus the tuning
    that only a whole process may apply to itself (see precompile/io/process_memory.py).

    SIGINT/SIGTERM handling comes first, before any heavy import (torch, transformers), so that an
    interrupt at any moment ends as one `error: interrupted` line and exit status 130; one that a
    library swallowed still turns a success into 130 (and OutDir.write never commits after one).
    `python -m precompile` holds the signals back while this module is imported; they arrive here.
    """
    from precompile.io.signals import install_interrupt_handler, interrupted

    undo = install_interrupt_handler()
    try:
        try:
            if hasattr(signal, "pthread_sigmask"):  # a signal held back during start-up is raised here
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
            use_huge_pages()
            main()
        except SystemExit as e:
            if e.code != 130 and (not interrupted() or _reported):  # an error line already said how it ended
                raise
            if e.code != 130:
                click.echo("error: interrupted", err=True)
        except BaseException as e:  # after an interrupt, any error is its echo (an import it broke, say)
            if not (isinstance(e, KeyboardInterrupt) or interrupted()):
                raise
            click.echo("error: interrupted", err=True)
    finally:
        undo()
        skip_exit_collection()
    # Interrupted: everything of ours is cleaned up already. Leave without the interpreter's finalization,
    # where an interrupt that landed inside a callback can still end the process by SIGINT (status -2).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    run()
