"""``equimodal bench``: a grid of datasets x methods x seeds, one summary table.

A bench file (YAML)::

    seeds: [0, 1, 2, 3, 4]
    reference: joint                 # label the others are compared with (paired t-test)
    base: {train: {epochs: 100, patience: 15}}     # merged into every run's config
    datasets:
      - mfeat                        # or {name: mfeat, options: {split: tmc}}
      - name: htad                   # settings: merged into every run on this dataset
        settings: {model: {encoder: {dropout: 0.3}}}
    methods:
      - {label: shapley_alternating, strategy: {name: shapley_alternating}}
      - {label: joint, strategy: {name: joint}, model: {fusion: concat},
         tune: {optim.weight_decay: [0.0, 0.0001]}}   # a method's own grid (optional)
    tune:                            # optional: the same tuning budget for every method
      seeds: [100, 101]              # tuning seeds, disjoint from the evaluation seeds
      budget: 4                      # trials per method (default: the whole grid)
      grid: {optim.lr: [0.001, 0.003], model.encoder.dropout: [0.1, 0.3]}

With ``tune``, every (dataset, method) first trains each of its trials on the tuning
seeds into ``OUT/tuning/`` (``train.score_test: false``: test is never scored), the trial
with the best mean validation accuracy is chosen (:func:`choose_settings`, recorded in
``OUT/tuning.json``) and the evaluation runs get its settings (:func:`load_tuning`).

Runs go to ``OUT/<dataset>/<label>-s<seed>/``. A run with a ``metrics.json`` is finished
and never repeated; a killed run continues from its last complete epoch (as ``train
--resume``) and ends as if never stopped, so a stopped bench continues where it stopped
(a folder without a complete epoch, or of another config, is removed and run again).
Every run selects its checkpoint on validation and reads test once (the trainer's
protocol).

Executors: ``local`` (default) trains the runs on a pool of local processes; ``ray``
sends each run to a Ray cluster as a task (``pip install 'equimodal[distributed]'``).
A Ray task trains in a temporary folder on its worker and returns the run folder's files,
which the driver writes into ``OUT`` (``metrics.json`` last), so the cluster needs no
shared file system; the relative-EDM cache (``OUT/<dataset>/.standalone/``) travels with
the tasks both ways. ``slurm`` submits the runs to SLURM as one job array through submitit
(``pip install 'equimodal[slurm]'``); SLURM clusters share a file system, so each job
trains straight into its folder under ``OUT`` as a local worker does (same resume, same
cache), and submitit's files and the jobs' logs go to ``OUT/.slurm/``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from equimodal.config import (
    ConfigError,
    RunConfig,
    apply_override,
    build_config,
    dump_config,
    load_yaml,
)

BENCH_KEYS = {"seeds", "reference", "base", "datasets", "methods", "robustness", "tune"}
TUNE_KEYS = {"seeds", "budget", "grid"}
EXECUTORS = ("local", "ray", "slurm")
RAY_HINT = "pip install 'equimodal[distributed]' (or pip install ray)"
SLURM_HINT = "pip install 'equimodal[slurm]' (or pip install submitit)"
# submitit's clusters: ``local`` and ``debug`` run the same code on this machine (tests)
SLURM_CLUSTERS = ("slurm", "local", "debug")


@dataclass(frozen=True)
class BenchRun:
    """One cell of the grid."""

    dataset: str
    label: str
    seed: int
    config: dict[str, Any]
    run_dir: Path


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _seed_list(path: str | Path, where: str, seeds: Any) -> list[int]:
    """``seeds`` if it is a non-empty list of integers >= 0; ConfigError otherwise."""
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and s >= 0 for s in seeds)
    ):
        raise ConfigError(
            f"bench file {str(path)!r}: {where} must be a non-empty list of integers >= 0"
        )
    return seeds


def _method_label(method: dict[str, Any]) -> str:
    """A method's label: its own, else its strategy's name."""
    strategy = method["strategy"]
    return method.get("label") or (strategy if isinstance(strategy, str) else strategy.get("name"))


def load_bench(
    path: str | Path,
    out_dir: str | Path,
    chosen: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> tuple[list[BenchRun], str | None]:
    """Expand a bench file into its runs (validated) and the reference label.

    ``chosen`` maps (dataset, label) to the settings tuning chose (dotted key paths), which
    every evaluation run of that method on that dataset gets.
    """
    spec = load_yaml(path)
    unknown = set(spec) - BENCH_KEYS
    if unknown:
        raise ConfigError(
            f"bench file {str(path)!r}: unknown key {sorted(unknown)[0]!r}; "
            f"valid keys: {', '.join(sorted(BENCH_KEYS))}"
        )
    seeds = _seed_list(path, "seeds", spec.get("seeds", [0]))
    datasets = [d if isinstance(d, dict) else {"name": d} for d in spec.get("datasets", [])]
    for d in datasets:
        extra = set(d) - {"name", "options", "settings"}
        if "name" not in d or extra:
            raise ConfigError(
                f"bench file {str(path)!r}: a dataset entry takes name, options and settings"
                + (f", not {sorted(extra)[0]!r}" if extra else "; this one has no name")
            )
    methods = spec.get("methods", [])
    if not datasets or not methods:
        raise ConfigError(f"bench file {str(path)!r} needs at least one dataset and one method")
    base = spec.get("base", {}) or {}
    labels = []
    runs = []
    for method in methods:
        if not isinstance(method, dict) or "strategy" not in method:
            raise ConfigError(f"bench file {str(path)!r}: every method needs a 'strategy' section")
        label = _method_label(method)
        method = {k: v for k, v in method.items() if k not in ("tune", "label")}
        if label in labels:
            raise ConfigError(f"bench file {str(path)!r}: method label {label!r} is used twice")
        labels.append(label)
        for dataset in datasets:
            for seed in seeds:
                settings = dataset.get("settings") or {}
                entry = {k: v for k, v in dataset.items() if k != "settings"}
                tree = _merge(
                    _merge(_merge(base, settings), method),
                    {"dataset": entry, "seed": seed, "name": label},
                )
                tree = with_settings(tree, (chosen or {}).get((dataset["name"], label), {}))
                try:
                    build_config(tree)
                except ConfigError as err:
                    raise ConfigError(
                        f"bench file {str(path)!r}, method {label!r}: {err}"
                    ) from None
                run_dir = Path(out_dir) / dataset["name"] / f"{label}-s{seed}"
                runs.append(BenchRun(dataset["name"], label, seed, tree, run_dir))
    reference = spec.get("reference")
    if reference is not None and reference not in labels:
        raise ConfigError(
            f"bench file {str(path)!r}: reference {reference!r} is not a method label "
            f"({', '.join(labels)})"
        )
    return runs, reference


# ------------------------------------------------------------------ tuning
@dataclass(frozen=True)
class Trial:
    """One grid point of one method on one dataset: its settings (dotted key paths)."""

    dataset: str
    label: str
    index: int
    settings: dict[str, Any]


def with_settings(tree: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with each ``key.path: value`` of ``settings`` set (a deep copy)."""
    out = copy.deepcopy(tree)
    for key, value in settings.items():
        apply_override(out, key.split("."), copy.deepcopy(value))
    return out


