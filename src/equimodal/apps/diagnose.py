"""``equimodal diagnose RUN``: which modality is lazy, and by how much.

Collects, for the selected checkpoint of a run: Shapley value and share per modality
(validation and test), EDM and relative EDM, each modality's stand-alone ability (the
cached unimodal runs of relative EDM, else a linear probe on the frozen encoder features),
AGM competition strength (optional: it trains one unimodal model per modality), the
decision-layer diagnostics, per-class accuracy per modality and the robustness table; it
opens with a plain-language summary. Written as ``RUN/diagnose/report.md`` with PNG plots
and as a self-contained ``RUN/diagnose/report.html`` (images embedded).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equimodal.core.files import save_figure


@dataclass
class Diagnosis:
    """Everything the report shows, JSON-ready."""

    run: str
    dataset: str
    strategy: str
    modalities: list[str]
    class_names: list[str]
    splits: dict[str, dict[str, Any]]
    ability: dict[str, float]
    ability_source: str
    decision: dict[str, dict[str, Any]]
    robustness: dict[str, Any]
    competition: dict[str, float] | None = None
    summary: list[str] = field(default_factory=list)


def linear_probe_accuracy(train_z: np.ndarray, train_y: np.ndarray, val_z, val_y) -> float:
    """Validation accuracy of a logistic regression on frozen features."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000)
    probe.fit(train_z, train_y)
    return float((probe.predict(val_z) == val_y).mean())


def plain_summary(d: Diagnosis) -> list[str]:
    """Sentences a reader can act on: the minor modalities, balance, robustness."""
    test = d.splits["test"]
    names = d.modalities
    m = len(names)
    equal = 1.0 / m
    shares = test.get("shapley_share", {})
    out = []
    if shares:
        top = max(shares, key=shares.get)
        out.append(
            f"EDM is {100 * test['edm']:.1f} % (0 % = every modality contributes an equal "
            f"share, 100 % = one modality carries everything); {top} contributes most "
            f"({100 * shares[top]:.0f} % of the test contribution)."
        )
        probe = "linear probe" in d.ability_source
        for name in sorted(names, key=lambda n: shares[n]):
            if shares[name] < 0.75 * equal:
                alone = d.ability.get(name)
                what = "a linear probe on its features" if probe else "a unimodal model of it"
                tail = (
                    f"; {what} reaches {100 * alone:.0f} % validation accuracy"
                    if alone is not None
                    else ""
                )
                out.append(
                    f"{name} is a minor modality: {100 * shares[name]:.0f} % of the contribution "
                    f"against a {100 * equal:.0f} % equal share{tail}."
                )
        if "relative_edm" in test:
            out.append(
                f"Relative EDM is {100 * test['relative_edm']:.1f} %: the distance between the "
                "contribution shares and what each modality achieves on its own."
            )
    removed = d.robustness.get("strongest_removed")
    if removed:
        full, without = d.robustness["full"]["accuracy"], removed["without"]
        change = (
            f"falls from {100 * full:.1f} % to {100 * without:.1f} %"
            if without < full - 0.005
            else f"stays at {100 * without:.1f} % (all modalities: {100 * full:.1f} %)"
        )
        best = removed["modality"]
        out.append(
            f"Without {best} (the best single modality: {100 * removed['alone']:.1f} % test "
            f"accuracy when the model reads only {best}), test accuracy {change}."
        )
    if d.competition:
        worst = max(d.competition, key=d.competition.get)
        out.append(
            f"Competition strength is highest for {worst} ({d.competition[worst]:.2f}): fusion "
            "keeps the least of its own representation."
        )
    return out


def model_decision_diagnostics(model: Any, cache: Any) -> dict[str, dict[str, Any]]:
    """:func:`~equimodal.balance.decision.decision_diagnostics` of a model on cached features."""
    from equimodal.balance.decision import decision_diagnostics

    with torch.no_grad():
        logits = model.unimodal_logits(cache.z)
    return decision_diagnostics(
        cache.z, logits, model.decision_weights(), cache.labels, cache.present
    )


