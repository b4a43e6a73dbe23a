"""The ``equimodal`` command line: train, evaluate, datasets, strategies.

Bad input (config, dataset, run folder, checkpoint) ends with one line on stderr naming
what is wrong and exit code 2; no half-made run folder is left behind.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from equimodal.config import ConfigError, build_config, load_yaml
from equimodal.engine.checkpoint import CheckpointError


def _flags_without_type(params: list[Any]) -> list[Any]:
    """A flag (``--quiet``, ``--plots/--no-plots``, ``--help``) takes no value: no ``<bool>``
    after it in ``--help`` (typer shows the type of every option unless it has a metavar)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A subcommand whose ``--help`` shows no type after its flags."""

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    """The ``equimodal`` group: flags without a type in ``--help``; with no command at all
    it prints the help and exits 0 (typer's ``no_args_is_help`` exits 2, as for an error)."""

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))

    def parse_args(self, ctx, args):
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            typer.echo(ctx.get_help(), color=ctx.color)
            ctx.exit()
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="equimodal",
    cls=_Group,
    no_args_is_help=True,
    help="Balanced multimodal learning: Shapley-guided alternating training and diagnostics.",
)
# emoji codes off: ":smile:" in a user's file name or message stays as written
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)

USER_ERRORS = (
    ConfigError,
    CheckpointError,
    KeyError,
    ValueError,
    TypeError,
    # files and folders: missing, not a folder, not writable, disk full
    OSError,
    # a missing optional dependency: the message carries the pip install hint
    ImportError,
)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.strerror:  # no "[Errno 28]" prefix
        text = exc.strerror + (f": {str(exc.filename)!r}" if exc.filename else "")
    else:
        text = str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())  # one line


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def _version() -> str:
    """The version of equimodal: ``equimodal.__version__`` (the package is imported with this
    module, nothing heavy), else the installed distribution's."""
    import equimodal

    version = getattr(equimodal, "__version__", None)
    if version is None:
        from importlib.metadata import version as installed

        version = installed("equimodal")
    return str(version)


def _show_version(value: bool) -> None:
    if value:
        out.print(f"equimodal {_version()}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
        ),
    ] = False,
) -> None:
    pass


def _unique_dir(root: Path, name: str) -> Path:
    candidate = root / name
    k = 2
    while candidate.exists():
        candidate = root / f"{name}-{k}"
        k += 1
    return candidate


