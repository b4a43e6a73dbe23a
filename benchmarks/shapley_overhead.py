"""Cost of the end-of-epoch Shapley evaluation relative to one training epoch.

For each case the default ``equimodal train`` configuration (``shapley_alternating``, the
memory fusion, hybrid-order inference, default encoders and batch size) trains through the
real :class:`~equimodal.engine.trainer.Trainer`; its history records every epoch's training
time and the time of the evaluation that follows it (encoding the validation split once,
accuracy, macro-F1, Shapley values over every coalition the estimate needs, EDM). The
ratio is the median evaluation time over the median epoch time (the first epoch, a
warm-up, left out).

The library's schedule scores each coalition through the training order
(``schedule_orders: train_order``, the default); the same run with ``schedule_orders:
inference`` (every coalition through the hybrid order set) is timed beside it. Two
baselines, built here only, score the same coalitions on the trained model:

* ``naive``: the encoders re-run for every coalition, each coalition through the memory
  chain on its own (orders stacked on the batch axis);
* ``per coalition``: encoders once (cached features), each coalition on its own; this is
  what the library did before the prefix tree (``equimodal.models.order_tree``).

The library's ratio is split into what model selection needs without any Shapley value
(encoding the split, the full coalition through the inference orders, loss, macro-F1;
timed separately on the trained model) and the rest, the Shapley part.

Cases: mfeat (M = 6, exact: 63 coalitions), synthetic data with M = 8 (exact: 255) and
M = 12 (permutation sampling, 64 antithetic pairs). Target: at most 0.05 for the library.

    python benchmarks/shapley_overhead.py [--quick] [--device auto] [--reps 5]
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import emit, median, parser, print_table, setup, synchronize
from sklearn.metrics import f1_score

from equimodal.balance.edm import edm
from equimodal.balance.shapley import required_coalitions, shapley_values
from equimodal.config import build_config
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer
from equimodal.engine.validation import (
    FeatureCache,
    class_prior,
    encode_split,
    predict_logits,
    value_of_logits,
    value_of_prior,
)

TARGET = 0.05

#: (key, label, dataset, dataset options for the full and the quick run)
CASES = [
    ("mfeat", "mfeat (M=6, exact)", "mfeat", {}, {}),
    (
        "synthetic_m8",
        "synthetic (M=8, exact)",
        "synthetic",
        {"num_modalities": 8},
        {"num_modalities": 8, "num_samples": 120},
    ),
    (
        "synthetic_m12",
        "synthetic (M=12, sampled)",
        "synthetic",
        {"num_modalities": 12},
        {"num_modalities": 12, "num_samples": 120},
    ),
]


def config(
    dataset: str,
    options: dict[str, Any],
    epochs: int,
    quick: bool,
    device: str,
    schedule_orders: str | None = None,
):
    """The default run, for ``epochs`` epochs without early stopping or relative EDM;
    ``schedule_orders`` overrides how each epoch's schedule scores a coalition."""
    overrides: dict[str, Any] = {
        "dataset": {"name": dataset, "options": options},
        "train": {"epochs": epochs, "patience": None, "relative_edm": False, "device": device},
        "strategy": {"name": "shapley_alternating"},
    }
    if quick:
        overrides["model"] = {"dim": 16, "encoder": {"hidden": 32}}
        overrides["strategy"]["max_orders"] = 4
        overrides["train"].update(batch_size=256, shapley={"permutations": 2})
    if schedule_orders is not None:
        overrides["strategy"]["schedule_orders"] = schedule_orders
    return build_config(overrides)


def baseline_evaluation(model, strategy, data, cfg, device, reencode: bool) -> None:
    """The trainer's end-of-epoch evaluation done the slow way (benchmark-only baseline).

    Every coalition the Shapley estimate needs is scored on its own through the memory
    chain with the strategy's inference orders stacked on the batch axis; with
    ``reencode`` the encoders of its modalities run again over the split for it.
    """
    tc = cfg.train
    fusion = model.fusion
    saved = getattr(fusion, "tree_min_work", None)
    if saved is not None:
        fusion.tree_min_work = math.inf  # no prefix tree: the chain per coalition
    was_training = model.training
    model.eval()
    try:
        val = data.val
        cache = encode_split(model, val, batch_size=tc.eval_batch_size, device=device)
        strategy.prepare_inference(cache)
        inference = strategy.inference_kwargs()
        names = model.modalities
        labels = cache.labels
        prior = class_prior(data.train.labels, data.info.num_classes)

        def logits_of(members: tuple[str, ...]) -> torch.Tensor:
            source = cache
            if reencode:
                parts: dict[str, list[torch.Tensor]] = {m: [] for m in members}
                with torch.no_grad():
                    for batch in val.batches(tc.eval_batch_size):
                        batch = batch.to(device)
                        for m, z in model.encode(batch, members).items():
                            parts[m].append(z)
                source = FeatureCache(
                    z={m: torch.cat(v) for m, v in parts.items()},
                    present={m: cache.present[m] for m in members},
                    labels=labels,
                )
            return predict_logits(
                model, source, modalities=members, **inference, batch_size=tc.eval_batch_size
            )

        logits = logits_of(names)
        float(F.cross_entropy(logits, labels))
        f1_score(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="macro")
        options = {
            "max_exact_players": tc.shapley.max_exact,
            "num_permutations": tc.shapley.permutations,
            "seed": cfg.seed,
        }
        table = {}
        for mask in required_coalitions(len(names), **options):
            members = tuple(names[i] for i in range(len(names)) if mask >> i & 1)
            if not members:
                table[mask] = value_of_prior(prior, labels, "accuracy")
            elif mask == (1 << len(names)) - 1:
                table[mask] = value_of_logits(logits, labels, "accuracy")
            else:
                table[mask] = value_of_logits(logits_of(members), labels, "accuracy")
        result = shapley_values(table.__getitem__, len(names), **options)
        edm(result.values)
    finally:
        if saved is not None:
            fusion.tree_min_work = saved
        model.train(was_training)


