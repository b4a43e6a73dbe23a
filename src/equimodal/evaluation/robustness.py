"""Robustness of a trained model to missing and noisy modalities (test split).

Three protocols, each scored with the run's own way of predicting (its strategy's
inference options):

* **subsets** — the model reads only a non-empty subset of its modalities (every subset);
* **missing** — each (sample, modality) pair is dropped with probability ``eta``, at least
  one modality kept per sample (the CPM-Nets protocol: a sample that lost all keeps one of
  them at random); several draws, mean and standard deviation;
* **noise** — Gaussian noise of standard deviation ``sigma`` (the features are
  standardised) added to the inputs of half of the modalities (at least one) of a random
  half of the samples; several draws. Only floating-point inputs get noise: text bytes
  are left as they are, and so is the validity column of a feature sequence.

Absence travels as the present masks, so every fusion handles it its own documented way.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

from equimodal.core.files import save_figure
from equimodal.data.custom import as_split
from equimodal.data.missing import drop_modalities
from equimodal.engine.validation import FeatureCache, encode_split, predict_logits
from equimodal.models.model import MultimodalModel

ETAS = (0.1, 0.2, 0.3, 0.4, 0.5)
SIGMAS = (0.5, 1.0, 5.0)


@dataclass
class RobustnessResult:
    """Accuracy (and macro-F1) of one model under every protocol."""

    modalities: list[str]
    full: dict[str, float]
    subsets: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    noise: list[dict[str, Any]] = field(default_factory=list)
    draws: int = 5

    def strongest_removed(self) -> dict[str, Any]:
        """The modality best on its own in this model, and the accuracy without it."""
        alone = {
            s["modalities"][0]: s["accuracy"] for s in self.subsets if len(s["modalities"]) == 1
        }
        strongest = max(alone, key=alone.get)
        rest = [m for m in self.modalities if m != strongest]
        without = next(s for s in self.subsets if s["modalities"] == rest)
        return {"modality": strongest, "alone": alone[strongest], "without": without["accuracy"]}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if len(self.modalities) > 1:
            out["strongest_removed"] = self.strongest_removed()
        return out


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(1)
    return {
        "accuracy": float((pred == labels).float().mean()),
        "macro_f1": float(
            f1_score(labels.cpu().numpy(), pred.cpu().numpy(), average="macro", zero_division=0)
        ),
    }


def _noisy_cache(
    model: MultimodalModel,
    split: Any,
    sigma: float,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device | str,
) -> FeatureCache:
    """Encode ``split`` with noise on half the modalities of a random half of the samples."""
    names = list(model.modalities)
    kinds = {spec.name: spec.kind for spec in model.specs}
    n = len(split)
    chosen = torch.zeros(n, len(names), dtype=torch.bool)
    rows = torch.randperm(n, generator=generator)[: n // 2]
    k = max(1, len(names) // 2)
    for r in rows.tolist():
        chosen[r, torch.randperm(len(names), generator=generator)[:k]] = True
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    start = 0
    with torch.no_grad():
        for batch in split.batches(batch_size):
            batch = batch.to(device)
            b = len(batch)
            for i, m in enumerate(names):
                x = batch.inputs[m]
                if x.is_floating_point():
                    mask = chosen[start : start + b, i].to(x.device)
                    noise = torch.randn(x.shape, generator=generator).to(x.device) * sigma
                    if kinds[m] == "sequence":
                        noise[..., -1] = 0.0  # the validity column marks padding, not data
                    x = x + noise * mask.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
                parts[m].append(model.encode_modality(m, x))
            start += b
    model.train(was_training)
    return FeatureCache(
        z={m: torch.cat(v) for m, v in parts.items()},
        present={m: split.present[m].to(device) for m in names},
        labels=split.labels.to(device),
    )


def evaluate_robustness(
    model: MultimodalModel,
    split: Any,
    inference: Mapping[str, Any] | None = None,
    etas: Sequence[float] = ETAS,
    sigmas: Sequence[float] = SIGMAS,
    draws: int = 5,
    seed: int = 0,
    batch_size: int = 2048,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> RobustnessResult:
    """Score ``model`` on ``split`` under every subset, missing rate and noise level;
    ``progress`` is told each group of conditions as it starts (the CLI shows them).

    ``split`` is a split of a :class:`~equimodal.data.base.MultimodalData` or your own
    data in any form :func:`equimodal.data.custom.as_split` takes; ``inference`` is the
    trained strategy's ``inference_kwargs()`` (None: the model's defaults).
    """
    step = progress or (lambda message: None)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    split = as_split(split, "split")  # also tensors, a dataset or a DataLoader of yours
    inference = dict(inference or {})
    readable = inference.pop("modalities", None)
    names = [m for m in model.modalities if readable is None or m in readable]
    cache = encode_split(model, split, batch_size=batch_size, device=device)
    labels = cache.labels

    def score(c: FeatureCache, members: Sequence[str] | None = None) -> dict[str, float]:
        logits = predict_logits(model, c, modalities=members or names, **inference)
        return _scores(logits, labels)

    step("all modalities and every subset of them")
    result = RobustnessResult(modalities=names, full=score(cache), draws=draws)
    for size in range(1, len(names) + 1):
        for members in itertools.combinations(names, size):
            result.subsets.append({"modalities": list(members), **score(cache, members)})
    for eta in etas:
        step(f"missing rate {eta:g}, {draws} draw(s)")
        generator = torch.Generator().manual_seed(seed * 7919 + int(round(eta * 1000)))
        accs, f1s = [], []
        for _ in range(draws):
            masked = FeatureCache(cache.z, drop_modalities(cache.present, eta, generator), labels)
            s = score(masked)
            accs.append(s["accuracy"])
            f1s.append(s["macro_f1"])
        result.missing.append(_summary("eta", eta, accs, f1s))
    for sigma in sigmas:
        step(f"noise sigma {sigma:g}, {draws} draw(s)")
        generator = torch.Generator().manual_seed(seed * 104729 + int(round(sigma * 1000)))
        accs, f1s = [], []
        for _ in range(draws):
            s = score(_noisy_cache(model, split, sigma, generator, batch_size, device))
            accs.append(s["accuracy"])
            f1s.append(s["macro_f1"])
        result.noise.append(_summary("sigma", sigma, accs, f1s))
    return result


def _summary(key: str, level: float, accs: list[float], f1s: list[float]) -> dict[str, Any]:
    def std(v: list[float]) -> float:
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    return {
        key: level,
        "accuracy": float(np.mean(accs)),
        "accuracy_std": std(accs),
        "macro_f1": float(np.mean(f1s)),
        "macro_f1_std": std(f1s),
        "draws": accs,
    }


def robustness_markdown(result: RobustnessResult) -> str:
    """The result as Markdown tables (percentages)."""

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    lines = [
        f"All modalities: accuracy {pct(result.full['accuracy'])} %, "
        f"macro-F1 {pct(result.full['macro_f1'])} %.",
        "",
        "| modalities read | accuracy % | macro-F1 % |",
        "|---|---|---|",
    ]
    for s in sorted(result.subsets, key=lambda s: (len(s["modalities"]), s["modalities"])):
        lines.append(
            f"| {', '.join(s['modalities'])} | {pct(s['accuracy'])} | {pct(s['macro_f1'])} |"
        )
    if len(result.modalities) > 1:
        sr = result.strongest_removed()
        lines += [
            "",
            f"Strongest modality on its own: {sr['modality']} ({pct(sr['alone'])} %); "
            f"without it: {pct(sr['without'])} %.",
        ]
    lines += [
        "",
        f"| missing rate eta | accuracy % (mean ± std over {result.draws} draws) | macro-F1 % |",
        "|---|---|---|",
    ]
    for r in result.missing:
        lines.append(
            f"| {r['eta']:g} | {pct(r['accuracy'])} ± {pct(r['accuracy_std'])} "
            f"| {pct(r['macro_f1'])} ± {pct(r['macro_f1_std'])} |"
        )
    lines += [
        "",
        "| noise sigma (half the modalities of half the samples) | accuracy % | macro-F1 % |",
        "|---|---|---|",
    ]
    for r in result.noise:
        lines.append(
            f"| {r['sigma']:g} | {pct(r['accuracy'])} ± {pct(r['accuracy_std'])} "
            f"| {pct(r['macro_f1'])} ± {pct(r['macro_f1_std'])} |"
        )
    return "\n".join(lines) + "\n"


def robustness_csv(result: RobustnessResult) -> str:
    """One row per condition: protocol, level, accuracy mean/std, macro-F1 mean/std."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["protocol", "level", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std"])
    w.writerow(["full", "", result.full["accuracy"], 0.0, result.full["macro_f1"], 0.0])
    for s in result.subsets:
        w.writerow(["subset", "+".join(s["modalities"]), s["accuracy"], 0.0, s["macro_f1"], 0.0])
    for key, rows in (("eta", result.missing), ("sigma", result.noise)):
        for r in rows:
            w.writerow(
                [
                    "missing" if key == "eta" else "noise",
                    r[key],
                    r["accuracy"],
                    r["accuracy_std"],
                    r["macro_f1"],
                    r["macro_f1_std"],
                ]
            )
    return buf.getvalue()


