"""The ``webdistill`` command: a thin click layer over the importable pipeline."""

import json
import logging
import sys
from pathlib import Path

import click

from pipeline.app import STAGES
from pipeline.config import commented_defaults, load_config
from pipeline.errors import UserError

DEFAULT_CONFIG = "configs/demo.yaml"

_SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                    help="Override a config value, e.g. --set crawl.processes_count=4 (repeatable).")


def _load(target: str | None, overrides):
    """A config from a YAML file, or the resolved config of a run directory: that directory, wherever
    it is now (a copied or moved run directory acts on itself, not on the folder it was copied from)."""
    path = Path(target or DEFAULT_CONFIG)
    if not path.is_dir():
        return load_config(path, overrides)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run directory (no config.yaml): give a config file "
                        "or run `webdistill run CONFIG` first")
    return load_config(path / "config.yaml", [*overrides, f"run_dir={json.dumps(str(path.absolute()))}"])


class _Group(click.Group):
    """Prints user errors as one line (no traceback) and exits with status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            # one line, whatever a library put in the message it wraps
            click.secho(f"error: {' '.join(str(e).split())}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(quiet):
    """webdistill: distil a teacher into a small student using only web images.

    Stages run in order: crawl → score → filter → perturb → distill → evaluate → report.
    Each writes one folder of the run directory and a completion record; a stage whose
    record matches its config and inputs is skipped, a changed one is re-run.

    TARGET is a config file (YAML) or a run directory made by an earlier run.
    """
    from pipeline.devices import is_main

    # under torchrun only rank 0 reports progress; the other ranks speak up for warnings
    logging.basicConfig(level=logging.WARNING if quiet or not is_main() else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for chatty in ("faiss.loader", "matplotlib"):  # which CPU build faiss loads; matplotlib's font cache
        logging.getLogger(chatty).setLevel(logging.WARNING)


@cli.command("run")
@click.argument("target", required=False)
@click.option("--only", help="Comma-separated stages to run (default: all that are built).")
@click.option("--force", is_flag=True, help="Re-run the selected stages even if they are up to date.")
@_SET
def run_cmd(target, only, force, overrides):
    """Run the pipeline for TARGET (default: configs/demo.yaml)."""
    from pipeline.runner import format_status, run_stages

    cfg = _load(target, overrides)
    run = run_stages(cfg, STAGES, only=only.split(",") if only else None, force=force)
    click.echo(format_status(cfg, run, STAGES))
    _echo_report(run)


def _echo_report(run) -> None:
    """The report's path and headline, once the report stage has run."""
    from manifests.artifacts import HEADLINE, REPORT_HTML, REPORT_MD
    from pipeline import devices
    from pipeline.rundir import shown

    if devices.is_main() and run.record("report") and run.valid(HEADLINE):
        click.echo(f"\nreport: {shown(run.path(REPORT_HTML))} (markdown: {shown(run.path(REPORT_MD))})\n"
                   f"{run.read(HEADLINE)['text']}")


def _stage_command(spec):
    @click.argument("target", required=False)
    @click.option("--force", is_flag=True, help="Re-run from scratch even if up to date; later stages become stale.")
    @_SET
    def command(target, force, overrides):
        from pipeline.runner import run_stages

        if spec.module is None:
            raise UserError(f"the {spec.name} stage is not built yet in this version of webdistill")
        run_stages(_load(target, overrides), STAGES, only=[spec.name], force=force)

    command.__doc__ = f"Run the {spec.name} stage only: {spec.summary}."
    return cli.command(spec.name)(command)


for _spec in STAGES:
    _stage_command(_spec)


@cli.command()
@click.argument("target", required=False)
@_SET
def status(target, overrides):
    """Show each stage of a run as done / stale / missing, with its counts."""
    from pipeline.rundir import RunDir
    from pipeline.runner import format_status

    cfg = _load(target, overrides)
    click.echo(format_status(cfg, RunDir(cfg.run_dir), STAGES))


@cli.command("demo-data")
@click.argument("target", required=False)
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@_SET
def demo_data(target, force, overrides):
    """Build the embedded demo: private MNIST split, web pool, URL list."""
    from demo.world import build_demo

    build_demo(_load(target, overrides), force=force)


@cli.command("demo-teacher")
@click.argument("target", required=False)
@click.option("--force", is_flag=True, help="Retrain even if an up-to-date teacher exists.")
@_SET
def demo_teacher(target, force, overrides):
    """Train the demo's teacher on the private train split; write it with its spec."""
    from demo.teacher import build_demo_teacher

    build_demo_teacher(_load(target, overrides), force=force)


@cli.command()
@click.argument("target", required=False)
@click.option("--only", help="Comma-separated methods to run (default: bench.methods and the ablations); "
              "method@variant is a method's validation-sweep variant.")
@click.option("--list", "list_methods", is_flag=True, help="List the methods, ablations and sweep variants, then exit.")
@_SET
def bench(target, only, list_methods, overrides):
    """Compare methods over seeds on TARGET's web pool; tables and plots in bench.results_dir.

    Each method × seed is its own run directory under bench.work_dir/runs; stages another run
    has already done with the same settings are linked, not recomputed, so a second bench only
    rebuilds the tables. The student's top-1 is measured on evaluate.test_set.
    """
    from bench.methods import ABLATIONS, METHODS, VARIANTS, run_bench

    if list_methods:
        for name, method in {**METHODS, **ABLATIONS, **VARIANTS}.items():
            click.echo(f"{name:<28} {method.about}")
        return
    if target is None or Path(target).is_dir():
        raise UserError("webdistill bench needs a config file (e.g. configs/demo.yaml)")
    result = run_bench(target, overrides, only.split(",") if only else None)
    click.echo(result["markdown"])


@cli.command()
def defaults():
    """Print the default config, every key with its help text."""
    click.echo(commented_defaults())


def main():
    cli(prog_name="webdistill")


if __name__ == "__main__":
    main()