def selection_evaluation(model, strategy, data, cfg, device) -> None:
    """What model selection needs at the end of an epoch without any Shapley value:
    encode the validation split, score the full coalition through the inference orders,
    loss and macro-F1 (benchmark-only; the Shapley part is the rest of the evaluation)."""
    tc = cfg.train
    was_training = model.training
    model.eval()
    try:
        cache = encode_split(model, data.val, batch_size=tc.eval_batch_size, device=device)
        strategy.prepare_inference(cache)
        logits = predict_logits(
            model, cache, modalities=model.modalities, **strategy.inference_kwargs(),
            batch_size=tc.eval_batch_size,
        )  # fmt: skip
        float(F.cross_entropy(logits, cache.labels))
        f1_score(cache.labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="macro")
    finally:
        model.train(was_training)


def epoch_times(result) -> tuple[float, float]:
    """Median training and evaluation seconds per epoch of a fit (epoch 1, the warm-up,
    left out when there are more)."""
    rows = [row for row in result.history if row["epoch"] >= 2] or result.history[1:]
    return median([r["train_time_s"] for r in rows]), median([r["eval_time_s"] for r in rows])


def timed(fn, device) -> float:
    """Wall time of one call of ``fn`` (GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    """Run every case and print the table and the JSON line."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    reps = args.reps or (1 if args.quick else 5)
    rows, ratios = [], {}
    for key, label, dataset, full_options, quick_options in CASES:
        options = quick_options if args.quick else full_options
        data = load_dataset(dataset, seed=0, **options)
        epochs = 1 if args.quick else reps + 1
        cfg = config(dataset, options, epochs, args.quick, str(device.type))
        result = Trainer(cfg, data=data, progress=False).fit()
        train_s, eval_s = epoch_times(result)
        # the same run scheduled through the hybrid order set (schedule_orders: inference)
        hybrid_cfg = config(dataset, options, epochs, args.quick, str(device.type), "inference")
        hybrid_train_s, hybrid_eval_s = epoch_times(
            Trainer(hybrid_cfg, data=data, progress=False).fit()
        )
        # the baselines are slow; fewer repetitions where they take minutes
        base_reps = 1 if args.quick or key == "synthetic_m12" else max(1, min(reps, 3))
        model, strategy = result.model, result.strategy

        def baseline(reencode: bool, model=model, strategy=strategy, data=data, cfg=cfg):
            return baseline_evaluation(model, strategy, data, cfg, device, reencode)

        def selection(model=model, strategy=strategy, data=data, cfg=cfg):
            return selection_evaluation(model, strategy, data, cfg, device)

        selection_s = median([timed(selection, device) for _ in range(reps)])
        per_coalition_s = median([timed(lambda: baseline(False), device) for _ in range(base_reps)])
        naive_s = median([timed(lambda: baseline(True), device) for _ in range(base_reps)])
        m = len(data.info.modalities)
        coalitions = len(
            required_coalitions(
                m,
                max_exact_players=cfg.train.shapley.max_exact,
                num_permutations=cfg.train.shapley.permutations,
                seed=cfg.seed,
            )
        )
        rows.append(
            [
                label,
                coalitions,
                len(data.val),
                train_s,
                eval_s,
                eval_s / train_s,
                selection_s / train_s,
                max(eval_s - selection_s, 0.0) / train_s,
                hybrid_eval_s / hybrid_train_s,
                per_coalition_s / train_s,
                naive_s / train_s,
            ]
        )
        ratios[f"shapley_overhead_{key}"] = eval_s / train_s
        ratios[f"selection_only_{key}"] = selection_s / train_s
        ratios[f"shapley_part_{key}"] = max(eval_s - selection_s, 0.0) / train_s
        ratios[f"hybrid_schedule_overhead_{key}"] = hybrid_eval_s / hybrid_train_s
        ratios[f"per_coalition_overhead_{key}"] = per_coalition_s / train_s
        ratios[f"naive_overhead_{key}"] = naive_s / train_s
    print_table(
        f"Shapley evaluation / training epoch (medians of {reps} epochs; target <= {TARGET})",
        [
            "case",
            "coalitions",
            "val rows",
            "epoch s",
            "eval s",
            "ratio (library)",
            "of which selection",
            "of which Shapley",
            "ratio (hybrid schedule)",
            "ratio (per coalition)",
            "ratio (naive)",
        ],
        rows,
    )
    emit(ratios)


if __name__ == "__main__":
    main()
