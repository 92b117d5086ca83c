"""The `precompile` command line: a thin layer over the library API.

Bad input prints one line and exits 2; a failed verification exits 1; --debug
shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import UserError, VerificationError
from .progress import Progress

_DEVICE = click.Choice(["auto", "cpu", "cuda"])


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
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        except UserError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except VerificationError as e:
            if debug:
                raise
            click.echo(f"verification failed: {e}", err=True)
            sys.exit(1)
        except Exception as e:
            from .loader import PrecompileLoadError

            if isinstance(e, PrecompileLoadError) and not debug:
                click.echo(f"error: {e}", err=True)
                sys.exit(2)
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
@click.option("--revision", help="Hub revision (branch, tag or commit) for a hub SOURCE.")
@click.option("--profile", "profile_path", type=click.Path(), help="Architecture profile YAML (default: "
              "chosen from config.json).")
@click.option("--device", type=_DEVICE, default="auto", show_default=True,
              help="Where to compute the table (auto: CUDA when available).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Output dtype (auto: the checkpoint's own).")
@click.option("--compute-dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Precision of the table computation.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Vocabulary rows per compute chunk.")
@click.option("--link", type=click.Choice(["auto", "reflink", "hardlink", "copy"]), default="auto",
              show_default=True, help="How unchanged shards enter OUT_DIR (hardlink: editing OUT_DIR edits the "
              "source).")
@click.option("--force", is_flag=True, help="Replace an existing OUT_DIR (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Print what would be read, eliminated and written; write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert(source, out_dir, revision, profile_path, device, dtype, compute_dtype, chunk_size, link, force,
            dry_run, quiet):
    """Convert SOURCE (hub id or local directory) into OUT_DIR."""
    from .convert import convert as run_convert, describe_plan, plan_conversion

    progress = Progress(quiet=quiet)
    if dry_run:
        plan = plan_conversion(source, revision=revision, profile=profile_path, dtype=dtype,
                               compute_dtype=compute_dtype)
        click.echo(describe_plan(plan))
        click.echo(_dry_run_files(plan))
        return
    run_convert(source, out_dir, revision=revision, profile=profile_path, device=device, dtype=dtype,
                compute_dtype=compute_dtype, chunk_size=chunk_size, force=force, link=link, progress=progress)


@main.command()
@click.argument("out_dir")
@click.option("--prompts", "prompts_file", metavar="FILE", help="Prompts: a UTF-8 text file (one per line) or JSONL with a "
              "\"prompt\" field (default: a small built-in set).")
@click.option("--reference", metavar="SOURCE", help="The original checkpoint (directory or hub id; default: the source recorded in "
              "precompile.json).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Greedy tokens generated per prompt.")
@click.option("--rows", default=str(1024), show_default=True, metavar="N|all",
              help="Table rows to recompute: N sampled (seeded) plus every prompt token, or 'all'.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the row sample.")
@click.option("--device", type=_DEVICE, default="auto", show_default=True, help="Where to run the models.")
@click.option("--fp32-reference/--no-fp32-reference", default=None,
              help="Also run the original upcast to float32 (default: on for bfloat16/float16 models under 2 GB).")
@click.option("--profile", "profile_path", type=click.Path(), help="Architecture profile YAML (default: the one "
              "recorded in precompile.json).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@click.option("--max-abs-diff", type=float, help="Largest allowed |logit difference| (default per dtype).")
@click.option("--max-mean-diff", type=float, help="Largest allowed mean |logit difference|.")
@click.option("--max-kl", type=float, help="Largest allowed mean KL(original || converted).")
@click.option("--min-top1", type=float, help="Smallest allowed top-1 agreement (0-1).")
@click.option("--generation-tie", type=float, help="Logit gap under which a greedy divergence counts as a tie.")
@click.option("--rows-lambda", type=float, help="Safety factor of the table rows' accumulation bound (default 2).")
@click.option("--rows-z", type=float, help="Largest allowed row-mean error statistic (default 4.5).")
@click.option("--max-fp32-ratio", type=float, help="Largest allowed converted/original RMS distance to float32.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def verify(out_dir, prompts_file, reference, max_new_tokens, rows, seed, device, fp32_reference, profile_path,
           json_path, max_abs_diff, max_mean_diff, max_kl, min_top1, generation_tie, rows_lambda, rows_z,
           max_fp32_ratio, quiet):
    """Check OUT_DIR against its original model: files, table rows, logits, generation.

    Exit 0 when every check passes, 1 when any fails, 2 for bad input.
    """
    import json as _json
    from pathlib import Path

    from .verify import format_report, summary_line, verify as run_verify

    if json_path is not None:
        parent = Path(json_path).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json {json_path}: directory {parent} does not exist; create it or choose another path")
    thresholds = {"max_abs_diff": max_abs_diff, "mean_abs_diff": max_mean_diff, "kl": max_kl, "top1": min_top1,
                  "generation_tie": generation_tie, "rows_lambda": rows_lambda, "rows_z": rows_z,
                  "fp32_ratio": max_fp32_ratio}
    result = run_verify(out_dir, prompts=prompts_file, reference=reference, max_new_tokens=max_new_tokens,
                        rows=rows, seed=seed, device=device, fp32_reference=fp32_reference, thresholds=thresholds,
                        profile=profile_path, progress=Progress(quiet=quiet))
    click.echo(format_report(result))
    if json_path is not None:
        Path(json_path).write_text(_json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not result["passed"]:
        raise VerificationError(summary_line(result))


def _dry_run_files(plan) -> str:
    from .layout import TABLE_FILE

    lines = ["reads: " + ", ".join(plan.read_tensors),
             "eliminates: " + (", ".join(plan.layout.eliminated) or "nothing"),
             "writes:", f"  {TABLE_FILE}  {plan.table_bytes:,} bytes (table)"]
    for s in plan.shards:
        if s.out_file is None:
            lines.append(f"  (drops {s.source_file}: every tensor in it is eliminated)")
        else:
            lines.append(f"  {s.out_file}  {s.out_bytes:,} bytes ({s.action} of {s.source_file})")
    lines.append(f"  + index, config.json, precompile.json, precompile_loader.py, {len(plan.carried)} tokenizer/"
                 f"generation files")
    lines.append(f"total weights: {plan.out_bytes:,} bytes")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
