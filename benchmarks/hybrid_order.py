"""Latency of hybrid-order inference relative to one-order inference, and at M = 6 the
accuracy of the sampled order set against the exact average over all 720 orders.

Inference is the whole model on raw inputs (encoders, memory chain, head), in eval mode,
with the orders of ``shapley_alternating``'s hybrid set (METHODS §1.5): all 6 orders at
M = 3; at M = 6 the 6 cyclic shifts of the training order (a Latin square) plus random
orders up to 24. One-order inference reads the training order only. Latency is measured
at batch sizes 1 and 64 (the training batch size) and over the whole test split
(throughput); each number is the median of several timed calls.

The M = 6 model trains briefly (``shapley_alternating``, default encoders) on synthetic
data; the accuracy difference is in percentage points, sampled set minus all orders.
Target: ratio at most 2.

    python benchmarks/hybrid_order.py [--quick] [--device auto] [--reps 30]
"""

from __future__ import annotations

from typing import Any

import torch
from common import emit, median, parser, print_table, setup, time_calls

from equimodal.balance.orders import all_orders
from equimodal.config import build_config
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer, build_model
from equimodal.engine.validation import encode_split, predict_logits

TARGET = 2.0


def config(m: int, quick: bool, epochs: int, device: str):
    """The default model on synthetic data with ``m`` modalities."""
    options: dict[str, Any] = {"num_modalities": m}
    overrides: dict[str, Any] = {
        "train": {"epochs": epochs, "patience": None, "relative_edm": False, "device": device}
    }
    if quick:
        options["num_samples"] = 120
        overrides["model"] = {"dim": 16, "encoder": {"hidden": 32}}
    overrides["dataset"] = {"name": "synthetic", "options": options}
    return build_config(overrides)


def latencies(model, test, one, hybrid, reps: int, device) -> list[list[Any]]:
    """Median seconds per call of one-order and hybrid inference, per batch size."""
    rows = []
    sizes = [("1", 1), ("64", 64), (f"{len(test)} (split)", len(test))]
    model.eval()
    for label, size in sizes:
        batch = next(iter(test.batches(size))).to(device)

        def run(orders, batch=batch):
            with torch.no_grad():
                return model(batch, orders=orders).logits

        calls = reps if size < len(test) else max(2, reps // 3)
        t_one = median(time_calls(lambda: run(one), calls, device, warmup=2))
        t_hybrid = median(time_calls(lambda: run(hybrid), calls, device, warmup=2))
        rows.append([label, t_one * 1e3, t_hybrid * 1e3, t_hybrid / t_one])
    return rows


def accuracy(model, split, orders, device) -> float:
    """Accuracy of the model averaging its state over ``orders``."""
    cache = encode_split(model, split, device=device)
    logits = predict_logits(model, cache, orders=orders)
    return float((logits.argmax(1) == cache.labels).float().mean())


def main() -> None:
    """Measure M = 3 and M = 6 and print the table and the JSON line."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    reps = args.reps or (2 if args.quick else 30)
    ratios: dict[str, float] = {}
    rows = []

    # M = 3: all 6 orders; latency does not depend on the weights, so no training
    cfg = config(3, args.quick, 1, device.type)
    data = load_dataset("synthetic", seed=0, **cfg.dataset.options)
    torch.manual_seed(0)
    model = build_model(cfg, data.info).to(device)
    names = data.info.modality_names
    hybrid = [tuple(names[i] for i in o) for o in all_orders(3)]
    for row in latencies(model, data.test, [names], hybrid, reps, device):
        rows.append(["M=3, all 6 orders", *row])

    # M = 6: a briefly trained model; its hybrid set is the strategy's own
    cfg = config(6, args.quick, 1 if args.quick else 8, device.type)
    data = load_dataset("synthetic", seed=0, **cfg.dataset.options)
    result = Trainer(cfg, data=data, progress=False).fit()
    model, strategy = result.model.to(device), result.strategy
    one = [strategy.epoch_order or strategy.order]
    hybrid = strategy.candidate_orders()
    for row in latencies(model, data.test, one, hybrid, reps, device):
        rows.append([f"M=6, {len(hybrid)} orders (Latin square + sampled)", *row])
    print_table(
        f"Hybrid-order / one-order inference latency (median ms; target <= {TARGET})",
        ["orders", "batch", "one order ms", "hybrid ms", "ratio"],
        rows,
    )
    keys = ["b1", "b64", "split"]
    for k, row in zip(keys * 2, rows, strict=True):
        ratios[f"hybrid_{'m3' if row[0].startswith('M=3') else 'm6'}_{k}"] = row[-1]

    names = data.info.modality_names
    exact = [tuple(names[i] for i in o) for o in all_orders(6)]
    acc_rows = []
    for split_name in ("val", "test"):
        split = data.split(split_name)
        sampled_acc = accuracy(model, split, hybrid, device)
        exact_acc = accuracy(model, split, exact, device)
        diff = 100.0 * (sampled_acc - exact_acc)
        acc_rows.append([split_name, len(split), 100 * sampled_acc, 100 * exact_acc, diff])
        ratios[f"acc_diff_m6_{split_name}_pp"] = diff
    print_table(
        "M=6 accuracy (%): sampled order set against all 720 orders",
        ["split", "rows", f"{len(hybrid)} orders", "720 orders", "difference (pp)"],
        acc_rows,
    )
    emit(ratios)


if __name__ == "__main__":
    main()
