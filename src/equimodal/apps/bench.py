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
      - {label: joint, strategy: {name: joint}, model: {fusion: concat}}

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
the tasks both ways.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from equimodal.config import ConfigError, RunConfig, build_config, dump_config, load_yaml

BENCH_KEYS = {"seeds", "reference", "base", "datasets", "methods", "robustness"}
EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'equimodal[distributed]' (or pip install ray)"


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


def load_bench(path: str | Path, out_dir: str | Path) -> tuple[list[BenchRun], str | None]:
    """Expand a bench file into its runs (validated) and the reference label."""
    spec = load_yaml(path)
    unknown = set(spec) - BENCH_KEYS
    if unknown:
        raise ConfigError(
            f"bench file {str(path)!r}: unknown key {sorted(unknown)[0]!r}; "
            f"valid keys: {', '.join(sorted(BENCH_KEYS))}"
        )
    seeds = spec.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and s >= 0 for s in seeds)
    ):
        raise ConfigError(
            f"bench file {str(path)!r}: seeds must be a non-empty list of integers >= 0"
        )
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
        method = dict(method)
        strategy = method["strategy"]
        label = method.pop("label", None) or (
            strategy if isinstance(strategy, str) else strategy.get("name")
        )
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


def run_one(config: dict[str, Any], run_dir: str, threads: int) -> str:
    """Train one run into ``run_dir`` (in a worker process); returns the folder."""
    import torch

    from equimodal.analysis.relative_edm import fit_run
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
    except BaseException:
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
) -> list[tuple[BenchRun, BaseException]]:
    """Run the pending runs; returns the failures.

    ``executor`` ``local`` uses a pool of ``jobs`` local processes; ``ray`` sends each run
    to the Ray cluster at ``address`` (None: the one this process is connected to, else a
    new local one) as a task with ``ray_options`` (default ``{"num_cpus": 1}``; e.g.
    ``{"num_gpus": 1}``). Either way finished runs are skipped and the run folders hold
    the same files.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    todo = pending(runs)
    failures: list[tuple[BenchRun, BaseException]] = []
    if not todo:
        return failures
    if executor == "ray":
        return _execute_ray(todo, address, ray_options, on_done)
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


def paired_p_values(
    metrics: list[dict[str, Any]], reference: str, key: str = "accuracy"
) -> dict[tuple[str, str], float]:
    """Paired t-test over common seeds of each (dataset, label) against the reference label."""
    from scipy.stats import ttest_rel

    by: dict[tuple[str, str], dict[int, float]] = {}
    for m in metrics:
        by.setdefault((m["dataset"], m["run"]), {})[m["seed"]] = m["test"][key]
    out = {}
    for (dataset, label), scores in by.items():
        ref = by.get((dataset, reference))
        if label == reference or ref is None:
            continue
        seeds = sorted(set(scores) & set(ref))
        if len(seeds) < 2:
            continue
        a = [scores[s] for s in seeds]
        b = [ref[s] for s in seeds]
        if a == b:
            out[(dataset, label)] = 1.0
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # near-identical score pairs
            out[(dataset, label)] = float(ttest_rel(a, b).pvalue)
    return out