def diagnose_run(
    run_dir: str | Path,
    competition: bool = False,
    draws: int = 5,
    progress: Callable[[str], None] | None = None,
    *,
    data: Any = None,
    encoders: Any = None,
) -> Diagnosis:
    """Measure everything the diagnose report shows for a run's best checkpoint;
    ``progress`` is told each step as it starts (the CLI shows them). ``data`` and
    ``encoders``: what :func:`~equimodal.engine.runs.load_run` needs for a run trained
    on your own data or modules."""
    step = progress or (lambda message: None)
    from equimodal.apps.report import load_metrics
    from equimodal.engine.trainer import load_run

    run_dir = Path(run_dir)
    step("loading the run and its best checkpoint")
    metrics = load_metrics(run_dir)
    cfg, model, strategy, data = load_run(run_dir, data=data, encoders=encoders)
    return diagnose(
        model,
        data,
        strategy,
        seed=cfg.seed,
        draws=draws,
        progress=progress,
        metrics=metrics,
        competition_config=cfg if competition else None,
        run=str(run_dir),
    )


def diagnose(
    model: Any,
    data: Any,
    strategy: Any = None,
    *,
    seed: int = 0,
    draws: int = 5,
    progress: Callable[[str], None] | None = None,
    metrics: dict[str, Any] | None = None,
    competition_config: Any = None,
    run: str = "(model from Python)",
) -> Diagnosis:
    """Diagnose a trained ``model`` on ``data`` (a :class:`MultimodalData`) directly.

    ``strategy`` (the trained one, e.g. ``TrainResult.strategy``) sets how the model
    predicts (its inference options); None predicts with the defaults. ``metrics`` of
    the run, when known, supply relative EDM and the cached stand-alone abilities;
    otherwise a linear probe on the frozen features measures each modality's ability.
    ``competition_config`` (the run's config) also measures competition strength, which
    trains one unimodal model per modality. The model is moved to the CPU.
    """
    step = progress or (lambda message: None)
    from equimodal.engine.validation import class_prior, encode_split, evaluate_cache
    from equimodal.evaluation.robustness import evaluate_robustness

    metrics = metrics or {}
    model.cpu().eval()
    prior = class_prior(data.train.labels, data.num_classes)
    inference = strategy.inference_kwargs() if strategy is not None else {}
    step("encoding the train, validation and test splits")
    caches = {name: encode_split(model, data.split(name)) for name in ("train", "val", "test")}
    step("Shapley values and EDM on validation and test")
    splits = {}
    for name in ("val", "test"):
        report = evaluate_cache(
            model, caches[name], name, prior, inference=inference, seed=seed
        ).to_dict()
        for key in ("relative_edm", "capability_share"):
            if key in metrics.get(name, {}):
                report[key] = metrics[name][key]
        splits[name] = report
    ability = metrics.get("test", {}).get("standalone_val_accuracy")
    source = "validation accuracy of a unimodal model per modality (cached runs)"
    if not ability:
        source = "validation accuracy of a linear probe on the frozen encoder features"
        step("stand-alone abilities: a linear probe per modality")
        ability = {}
        for m in model.modalities:
            tr, va = caches["train"], caches["val"]
            rows_tr, rows_va = tr.present[m], va.present[m]
            ability[m] = linear_probe_accuracy(
                tr.z[m][rows_tr].numpy(),
                tr.labels[rows_tr].numpy(),
                va.z[m][rows_va].numpy(),
                va.labels[rows_va].numpy(),
            )
    decision: dict[str, dict[str, Any]] = {}
    # a fusion without per-modality logits has no decision layer to diagnose
    with contextlib.suppress(AttributeError, NotImplementedError):
        decision = model_decision_diagnostics(model, caches["test"])
    step(f"robustness: missing modalities and noise, {draws} draw(s) each")
    robustness = evaluate_robustness(model, data.test, inference, draws=draws, seed=seed).to_dict()
    strength = None
    if competition_config is not None:
        from equimodal.analysis.competition import measure_competition

        step("competition strength: one unimodal model per modality")
        strength = measure_competition(competition_config, model, inference, data)
    d = Diagnosis(
        run=run,
        dataset=data.info.name,
        strategy=strategy.name if strategy is not None else "(unknown)",
        modalities=list(model.modalities),
        class_names=list(data.info.class_names) or [str(c) for c in range(data.num_classes)],
        splits=splits,
        ability=ability,
        ability_source=source,
        decision=decision,
        robustness=robustness,
        competition=strength,
    )
    d.summary = plain_summary(d)
    return d