def _grid(path: str | Path, where: str, grid: Any) -> list[dict[str, Any]]:
    """The points of ``{key.path: [values]}`` in row-major order."""
    if grid is None:
        return [{}]
    if not isinstance(grid, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and v for k, v in grid.items()
    ):
        raise ConfigError(
            f"bench file {str(path)!r}: {where} must map key paths to non-empty lists of values"
        )
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def load_tuning(path: str | Path, out_dir: str | Path) -> tuple[list[Trial], list[BenchRun]]:
    """The trials of the bench file's ``tune`` section and their runs (none without one).

    ``tune: {seeds: [...], budget: N, grid: {key.path: [values]}}`` is shared by every
    method; a method's own ``tune: {key.path: [values]}`` multiplies it. Every method gets
    the same number of trials: ``budget`` grid points (a seeded sample when its grid is
    larger; an error when smaller), or, without a budget, its whole grid, which must then
    have the same size for every method. Each trial trains on every tuning seed with
    ``train.score_test: false`` (test is never read) and no relative EDM, into
    ``OUT/tuning/<dataset>/<label>/t<k>-s<seed>/``.
    """
    spec = load_yaml(path)
    tune = spec.get("tune")
    if tune is None:
        return [], []
    if not isinstance(tune, dict) or set(tune) - TUNE_KEYS:
        raise ConfigError(f"bench file {str(path)!r}: tune takes {', '.join(sorted(TUNE_KEYS))}")
    seeds = _seed_list(path, "tune.seeds", tune.get("seeds"))
    overlap = set(seeds) & set(spec.get("seeds", [0]))
    if overlap:
        raise ConfigError(
            f"bench file {str(path)!r}: tuning seed {sorted(overlap)[0]} is also an evaluation "
            "seed; tune on other seeds"
        )
    budget = tune.get("budget")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"bench file {str(path)!r}: tune.budget must be an integer >= 1")
    shared = _grid(path, "tune.grid", tune.get("grid"))
    base_runs, _ = load_bench(path, out_dir)
    trees = {(r.dataset, r.label): r.config for r in base_runs}
    points: dict[str, list[dict[str, Any]]] = {}
    for method in spec.get("methods", []):
        label = _method_label(method)
        own = _grid(path, f"method {label!r} tune", method.get("tune"))
        grid = [{**a, **b} for a in shared for b in own]
        if budget is not None:
            if len(grid) < budget:
                raise ConfigError(
                    f"bench file {str(path)!r}: method {label!r} has {len(grid)} grid points, "
                    f"fewer than tune.budget {budget}"
                )
            rng = random.Random(zlib.crc32(label.encode()))
            keep = sorted(rng.sample(range(len(grid)), budget))
            grid = [grid[k] for k in keep]
        points[label] = grid
    sizes = {len(g) for g in points.values()}
    if len(sizes) > 1:
        detail = ", ".join(f"{k}: {len(v)}" for k, v in points.items())
        raise ConfigError(
            f"bench file {str(path)!r}: methods would get different tuning budgets ({detail} "
            "trials); give tune.budget"
        )
    trials, runs = [], []
    for (dataset, label), tree in trees.items():
        for k, settings in enumerate(points[label]):
            trials.append(Trial(dataset, label, k, settings))
            for seed in seeds:
                config = with_settings(tree, settings)
                config = _merge(
                    config,
                    {"seed": seed, "train": {"score_test": False, "relative_edm": False}},
                )
                try:
                    build_config(config)
                except ConfigError as err:
                    raise ConfigError(
                        f"bench file {str(path)!r}, method {label!r}, tuning {settings}: {err}"
                    ) from None
                run_dir = Path(out_dir) / "tuning" / dataset / label / f"t{k}-s{seed}"
                runs.append(BenchRun(dataset, f"{label}#t{k}", seed, config, run_dir))
    return trials, runs