@app.command(cls=_Command)
def train(
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name (see `equimodal datasets`).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Training method (see `equimodal strategies`).")
    ] = None,
    fusion: Annotated[
        str | None,
        typer.Option(help="Fusion (see `equimodal fusions`; default: the method's)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum number of epochs.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (also selects the split where seeded).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=VALUE",
            help="Override a config key: key.path=value (repeatable).",
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder that receives the run folder.")
    ] = Path("runs"),
    name: Annotated[
        str | None, typer.Option(help="Run folder name (default <dataset>-<strategy>-s<seed>).")
    ] = None,
    train_missing_rate: Annotated[
        float | None,
        typer.Option(
            help="Drop each (sample, modality) of a training batch with this probability "
            "(at least one modality kept per sample)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted run folder from its last complete epoch, with its "
            "own config.yaml; it ends as an uninterrupted run would.",
        ),
    ] = None,
) -> None:
    """Train a model; with no options, `shapley_alternating` on mfeat (tmc split)."""
    from equimodal.analysis.relative_edm import fit_run
    from equimodal.data.registry import load_dataset
    from equimodal.engine.trainer import Trainer, build_model, select_device

    if resume is not None:
        given = [
            flag
            for flag, value in (
                ("--dataset", dataset),
                ("--strategy", strategy),
                ("--fusion", fusion),
                ("--epochs", epochs),
                ("--seed", seed),
                ("--config", config),
                ("--set", set_),
                ("--name", name),
                ("--train-missing-rate", train_missing_rate),
            )
            if value
        ]
        if given:
            _fail(f"--resume continues a run with its own config.yaml; drop {', '.join(given)}")
        _resume_run(resume, quiet)
        return
    overrides: list[str] = []
    for key, value in (
        ("dataset.name", dataset),
        ("strategy.name", strategy),
        ("model.fusion", fusion),
        ("train.epochs", epochs),
        ("seed", seed),
        ("name", name),
        ("train.missing_rate", train_missing_rate),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.extend(set_ or [])
    try:
        base = load_yaml(config) if config is not None else {}
        if (
            strategy is not None
            and isinstance(base.get("strategy"), dict)
            and base["strategy"].get("name") != strategy
        ):
            base["strategy"] = {"name": strategy}  # options of another method do not carry over
        cfg = build_config(base, overrides)
        select_device(cfg.train.device)  # e.g. cuda asked for on a machine without it
        data = load_dataset(cfg.dataset.name, seed=cfg.seed, **cfg.dataset.options)
        build_model(cfg, data.info)  # validates sizes and names before any folder exists
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    except (RuntimeError, MemoryError) as exc:  # a model too large to allocate
        _fail(f"cannot build the model: {_message(exc) or type(exc).__name__}")
        return
    from equimodal.engine.distributed import is_main_process

    if not is_main_process():  # torchrun: the other ranks train their shards, write nothing
        fit_run(Trainer(cfg, data=data, run_dir=None, progress=False))
        return
    run_dir = _unique_dir(out_dir, cfg.run_name())
    new_parents = _missing_folders(out_dir)  # removed again if the run fails
    try:
        run_dir.mkdir(parents=True)
    except OSError as exc:
        _remove_empty(new_parents)
        _fail(f"cannot create run folder {str(run_dir)!r}: {exc.strerror or exc}")
    err.print(
        f"[bold]equimodal[/] {cfg.strategy.name} on {cfg.dataset.name} "
        f"({', '.join(data.modalities)}; fusion {cfg.model.fusion}; seed {cfg.seed}) -> {run_dir}",
        highlight=False,
    )
    trainer = Trainer(cfg, data=data, run_dir=run_dir, progress=not quiet, console=err)
    result = _guarded_fit(trainer, run_dir, new_parents)
    _draw_plots(run_dir)
    _print_metrics(result.metrics, run_dir)


class RunTerminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, ``kill PID``), handled like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`RunTerminated` (main thread only)."""

    def handler(signum, frame):
        raise RunTerminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded_fit(trainer, run_dir: Path, new_parents: list[Path] | None = None):
    """Train through ``fit_run``; what a failure leaves depends on how far training got.

    Before the first epoch began (a fresh run): the run folder is removed and a bad input
    ends in one line with exit code 2. Once training began, nothing is deleted: the error
    and its traceback go to ``RUN/error.log`` and one line names the error and how to
    continue (exit code 2 for bad input met on the way, such as a corrupt file or a full
    disk, else 1, also for a diverged loss; Ctrl-C 130; SIGTERM 143; the epoch that was
    running is lost, ``--resume`` continues from the last complete one).
    """
    from equimodal.analysis.relative_edm import fit_run
    from equimodal.engine.runs import write_error_log
    from equimodal.engine.trainer import TrainingDiverged, remove_run_dir

    last = run_dir / "checkpoints" / "last.safetensors"

    def how_to_continue() -> str:
        if last.is_file():
            return f"continue with: equimodal train --resume {run_dir}"
        return "no epoch finished, so there is nothing to resume; start it again"

    try:
        with _sigterm_as_interrupt():
            return fit_run(trainer)
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, RunTerminated) else 130
        what = "terminated (SIGTERM)" if code == 143 else "interrupted"
        if not trainer.training_started and new_parents is not None:
            remove_run_dir(run_dir)
            _remove_empty(new_parents)
            err.print(f"{what} before training began; nothing was kept", highlight=False)
        else:
            err.print(f"{what}; {how_to_continue()}", highlight=False)
        raise typer.Exit(code=code) from None
    except BaseException as exc:
        if isinstance(exc, (SystemExit, typer.Exit)):
            raise
        if not trainer.training_started:
            if new_parents is not None:  # a fresh run that trained nothing: nothing to keep
                remove_run_dir(run_dir)
                _remove_empty(new_parents)
            if isinstance(exc, USER_ERRORS):  # bad input (a resumed run stays as it was)
                _fail(_message(exc))
            if new_parents is not None:
                raise
        write_error_log(run_dir, exc)
        diverged = isinstance(exc, TrainingDiverged)  # its message names the checkpoint
        kind = "" if diverged else f"{type(exc).__name__}: "
        then = "" if diverged else f"; {how_to_continue()}"
        err.print(
            f"[bold red]error:[/] {escape(kind + _message(exc))}; the run folder is kept "
            f"(traceback in {escape(str(run_dir / 'error.log'))}){escape(then)}",
            highlight=False,
            soft_wrap=True,
        )
        # bad input met during training (a corrupt file, a full disk) is still exit code 2
        code = 2 if isinstance(exc, USER_ERRORS) and not diverged else 1
        raise typer.Exit(code=code) from None


def _resume_run(run_dir: Path, quiet: bool) -> None:
    """``train --resume``: continue ``run_dir`` from ``checkpoints/last.safetensors``."""
    from equimodal.data.registry import load_dataset
    from equimodal.engine.distributed import is_main_process
    from equimodal.engine.trainer import Trainer

    try:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
        if (run_dir / "metrics.json").is_file():
            raise ValueError(
                f"run {str(run_dir)!r} already finished (it has metrics.json); nothing to resume"
            )
        last = run_dir / "checkpoints" / "last.safetensors"
        if not last.is_file():
            raise FileNotFoundError(
                f"cannot resume {str(run_dir)!r}: {str(last)!r} does not exist (the run "
                "stopped before its first epoch ended; start it again)"
            )
        cfg = build_config(load_yaml(run_dir / "config.yaml"))
        data = load_dataset(cfg.dataset.name, seed=cfg.seed, **cfg.dataset.options)
        main = is_main_process()
        if main:
            err.print(
                f"[bold]equimodal[/] resuming {run_dir} ({cfg.strategy.name} on "
                f"{cfg.dataset.name}, seed {cfg.seed})",
                highlight=False,
            )
        trainer = Trainer(
            cfg, data=data, run_dir=run_dir, progress=main and not quiet, console=err, resume=True
        )
    except USER_ERRORS as exc:  # the interrupted run stays as it was, for another try
        _fail(_message(exc))
        return
    result = _guarded_fit(trainer, run_dir)
    if main:
        _draw_plots(run_dir)
        _print_metrics(result.metrics, run_dir)


def _draw_plots(run_dir: Path) -> None:
    """Learning curves, Shapley shares and EDM per epoch as PNGs in the run folder."""
    from equimodal.apps.report import plot_run

    try:
        plot_run(run_dir)
    except Exception as exc:  # a plot must never cost the user a finished run
        err.print(f"warning: could not draw the plots of {run_dir}: {exc}", highlight=False)


def _print_metrics(metrics: dict, run_dir: Path | None) -> None:
    split = "test" if metrics["test"] else "validation"  # train.score_test false: no test
    test = metrics["test"] or metrics["val"]
    summary = Table(
        title=f"{split} split ({test['num_samples']} samples), best epoch {metrics['best_epoch']}"
    )
    for col in ("accuracy", "macro-F1", "EDM", "relative EDM", "train time"):
        summary.add_column(col, justify="right")
    summary.add_row(
        f"{100 * test['accuracy']:.2f} %",
        f"{100 * test['macro_f1']:.2f} %",
        f"{100 * test['edm']:.1f} %" if "edm" in test else "-",
        f"{100 * test['relative_edm']:.1f} %" if "relative_edm" in test else "-",
        f"{metrics['train_time_s']:.1f} s",
    )
    out.print(summary)
    if "shapley" in test:
        per = Table(title=f"modality contributions (Shapley value of accuracy, {split})")
        alone = test.get("standalone_val_accuracy", {})
        for col in ("modality", "Shapley", "share", "deviation from equal share", "alone (val)"):
            per.add_column(col, justify="right")
        stderr = test.get("shapley_stderr") or {}  # sampled above train.shapley.max_exact
        for m in metrics["modalities"]:
            error = f" ± {100 * stderr[m]:.2f}" if m in stderr else ""
            per.add_row(
                m,
                f"{100 * test['shapley'][m]:+.2f}{error} pts",
                f"{100 * test['shapley_share'][m]:.1f} %",
                f"{100 * test['edm_deviation'][m]:+.1f} pts",
                f"{100 * alone[m]:.1f} %" if m in alone else "-",
            )
        out.print(per)
    if run_dir is not None:
        out.print(f"run folder: {run_dir}")


@app.command(cls=_Command)
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `equimodal train`.")],
    modalities: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of modalities to read (default: all)."),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    competition: Annotated[
        bool,
        typer.Option(
            help="Also measure AGM's competition strength per modality (trains one "
            "unimodal model per modality)."
        ),
    ] = False,
    robustness: Annotated[
        bool,
        typer.Option(
            help="Also score every modality subset, random missing modalities (eta 0.1-0.5) "
            "and input noise (sigma 0.5, 1, 5); writes RUN/robustness/."
        ),
    ] = False,
    draws: Annotated[int, typer.Option(help="Random draws per missing rate / noise level.")] = 5,
) -> None:
    """Re-score a saved run on its test split, optionally reading only some modalities."""
    from equimodal.engine.trainer import load_run
    from equimodal.evaluation.scores import check_modalities
    from equimodal.evaluation.scores import evaluate as evaluate_model

    if checkpoint not in ("best", "last"):
        _fail(f"--checkpoint must be 'best' or 'last', got {checkpoint!r}")
    try:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
        cfg, model, strategy, data = load_run(run_dir, checkpoint)
        subset = list(model.modalities)
        if modalities:
            subset = [m.strip() for m in modalities.split(",") if m.strip()]
            check_modalities(model, subset)
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    scores = evaluate_model(
        model,
        data,
        strategy,
        split="test",
        modalities=subset,
        seed=cfg.seed,
        permutations=cfg.train.shapley.permutations,
        max_exact=cfg.train.shapley.max_exact,
    )
    table = Table(title=f"{run_dir} — test split, modalities: {', '.join(subset)}")
    for col in ("accuracy", "macro-F1", "EDM"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{100 * scores['accuracy']:.2f} %",
        f"{100 * scores['macro_f1']:.2f} %",
        f"{100 * scores['edm']:.1f} %" if "edm" in scores else "-",
    )
    out.print(table)
    if robustness:
        from equimodal.evaluation.robustness import (
            evaluate_robustness,
            robustness_markdown,
            write_robustness,
        )

        if draws < 1:
            _fail(f"--draws must be at least 1, got {draws}")
        result = evaluate_robustness(
            model,
            data.test,
            strategy.inference_kwargs(),
            draws=draws,
            seed=cfg.seed,
            progress=lambda step: err.print(f"robustness: {step}", highlight=False),
        )
        out.print(robustness_markdown(result), highlight=False, markup=False)
        try:
            written = write_robustness(result, run_dir / "robustness")
        except USER_ERRORS as exc:
            _fail(_message(exc))
            return
        for p in written:
            err.print(f"wrote {p}", highlight=False)
    if competition:
        from equimodal.analysis.competition import measure_competition

        strength = measure_competition(cfg, model, strategy.inference_kwargs(), data)
        table = Table(title="competition strength (0: the modality's concept survives fusion)")
        table.add_column("modality")
        table.add_column("strength", justify="right")
        for m, value in strength.items():
            table.add_row(m, f"{value:.3f}")
        out.print(table)


@app.command(cls=_Command)
def report(
    path: Annotated[Path, typer.Argument(help="A run folder, or a folder of run folders.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the summary here (.md or .csv).")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Draw each run's plots into its folder.")] = False,
    markdown: Annotated[
        bool,
        typer.Option(help="Write PATH/report.md with the table and figures (PATH/figures/)."),
    ] = True,
) -> None:
    """Summarise finished runs: mean ± std over seeds per method, plots, a Markdown report.

    Methods are (strategy, fusion), or the bench labels in a folder written by
    `equimodal bench`.
    """
    from equimodal.apps.report import (
        find_runs,
        is_bench_dir,
        load_metrics,
        plot_run,
        summarize,
        summary_csv,
        summary_markdown,
        write_report,
    )

    try:
        runs = find_runs(path)
        if not runs:
            raise FileNotFoundError(f"no finished run (metrics.json) under {str(path)!r}")
        rows = summarize([load_metrics(r) for r in runs], by_run_name=is_bench_dir(path))
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    text = summary_markdown(rows)
    _print_summary(rows, text)
    if markdown:
        err.print(f"wrote {write_report(path)}", highlight=False)
    if out_file is not None:
        from equimodal.core.files import write_text_atomic

        write_text_atomic(out_file, summary_csv(rows) if out_file.suffix == ".csv" else text)
    if plots:
        for r in runs:
            for p in plot_run(r):
                out.print(f"wrote {p}", highlight=False)


@app.command(cls=_Command)
def bench(
    bench_file: Annotated[
        Path, typer.Argument(help="Bench file (YAML): datasets x methods x seeds.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder of the bench's runs.")] = Path(
        "runs/bench"
    ),
    jobs: Annotated[int, typer.Option(help="Runs in parallel (local process pool).")] = 1,
    executor: Annotated[
        str,
        typer.Option(
            help="local (a process pool), ray (one task per run on a Ray cluster) or slurm "
            "(one SLURM job per run, a job array, through submitit; logs in OUT/.slurm/)."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (with --executor ray; default: a local Ray)."),
    ] = None,
    slurm_partition: Annotated[
        str | None, typer.Option(help="SLURM partition (with --executor slurm).")
    ] = None,
    slurm_time: Annotated[
        int | None,
        typer.Option(help="Time limit of each SLURM job, minutes (with --executor slurm; 60)."),
    ] = None,
    slurm_cpus: Annotated[
        int | None,
        typer.Option(help="CPUs per SLURM job, also its torch threads (with --executor slurm; 1)."),
    ] = None,
    slurm_gpus: Annotated[
        int | None,
        typer.Option(
            help="GPUs per SLURM job (with --executor slurm; the config's train.device "
            "decides whether they are used)."
        ),
    ] = None,
    slurm_mem: Annotated[
        float | None, typer.Option(help="Memory per SLURM job, GB (with --executor slurm).")
    ] = None,
    slurm_param: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra sbatch parameter KEY=VALUE, e.g. account=myproj or qos=short "
            "(with --executor slurm; repeatable)."
        ),
    ] = None,
    slurm_cluster: Annotated[
        str,
        typer.Option(
            help="slurm, or submitit's local / debug, which run the jobs on this machine "
            "(with --executor slurm; for trying a bench file)."
        ),
    ] = "slurm",
) -> None:
    """Run a grid of runs (resumable) and write summary.md and summary.csv."""

    from equimodal.apps.bench import (
        add_robustness,
        bench_wants_robustness,
        choose_settings,
        load_bench,
        load_tuning,
    )
    from equimodal.apps.report import (
        comparison_note,
        load_metrics,
        summarize,
        summary_csv,
        summary_markdown,
    )
    from equimodal.apps.stats import compare_to_reference
    from equimodal.core.files import write_json_atomic, write_text_atomic

    if jobs < 1:
        _fail(f"--jobs must be at least 1, got {jobs}")
    if executor not in ("local", "ray", "slurm"):
        _fail(f"--executor must be 'local', 'ray' or 'slurm', got {executor!r}")
    if address is not None and executor != "ray":
        _fail("--address needs --executor ray")
    slurm = _slurm_options(
        executor,
        slurm_partition,
        slurm_time,
        slurm_cpus,
        slurm_gpus,
        slurm_mem,
        slurm_param,
        slurm_cluster,
        out_dir,
    )
    try:
        if executor == "ray":
            from equimodal.apps.bench import require_ray

            require_ray()
        if executor == "slurm":
            from equimodal.apps.bench import require_submitit

            require_submitit()
        runs, reference = load_bench(bench_file, out_dir)
        trials, tuning_runs = load_tuning(bench_file, out_dir)
        robustness = bench_wants_robustness(bench_file)
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "bench.yaml", bench_file.read_text(encoding="utf-8"))
    except USER_ERRORS as exc:
        _fail(_message(exc))
    if trials:
        # tuning: every method the same number of trials, chosen on validation only
        _run_grid(
            tuning_runs,
            f"tuning: {len(trials)} trials,",
            out_dir / "tuning",
            jobs,
            executor,
            address,
            slurm,
        )
        try:
            chosen, record = choose_settings(trials, tuning_runs)
            write_json_atomic(out_dir / "tuning.json", record)
            missing = sorted({(t.dataset, t.label) for t in trials} - set(chosen))
            if missing:
                raise ValueError(
                    f"no tuning run of {missing[0][1]!r} on {missing[0][0]!r} finished"
                )
            runs, reference = load_bench(bench_file, out_dir, chosen)
        except USER_ERRORS as exc:
            _fail(_message(exc))
            return
        for (dataset, label), settings in sorted(chosen.items()):
            text = ", ".join(f"{k}={v}" for k, v in settings.items()) or "(no settings)"
            err.print(f"chosen on validation: {dataset} {label}: {text}", highlight=False)
    failures = _run_grid(runs, "", out_dir, jobs, executor, address, slurm)
    from equimodal.apps.report import write_report

    try:  # each file is written whole or not at all (a full disk ends here in one line)
        if robustness:
            added = add_robustness(runs)
            if added:
                err.print(f"robustness scored for {added} runs", highlight=False)
        finished = [load_metrics(r.run_dir) for r in runs if (r.run_dir / "metrics.json").is_file()]
        if not finished:
            _fail("no run finished")
        comparisons = compare_to_reference(finished, reference) if reference else None
        rows = summarize(finished, by_run_name=True, comparisons=comparisons)
        text = summary_markdown(rows)
        if reference:
            text += "\n" + comparison_note(reference) + "\n"
        write_text_atomic(out_dir / "summary.md", text)
        write_text_atomic(out_dir / "summary.csv", summary_csv(rows))
        err.print(f"wrote {write_report(out_dir, comparisons, reference)}", highlight=False)
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    _print_summary(rows, text, comparison_note(reference) if reference else None)
    if failures:
        raise typer.Exit(code=1)


def _print_summary(rows: list[dict[str, Any]], text: str, note: str | None = None) -> None:
    """The summary of ``report`` and ``bench``: its Markdown ``text`` (what the files hold)
    when stdout is a file or a pipe; on a terminal a table per dataset, then ``note``.

    The tables keep to the terminal's width: the columns that do not fit are left out, least
    important first (shares, robustness, train time, ...), and named under the tables.
    """
    if not out.is_terminal:
        out.print(text, highlight=False, markup=False, soft_wrap=True)
        return
    columns = _summary_columns(rows)
    left_out: list[str] = []
    tables = _summary_tables(rows, columns)
    # drop from the right (the columns are in order of importance) until every table fits
    # with one line per method
    unbounded = out.options.update_width(10**6)
    while len(columns) > 1 and any(
        out.measure(t, options=unbounded).maximum > out.width for t in tables
    ):
        left_out.insert(0, " ".join(columns.pop()[0].split()))
        tables = _summary_tables(rows, columns)
    for table in tables:
        out.print(table)
    if note and any(head.startswith("Δ") for head, _ in columns):  # it explains Δ and p
        out.print(note, highlight=False, markup=False)
    if left_out:
        out.print(
            f"Left out at {out.width} columns: {'; '.join(left_out)} (widen the terminal, or "
            "redirect the output for the whole Markdown table).",
            highlight=False,
            markup=False,
        )


def _summary_columns(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The columns of the terminal summary after method and seeds, most important first:
    (header, cell of a row given its number of seeds)."""
    from equimodal.apps.report import difference_text, mean_std_text

    nan = (float("nan"), 0.0)
    columns: list[tuple[str, Any]] = [
        ("accuracy %", lambda r, n: mean_std_text(r["accuracy"], 2, n)),
        ("EDM %", lambda r, n: mean_std_text(r["edm"], 1, n)),
        ("macro-F1 %", lambda r, n: mean_std_text(r["macro_f1"], 2, n)),
    ]
    if any(r.get("comparison") is not None for r in rows):
        columns += [
            (
                "Δ accuracy vs reference,\npts [95% CI]",
                lambda r, n: difference_text(r.get("comparison"))[0],
            ),
            ("p (Holm)", lambda r, n: difference_text(r.get("comparison"))[1]),
        ]
    columns += [
        ("relative\nEDM %", lambda r, n: mean_std_text(r["relative_edm"], 1, n)),
        ("train\ntime s", lambda r, n: mean_std_text(r["train_time_s"], 1, n, scale=1.0)),
    ]
    if any("missing_0.5" in r for r in rows):
        columns += [
            ("missing\n0.5 %", lambda r, n: mean_std_text(r.get("missing_0.5", nan), 2, n)),
            (
                "strongest\nremoved %",
                lambda r, n: mean_std_text(r.get("strongest_removed", nan), 2, n),
            ),
        ]
    columns.append(
        (
            "Shapley share\nper modality %",
            lambda r, n: ", ".join(f"{m} {100 * v[0]:.0f}" for m, v in r["share"].items()),
        )
    )
    return columns