# --------------------------------------------------------------------------- figures
def _figures(d: Diagnosis, out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from equimodal.evaluation.robustness import RobustnessResult, plot_robustness

    figures = []
    names = d.modalities
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.27
    for k, split in enumerate(("val", "test")):
        shares = d.splits[split].get("shapley_share", {})
        ax.bar(x + (k - 1) * width, [100 * shares.get(n, 0) for n in names], width, label=split)
    cap = d.splits["test"].get("capability_share")
    if cap:
        ax.bar(x + width, [100 * cap[n] for n in names], width, label="stand-alone share")
    ax.axhline(100 / len(names), color="gray", ls="--", lw=1, label="equal share")
    ax.set_xticks(x, names)
    ax.set(ylabel="share of contribution %", title="Shapley share per modality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.append(("Shapley share per modality", out / "shares.png"))
    save_figure(fig, figures[-1][1], dpi=110)
    plt.close(fig)

    if d.decision:
        fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.0))
        for a, key, title in zip(
            axes,
            ("feature_norm", "weight_norm", "true_logit_share"),
            ("mean feature norm", "decision weight norm", "share of the true-class logit"),
            strict=True,
        ):
            a.bar(names, [d.decision[n][key] for n in names], color="tab:purple")
            a.set_title(title, fontsize=9)
            a.tick_params(axis="x", labelrotation=45)
        fig.tight_layout()
        figures.append(("Decision layer", out / "decision.png"))
        save_figure(fig, figures[-1][1], dpi=110)
        plt.close(fig)

        grid = np.array(
            [
                [
                    np.nan if v is None else 100 * v
                    for v in d.decision[n]["accuracy_per_class"].values()
                ]
                for n in names
            ]
        )
        fig = per_class_figure(grid, names, d.class_names)
        figures.append(("Per-class accuracy per modality", out / "per_class.png"))
        save_figure(fig, figures[-1][1], dpi=110)
        plt.close(fig)

    rob = RobustnessResult(
        modalities=d.robustness["modalities"],
        full=d.robustness["full"],
        subsets=d.robustness["subsets"],
        missing=d.robustness["missing"],
        noise=d.robustness["noise"],
        draws=d.robustness["draws"],
    )
    figures.append(("Robustness", plot_robustness(rob, out / "robustness.png")))
    return figures