def choose_settings(
    trials: list[Trial], runs: list[BenchRun]
) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    """Each (dataset, method)'s trial with the best mean validation accuracy over the
    tuning seeds (ties: the earlier grid point); returns the choices and the record
    (every trial's validation scores) that ``tuning.json`` holds. Only validation is read.
    """
    by_trial: dict[tuple[str, str, int], dict[int, float]] = {}
    for run in runs:
        label, k = run.label.rsplit("#t", 1)
        metrics = json.loads((run.run_dir / "metrics.json").read_text(encoding="utf-8"))
        by_trial.setdefault((run.dataset, label, int(k)), {})[run.seed] = float(
            metrics["val"]["accuracy"]
        )
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    record: dict[str, Any] = {}
    for trial in trials:
        scores = by_trial.get((trial.dataset, trial.label, trial.index), {})
        entry = record.setdefault(trial.dataset, {}).setdefault(
            trial.label, {"trials": [], "chosen": None}
        )
        mean = sum(scores.values()) / len(scores) if scores else float("nan")
        entry["trials"].append(
            {"settings": trial.settings, "val_accuracy": scores, "mean_val_accuracy": mean}
        )
    for dataset, methods in record.items():
        for label, entry in methods.items():
            means = [t["mean_val_accuracy"] for t in entry["trials"]]
            valid = [i for i, m in enumerate(means) if m == m]  # not NaN: the trial finished
            if not valid:
                continue
            best = max(valid, key=lambda i: (means[i], -i))
            entry["chosen"] = best
            chosen[(dataset, label)] = entry["trials"][best]["settings"]
    return chosen, record