def _summary_tables(rows: list[dict[str, Any]], columns: list[tuple[str, Any]]) -> list[Table]:
    """The summary as one rich table per dataset: method, seeds and ``columns``."""
    tables = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == dataset]
        spread = ", mean ± std over seeds" if any(len(r["seeds"]) > 1 for r in group) else ""
        table = Table(
            title=Text(f"{dataset}: test scores{spread}", style="bold"),
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        table.add_column("method", no_wrap=True)
        table.add_column("seeds", justify="right")
        for head, _ in columns:
            table.add_column(head, justify="right")
        for r in group:
            n = len(r["seeds"])
            cells = [r["method"], str(n), *(cell(r, n) for _, cell in columns)]
            table.add_row(*(Text(c) for c in cells))
        tables.append(table)
    return tables


def _slurm_options(
    executor: str,
    partition: str | None,
    time_min: int | None,
    cpus: int | None,
    gpus: int | None,
    mem_gb: float | None,
    params: list[str] | None,
    cluster: str,
    out_dir: Path,
) -> dict[str, Any]:
    """``bench``'s --slurm-* options as :func:`equimodal.apps.bench.execute`'s keyword
    arguments (``slurm_options`` and ``slurm_folder``: ``OUT/.slurm``); exits with code 2
    on a bad one, or on one given without ``--executor slurm``."""
    given = {
        "--slurm-partition": partition,
        "--slurm-time": time_min,
        "--slurm-cpus": cpus,
        "--slurm-gpus": gpus,
        "--slurm-mem": mem_gb,
        "--slurm-param": params or None,
        "--slurm-cluster": None if cluster == "slurm" else cluster,
    }
    if executor != "slurm":
        for name, value in given.items():
            if value is not None:
                _fail(f"{name} needs --executor slurm")
        return {}
    if cluster not in ("slurm", "local", "debug"):
        _fail(f"--slurm-cluster must be 'slurm', 'local' or 'debug', got {cluster!r}")
    for name, value, least in (
        ("--slurm-time", time_min, 1),
        ("--slurm-cpus", cpus, 1),
        ("--slurm-gpus", gpus, 0),
    ):
        if value is not None and value < least:
            _fail(f"{name} must be at least {least}, got {value}")
    if mem_gb is not None and mem_gb <= 0:
        _fail(f"--slurm-mem must be positive, got {mem_gb}")
    extra: dict[str, str] = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--slurm-param must be KEY=VALUE, got {item!r}")
        extra[key.strip().removeprefix("--").replace("-", "_")] = value
    options: dict[str, Any] = {
        "cluster": cluster,
        "slurm_partition": partition,
        "timeout_min": time_min,
        "cpus_per_task": cpus,
        "gpus_per_node": gpus,
        "mem_gb": mem_gb,
        "slurm_additional_parameters": extra or None,
    }
    options = {k: v for k, v in options.items() if v is not None}
    return {"slurm_options": options, "slurm_folder": out_dir / ".slurm"}


def _run_grid(
    runs,
    what: str,
    where: Path,
    jobs: int,
    executor: str,
    address: str | None,
    slurm: dict[str, Any] | None = None,
):
    """Announce the grid, train its pending ``runs`` with a progress bar, report the
    failures; returns them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from equimodal.apps.bench import execute, pending

    todo = pending(runs)
    err.print(
        f"[bold]equimodal bench[/] {what} {len(runs)} runs ({len(runs) - len(todo)} already "
        f"finished) -> {where}".replace("  ", " "),
        highlight=False,
    )
    name = "tuning" if what else "bench"

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task(name, total=len(pending(runs)))

        def done(run, error) -> None:
            state = "failed" if error else "done"
            progress.update(
                task, advance=1, description=f"{run.dataset} {run.label} s{run.seed} {state}"
            )

        failures = execute(
            runs, jobs=jobs, on_done=done, executor=executor, address=address, **(slurm or {})
        )
    for run, error in failures:
        err.print(f"[red]failed:[/] {run.run_dir}: {error}", highlight=False)
    return failures


@app.command(cls=_Command)
def diagnose(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `equimodal train`.")],
    competition: Annotated[
        bool,
        typer.Option(help="Add AGM competition strength (trains one unimodal model each)."),
    ] = False,
    draws: Annotated[int, typer.Option(help="Random draws per missing rate / noise level.")] = 5,
) -> None:
    """Which modality is lazy, and by how much: RUN/diagnose/report.html and report.md."""
    import time

    from equimodal.apps.diagnose import diagnose_run, write_diagnosis

    if draws < 1:
        _fail(f"--draws must be at least 1, got {draws}")
    started = time.perf_counter()
    try:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
        diagnosis = diagnose_run(
            run_dir,
            competition=competition,
            draws=draws,
            progress=lambda step: err.print(
                f"diagnose: {step} ({time.perf_counter() - started:.1f} s)", highlight=False
            ),
        )
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    try:
        paths = write_diagnosis(diagnosis, run_dir / "diagnose")
    except USER_ERRORS as exc:
        _fail(_message(exc))
        return
    for sentence in diagnosis.summary:
        out.print(f"- {sentence}", highlight=False)
    err.print(
        f"wrote {paths['html']} and {paths['markdown']} in {time.perf_counter() - started:.1f} s",
        highlight=False,
    )


@app.command(cls=_Command)
def prepare(
    dataset: Annotated[str, typer.Argument(help="Dataset with a prepare step (e.g. cremad).")],
    raw: Annotated[Path, typer.Option("--raw", help="Folder of the raw download.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder of the prepared dataset.")],
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", metavar="KEY=VALUE", help="A preparer option: key=value (repeatable)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert raw media (wav, video) into the layout the dataset's loader reads.

    Safe to re-run: finished items are skipped and partial ones replaced.
    """
    from equimodal.config import parse_override
    from equimodal.data.prepare import prepare_dataset

    options = {}
    try:
        for text in option or []:
            path, value = parse_override(text)
            options[".".join(path)] = value
        summary = prepare_dataset(dataset, raw, out_dir, progress=not quiet, **options)
    except (*USER_ERRORS, TypeError) as exc:
        _fail(_message(exc))
        return
    out.print(
        f"{summary.dataset}: {summary.written} items written, {summary.skipped} already "
        f"prepared -> {out_dir}",
        highlight=False,
    )
    for note in summary.notes:
        out.print(f"note: {note}", highlight=False)


def _plain(text: str | None) -> str:
    """Text of a docstring or description for the terminal: one line, no reST ``code``."""
    return re.sub(r"``(.+?)``", r"\1", " ".join((text or "").split()))


def _first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring, without its pointer to the module docstring."""
    paragraph = _plain((doc or "").strip().split("\n\n")[0])
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]
    return re.sub(r";\s*see (the )?module doc(string)?\.?$", ".", sentence)


def _entry(name: str, fields: list[tuple[str, str]]) -> RenderableType:
    """One listed item: its name on a line of its own, then ``label  value`` lines indented;
    values wrap within their column, so nothing runs past the terminal's width."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="dim")
    grid.add_column(overflow="fold")
    for label, value in fields:
        grid.add_row(Text(label), Text(value))
    return Group(
        Text(name, style="bold cyan", no_wrap=True), Padding(grid, (0, 0, 1, 2), expand=False)
    )


@app.command(cls=_Command)
def datasets() -> None:
    """List the datasets: modalities with dimensions, classes, samples, source and licence."""
    from equimodal.data.registry import dataset_names, get_entry

    out.print("[bold]equimodal datasets[/]\n")
    for name in dataset_names():
        info = get_entry(name).info
        mods = ", ".join(f"{m.name} ({'x'.join(map(str, m.shape))})" for m in info.modalities)
        # 0: the number depends on the user's files (their features, their copy of the clips)
        fields = [
            ("modalities", mods or "yours (one file per modality)"),
            ("classes", str(info.num_classes) if info.num_classes else "varies"),
            ("samples", str(info.num_samples) if info.num_samples else "varies (your copy)"),
            ("source", _plain(info.source)),
            ("licence", _plain(info.license)),
        ]
        out.print(_entry(name, fields))


@app.command(cls=_Command)
def strategies() -> None:
    """List the training methods and their options with defaults."""
    from equimodal.strategies import get_strategy_class, strategy_names

    out.print("[bold]equimodal strategies[/]\n")
    for name in strategy_names():
        cls = get_strategy_class(name)
        fields = [
            ("about", _first_sentence(cls.__doc__) or "-"),
            ("default fusion", cls.default_fusion),
            ("options", _option_defaults(cls.config_class, skip=("name",)) or "-"),
        ]
        out.print(_entry(name, fields))


def _option_defaults(model, skip: tuple[str, ...] = ()) -> str:
    """``key=default`` for each field of a pydantic options model (``key (required)``)."""
    return ", ".join(
        f"{k} (required)" if f.is_required() else f"{k}={f.default!r}"
        for k, f in model.model_fields.items()
        if k not in skip
    )


@app.command(cls=_Command)
def fusions() -> None:
    """List the fusions (how modality features become logits), plugins included."""
    from equimodal.core.registries import FUSIONS

    table = Table(title="equimodal fusions")
    table.add_column("name", no_wrap=True)
    for col in ("order-dependent", "description"):
        table.add_column(col, overflow="fold")
    for name, cls in FUSIONS.items():
        table.add_row(name, "yes" if cls.uses_order else "no", _plain(cls.description) or "-")
    out.print(table)


@app.command(cls=_Command)
def encoders() -> None:
    """List the encoder kinds and their options with defaults, plugins included."""
    from equimodal.core.registries import ENCODERS

    table = Table(title="equimodal encoders", show_lines=True)
    table.add_column("kind", no_wrap=True)
    for col in ("options (default)", "description"):
        table.add_column(col, overflow="fold")
    for name, entry in ENCODERS.items():
        opts = _option_defaults(entry.options)
        table.add_row(name, opts or "-", _plain(entry.description) or "-")
    out.print(table)


def main() -> None:
    """Entry point of the ``equimodal`` console script."""
    try:
        app()
    except SystemExit as exc:
        raise exc
    except USER_ERRORS as exc:  # pragma: no cover - last resort, commands catch their own
        err.print(f"[bold red]error:[/] {escape(_message(exc))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