def plot_robustness(result: RobustnessResult, path: str | Path) -> Path:
    """Accuracy versus missing rate and versus noise level, with the clean accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    full = 100 * result.full["accuracy"]
    for a, rows, key, label in (
        (ax[0], result.missing, "eta", "missing rate eta"),
        (ax[1], result.noise, "sigma", "noise sigma"),
    ):
        x = [0.0] + [r[key] for r in rows]
        y = [full] + [100 * r["accuracy"] for r in rows]
        e = [0.0] + [100 * r["accuracy_std"] for r in rows]
        a.errorbar(x, y, yerr=e, marker="o", capsize=3)
        a.axhline(full, color="gray", ls="--", lw=1, label="all modalities, clean")
        a.set(xlabel=label, title=f"accuracy vs {label}")
        a.grid(alpha=0.3)
    ax[0].set_ylabel("test accuracy %")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_robustness(result: RobustnessResult, out_dir: str | Path) -> list[Path]:
    """Write robustness.md, .csv, .json and .png into ``out_dir``; returns the paths.

    The folder is written whole, under a temporary name renamed at the end: a failure (a
    full disk) leaves the previous results, or none, never part of them.
    """
    from equimodal.core.files import atomic_output, write_json_atomic, write_text_atomic

    final = Path(out_dir)
    names = ["robustness.md", "robustness.csv", "robustness.json", "robustness.png"]
    with atomic_output(final) as out:
        out.mkdir(parents=True)
        write_text_atomic(out / names[0], robustness_markdown(result))
        write_text_atomic(out / names[1], robustness_csv(result))
        write_json_atomic(out / names[2], result.to_dict())
        plot_robustness(result, out / names[3])
    return [final / name for name in names]


__all__ = [
    "ETAS",
    "SIGMAS",
    "RobustnessResult",
    "drop_modalities",
    "evaluate_robustness",
    "robustness_csv",
    "robustness_markdown",
    "write_robustness",
]