def run_one(config: dict[str, Any], run_dir: str, threads: int) -> str:
    """Train one run into ``run_dir`` (in a worker process); returns the folder."""
    import torch

    from equimodal.analysis.relative_edm import fit_run
    from equimodal.engine.runs import write_error_log
    from equimodal.engine.trainer import Trainer

    torch.set_num_threads(threads)
    cfg: RunConfig = build_config(config)
    path = Path(run_dir)
    resume = can_resume(path, cfg)
    if path.exists() and not resume:
        shutil.rmtree(path)  # a killed run that had not finished an epoch, or another config
    path.mkdir(parents=True, exist_ok=True)
    try:
        fit_run(Trainer(cfg, run_dir=path, progress=False, resume=resume))
    except BaseException as exc:
        if (path / "checkpoints" / "last.safetensors").is_file():
            # an epoch finished: keep it (the next bench resumes it) and say what failed
            write_error_log(path, exc)
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return run_dir


def can_resume(path: Path, cfg: RunConfig) -> bool:
    """Whether ``path`` holds a killed run of ``cfg`` with a complete epoch to resume from."""
    try:
        same = (path / "config.yaml").read_text() == dump_config(cfg)
    except OSError:
        return False
    return same and (path / "checkpoints" / "last.safetensors").is_file()


def bench_wants_robustness(path: str | Path) -> bool:
    """Whether the bench file asks for robustness columns (``robustness: true``)."""
    value = load_yaml(path).get("robustness", False)
    if not isinstance(value, bool):
        raise ConfigError(f"bench file {str(path)!r}: robustness must be true or false")
    return value


def add_robustness(runs: list[BenchRun], draws: int = 5) -> int:
    """Score each finished run without ``robustness/robustness.json``; returns how many."""
    from equimodal.engine.trainer import load_run
    from equimodal.evaluation.robustness import evaluate_robustness, write_robustness

    done = 0
    for run in runs:
        target = run.run_dir / "robustness" / "robustness.json"
        if not (run.run_dir / "metrics.json").is_file() or target.is_file():
            continue
        cfg, model, strategy, data = load_run(run.run_dir)
        result = evaluate_robustness(
            model, data.test, strategy.inference_kwargs(), draws=draws, seed=cfg.seed
        )
        write_robustness(result, run.run_dir / "robustness")
        done += 1
    return done


def pending(runs: list[BenchRun]) -> list[BenchRun]:
    """The runs without a finished ``metrics.json``."""
    return [r for r in runs if not (r.run_dir / "metrics.json").is_file()]