def per_class_figure(grid: np.ndarray, names: list[str], class_names: list[str]) -> Any:
    """Heatmap of accuracy % (rows: modalities, columns: classes), each cell labelled with
    its value (``-``: no test sample of that class)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.5 * grid.shape[1] + 2.5, 0.4 * len(names) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i, j in np.ndindex(grid.shape):
        value = grid[i, j]
        ax.text(
            j,
            i,
            "-" if np.isnan(value) else f"{value:.0f}",
            ha="center",
            va="center",
            fontsize=6,
            # viridis is dark below about 60 %, light above (a missing cell is blank)
            color="white" if value < 60 else "black",
        )
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(grid.shape[1]), class_names, rotation=45, ha="right", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy %")
    ax.set_title("per-class accuracy of each modality's own logits (test)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- rendering
def _tables(d: Diagnosis) -> list[tuple[str, list[str], list[list[str]]]]:
    names = d.modalities
    rows = []
    for n in names:
        row = [n]
        for split in ("val", "test"):
            s = d.splits[split]
            row += [
                f"{s.get('shapley', {}).get(n, float('nan')):.4f}",
                f"{100 * s.get('shapley_share', {}).get(n, float('nan')):.1f}",
            ]
        row.append(f"{100 * d.ability[n]:.1f}" if n in d.ability else "-")
        if d.competition:
            row.append(f"{d.competition[n]:.3f}")
        rows.append(row)
    head = ["modality", "Shapley (val)", "share % (val)", "Shapley (test)", "share % (test)"]
    head.append("stand-alone accuracy %")
    if d.competition:
        head.append("competition strength")
    tables = [("Contributions", head, rows)]
    bal = []
    for split in ("val", "test"):
        s = d.splits[split]
        rel = s.get("relative_edm")
        bal.append(
            [
                split,
                f"{100 * s['accuracy']:.2f}",
                f"{100 * s['macro_f1']:.2f}",
                f"{100 * s['edm']:.1f}" if "edm" in s else "-",
                "-" if rel is None else f"{100 * rel:.1f}",
            ]
        )
    tables.append(
        ("Balance", ["split", "accuracy %", "macro-F1 %", "EDM %", "relative EDM %"], bal)
    )
    if d.decision:
        dec = [
            [
                n,
                f"{d.decision[n]['feature_norm']:.2f}",
                f"{d.decision[n]['weight_norm']:.2f}",
                f"{d.decision[n]['logit_norm']:.2f}",
                f"{100 * d.decision[n]['true_logit_share']:.1f}",
                f"{100 * d.decision[n]['accuracy']:.1f}",
            ]
            for n in names
        ]
        tables.append(
            (
                "Decision layer (test)",
                [
                    "modality",
                    "feature norm",
                    "weight norm",
                    "logit norm",
                    "true-logit share %",
                    "own-logit accuracy %",
                ],
                dec,
            )
        )
    rob = d.robustness

    def spread(r: dict[str, Any]) -> str:  # one draw has no spread to show
        return "" if rob.get("draws", 2) < 2 else f" ± {100 * r['accuracy_std']:.2f}"

    rrows = [["all modalities", f"{100 * rob['full']['accuracy']:.2f}"]]
    rrows += [
        [f"missing rate {r['eta']:g}", f"{100 * r['accuracy']:.2f}{spread(r)}"]
        for r in rob["missing"]
    ]
    rrows += [
        [f"noise σ {r['sigma']:g}", f"{100 * r['accuracy']:.2f}{spread(r)}"] for r in rob["noise"]
    ]
    for s in rob["subsets"]:
        if len(s["modalities"]) in (1, len(names) - 1) and len(names) > 1:
            rrows.append([f"only {', '.join(s['modalities'])}", f"{100 * s['accuracy']:.2f}"])
    tables.append(("Robustness (test)", ["condition", "accuracy %"], rrows))
    return tables


def render_markdown(d: Diagnosis, figures: list[tuple[str, Path]], root: Path) -> str:
    """The report as Markdown (figures linked relative to ``root``)."""
    lines = [f"# Diagnosis: {d.run}", "", f"{d.dataset}, strategy {d.strategy}.", ""]
    lines += ["## Summary", ""] + [f"- {s}" for s in d.summary] + [""]
    for title, head, rows in _tables(d):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += [f"Stand-alone ability: {d.ability_source}.", "", "## Figures", ""]
    lines += [f"![{t}]({p.relative_to(root).as_posix()})\n" for t, p in figures]
    return "\n".join(lines)


def render_html(d: Diagnosis, figures: list[tuple[str, Path]]) -> str:
    """The report as one self-contained HTML page (images embedded as data URIs)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>equimodal diagnosis: {esc(d.run)}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
        "img{max-width:100%}.summary li{margin:0.3em 0}</style></head><body>",
        f"<h1>Diagnosis: {esc(d.run)}</h1>",
        f"<p>{esc(d.dataset)}, strategy {esc(d.strategy)}.</p>",
        '<h2>Summary</h2><ul class="summary">',
        *[f"<li>{esc(s)}</li>" for s in d.summary],
        "</ul>",
    ]
    for title, head, rows in _tables(d):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>")
        parts += [f"<th>{esc(h)}</th>" for h in head]
        parts.append("</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
        parts.append("</table>")
    parts.append(f"<p>Stand-alone ability: {esc(d.ability_source)}.</p><h2>Figures</h2>")
    for title, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(title)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_diagnosis(d: Diagnosis, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html, diagnosis.json and the PNGs into ``out_dir``.

    The folder is written whole, under a temporary name renamed at the end: a failure (a
    full disk) leaves the previous report, or none, never part of one.
    """
    from equimodal.core.files import atomic_output, dumps_json, write_text_atomic

    final = Path(out_dir)
    names = {"markdown": "report.md", "html": "report.html", "json": "diagnosis.json"}
    with atomic_output(final) as out:
        out.mkdir(parents=True)
        figures = _figures(d, out)
        write_text_atomic(out / names["markdown"], render_markdown(d, figures, out))
        write_text_atomic(out / names["html"], render_html(d, figures))
        payload = {k: v for k, v in d.__dict__.items()}
        plain = json.loads(json.dumps(payload, default=_jsonable))  # NaN/inf become null
        write_text_atomic(out / names["json"], dumps_json(plain, indent=1))
    return {key: final / name for key, name in names.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
