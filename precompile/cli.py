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
@click.option("--overlay", is_flag=True, help="Write only the table (+ manifest, config, tokenizer, shim), loaded "
              "over the unchanged SOURCE; fetch only the files layer 0 needs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert(source, out_dir, revision, profile_path, device, dtype, compute_dtype, chunk_size, link, force,
            dry_run, overlay, quiet):
    """Convert SOURCE (hub id or local directory) into OUT_DIR."""
    from .convert import convert as run_convert, describe_plan, plan_conversion

    progress = Progress(quiet=quiet)
    if dry_run:
        plan = plan_conversion(source, revision=revision, profile=profile_path, dtype=dtype,
                               compute_dtype=compute_dtype, overlay=overlay)
        click.echo(describe_plan(plan))
        click.echo(_dry_run_files(plan))
        return
    run_convert(source, out_dir, revision=revision, profile=profile_path, device=device, dtype=dtype,
                compute_dtype=compute_dtype, chunk_size=chunk_size, force=force, link=link, progress=progress,
                overlay=overlay)


@main.command()
@click.argument("overlay_dir", type=click.Path(file_okay=False))
@click.argument("full_dir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--base", type=click.Path(file_okay=False), help="The base model's directory (default: the source "
              "recorded in the overlay, from the HF cache at its revision or its local path).")
@click.option("--profile", "profile_path", type=click.Path(), help="The profile YAML the overlay was made with, "
              "when it was not chosen from config.json.")
@click.option("--link", type=click.Choice(["auto", "reflink", "hardlink", "copy"]), default="auto",
              show_default=True, help="How unchanged shards enter FULL_DIR.")
@click.option("--force", is_flag=True, help="Replace an existing FULL_DIR (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def materialize(overlay_dir, full_dir, base, profile_path, link, force, quiet):
    """Turn OVERLAY_DIR into a full conversion in FULL_DIR (the same bytes as `convert` without --overlay)."""
    from .materialize import materialize as run_materialize

    run_materialize(overlay_dir, full_dir, base=base, profile=profile_path, force=force, link=link,
                    progress=Progress(quiet=quiet))


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
    index = "" if plan.kind == "overlay" else "index, "
    lines.append(f"  + {index}config.json, precompile.json, precompile_loader.py, {len(plan.carried)} tokenizer/"
                 f"generation files")
    if plan.kind == "overlay":
        lines.append("  (overlay: no source tensor is copied; reads only " + ", ".join(plan.checkpoint.files) + ")")
    lines.append(f"total weights: {plan.out_bytes:,} bytes")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