def execute(
    runs: list[BenchRun],
    jobs: int = 1,
    on_done: Callable[[BenchRun, BaseException | None], None] | None = None,
    executor: str = "local",
    address: str | None = None,
    ray_options: dict[str, Any] | None = None,
    slurm_options: dict[str, Any] | None = None,
    slurm_folder: str | Path | None = None,
) -> list[tuple[BenchRun, BaseException]]:
    """Run the pending runs; returns the failures.

    ``executor`` ``local`` uses a pool of ``jobs`` local processes; ``ray`` sends each run
    to the Ray cluster at ``address`` (None: the one this process is connected to, else a
    new local one) as a task with ``ray_options`` (default ``{"num_cpus": 1}``; e.g.
    ``{"num_gpus": 1}``); ``slurm`` submits them as one SLURM job array through submitit
    (:func:`_execute_slurm`: ``slurm_options`` are submitit's parameters, logs go to
    ``slurm_folder``). Every way finished runs are skipped and the run folders hold the
    same files.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    todo = pending(runs)
    failures: list[tuple[BenchRun, BaseException]] = []
    if not todo:
        return failures
    if executor == "ray":
        return _execute_ray(todo, address, ray_options, on_done)
    if executor == "slurm":
        return _execute_slurm(todo, slurm_options, slurm_folder, on_done)
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(jobs, 1))
    if jobs <= 1:
        for run in todo:
            try:
                run_one(run.config, str(run.run_dir), threads)
                error = None
            except Exception as exc:  # one failed run must not stop the grid
                failures.append((run, exc))
                error = exc
            if on_done:
                on_done(run, error)
        return failures
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, r.config, str(r.run_dir), threads): r for r in todo}
        for future in as_completed(futures):
            run = futures[future]
            error = future.exception()
            if error is not None:
                failures.append((run, error))
            if on_done:
                on_done(run, error)
    return failures


def require_ray() -> Any:
    """The ``ray`` module, or ImportError with the install hint."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"the ray executor needs Ray: {RAY_HINT}") from None
    return ray


def _read_files(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write_files(folder: Path, files: dict[str, bytes], last: str | None = None) -> None:
    from equimodal.core.files import write_bytes_atomic

    names = sorted(files, key=lambda n: n == last)  # ``last`` after every other file
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, files[name])


def run_remote(
    config: dict[str, Any], name: str, threads: int, standalone: dict[str, bytes]
) -> dict[str, dict[str, bytes]]:
    """Train one run in a temporary folder (on a Ray worker); returns its files.

    ``standalone`` seeds the relative-EDM cache; the return value holds the run folder's
    files (``run``) and the cache afterwards (``standalone``).
    """
    with tempfile.TemporaryDirectory(prefix="equimodal-") as tmp:
        root = Path(tmp)
        _write_files(root / ".standalone", standalone)
        run_dir = root / name
        run_one(config, str(run_dir), threads)
        return {"run": _read_files(run_dir), "standalone": _read_files(root / ".standalone")}


def _execute_ray(
    todo: list[BenchRun],
    address: str | None,
    ray_options: dict[str, Any] | None,
    on_done: Callable[[BenchRun, BaseException | None], None] | None,
) -> list[tuple[BenchRun, BaseException]]:
    ray = require_ray()
    options = {"num_cpus": 1, **(ray_options or {})}
    threads = max(1, int(options.get("num_cpus") or 1))
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    failures: list[tuple[BenchRun, BaseException]] = []
    try:
        task = ray.remote(run_remote).options(**options)
        refs = {}
        for run in todo:
            cache = _read_files(run.run_dir.parent / ".standalone")
            refs[task.remote(run.config, run.run_dir.name, threads, cache)] = run
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                run = refs.pop(ref)
                error: BaseException | None = None
                try:
                    files = ray.get(ref)
                    if run.run_dir.exists():
                        shutil.rmtree(run.run_dir)  # a partial folder of a killed bench
                    _write_files(run.run_dir, files["run"], last="metrics.json")
                    cache_dir = run.run_dir.parent / ".standalone"
                    known = set(_read_files(cache_dir))
                    _write_files(
                        cache_dir, {k: v for k, v in files["standalone"].items() if k not in known}
                    )
                except Exception as exc:  # one failed run must not stop the grid
                    error = getattr(exc, "cause", None) or exc
                    failures.append((run, error))
                if on_done:
                    on_done(run, error)
    finally:
        if started:
            ray.shutdown()
    return failures


def require_submitit() -> Any:
    """The ``submitit`` module, or ImportError with the install hint."""
    try:
        import submitit
    except ImportError:
        raise ImportError(f"the slurm executor needs submitit: {SLURM_HINT}") from None
    return submitit


def _execute_slurm(
    todo: list[BenchRun],
    slurm_options: dict[str, Any] | None,
    folder: str | Path | None,
    on_done: Callable[[BenchRun, BaseException | None], None] | None,
) -> list[tuple[BenchRun, BaseException]]:
    """Submit ``todo`` as one job array (one job per run) and wait for the jobs.

    ``slurm_options`` are submitit ``AutoExecutor`` parameters (``timeout_min``,
    ``cpus_per_task``, ``gpus_per_node``, ``mem_gb``, ``slurm_partition``,
    ``slurm_additional_parameters``, ...) plus ``cluster`` (``slurm``, default, or
    submitit's ``local`` / ``debug``, which run the jobs on this machine) and ``poll_s``
    (how often to look at the jobs; default 10 s on SLURM, 1 s locally). A job trains
    with :func:`run_one` straight into its run folder: the nodes see ``OUT`` through the
    cluster's shared file system, as submitit's ``folder`` must be seen anyway, so resume
    and the relative-EDM cache work as with local workers. Torch threads follow
    ``cpus_per_task`` (default 1).
    """
    submitit = require_submitit()
    from submitit import helpers

    options = {"cpus_per_task": 1, "timeout_min": 60, **(slurm_options or {})}
    cluster = options.pop("cluster", None) or "slurm"
    if cluster not in SLURM_CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; choose one of {', '.join(SLURM_CLUSTERS)}")
    # SLURM is asked through sacct (submitit caches it); the local clusters are cheap to ask
    poll = float(options.pop("poll_s", 10.0 if cluster == "slurm" else 1.0))
    if folder is None:
        folder = Path(os.path.commonpath([str(r.run_dir) for r in todo])) / ".slurm"
    threads = max(1, int(options.get("cpus_per_task") or 1))
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(name="equimodal-bench", **options)
    jobs = executor.map_array(
        run_one,
        [r.config for r in todo],
        [str(r.run_dir) for r in todo],
        [threads] * len(todo),
    )
    by_id = {id(job): run for job, run in zip(jobs, todo, strict=True)}
    failures: list[tuple[BenchRun, BaseException]] = []
    try:
        # debug runs a job when it is asked about, so it is asked in order
        ended = jobs if cluster == "debug" else helpers.as_completed(jobs, poll_frequency=poll)
        for job in ended:
            run = by_id[id(job)]
            error: BaseException | None = None
            try:
                job.result()
            except Exception as exc:  # one failed run must not stop the grid
                error = _job_error(job, exc)
                failures.append((run, error))
            if on_done:
                on_done(run, error)
    except BaseException:
        for job in jobs:  # interrupted (Ctrl-C): cancel what is still queued or running
            with contextlib.suppress(Exception):
                if cluster == "debug" or not job.done():
                    job.cancel(check=False)
        raise
    return failures


def _job_error(job: Any, exc: Exception) -> Exception:
    """A failed job's error in one line: the last line of its traceback and its log."""
    text = str(exc)
    parts = text.split("----------------------")  # submitit: "...trace:", trace, "logs at ..."
    trace = parts[1] if len(parts) >= 3 else text
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    try:
        log = f" (log: {job.paths.stderr})"
    except Exception:  # a job without paths (submitit's debug cluster)
        log = ""
    return RuntimeError(f"{last}{log}")
