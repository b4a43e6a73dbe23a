"""Balance costs on the audio-visual geometry: two ResNet-18 encoders on CREMA-D and
Kinetics-Sounds shapes, synthetic tensors, no download.

The models and strategies are built from the shipped configs
(``configs/<dataset>_joint.yaml``: concatenation; ``configs/<dataset>_shapley_alternating.yaml``:
the memory fusion; both two ``resnet18`` encoders, common width 512, SGD, batch 64) through
``build_model``, ``build_optimizer``, ``build_strategy`` and ``TrainContext`` as the trainer
builds them; the inputs are random tensors of the loaders' shapes, already on the device
(reading and decoding files is left out; ``loader_workers.py`` measures it).

Measured (medians, the two methods' training steps interleaved):

* the wall time of one training step (``strategy.training_step``) of ``joint`` and of
  ``shapley_alternating`` on one batch;
* the end-of-epoch evaluation as the trainer runs it: ``encode_split`` (encoders once over
  the split; timed on a few batches, per sample) and ``evaluate_cache`` with and without
  Shapley values (on a validation-sized cache of features; per sample); the validation
  pass is encoding plus ``evaluate_cache`` without Shapley values, which every epoch needs
  anyway; the Shapley part is the median of the paired differences;
* hybrid-order (all 2 orders at M = 2) and one-order inference per sample on cached
  features (``predict_logits``), and the same with the encoding each needs.

Extrapolated to one epoch (both methods see every training batch once, so):

* alternating epoch / joint epoch = step time of ``shapley_alternating`` / step time of
  ``joint``;
* Shapley evaluation / epoch = per-sample cost x validation samples /
  (``shapley_alternating`` step time x ceil(training samples / batch)), once for the
  Shapley part on top of the validation pass and once for the whole evaluation;
* hybrid / one-order inference = (encoding + hybrid fusion) / (encoding + one-order fusion)
  per sample, and the fusion alone.

Targets: alternating <= 1.15 x joint, Shapley evaluation <= 0.03 of an epoch, hybrid-order
inference <= 1.2 x one order.

``--precision bf16`` runs the training steps as ``train.precision: bf16`` does (the
trainer's autocast, and channels-last convolutions on CUDA); evaluation stays in fp32, as
in the trainer. ``--epoch`` times every training step of one epoch (ceil(training samples /
batch) per method) and encodes the whole validation split, instead of a few steps and
batches: the epoch-level numbers are then measured, not extrapolated.

    python benchmarks/av_geometry.py [--quick] [--device auto] [--reps 3]
        [--datasets cremad,kinetics_sounds] [--batch 64] [--precision fp32|bf16]
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from common import REPO, emit, median, parser, print_table, setup, synchronize, time_calls
from torch.utils.flop_counter import FlopCounterMode

from equimodal.config import TrainConfig, build_config, load_yaml
from equimodal.data.base import DatasetInfo, FeatureSplit, ModalitySpec
from equimodal.data.batch import MultimodalBatch
from equimodal.engine.build import build_model, build_optimizer, seed_everything
from equimodal.engine.strategy import TrainContext, build_strategy
from equimodal.engine.validation import FeatureCache, encode_split, evaluate_cache, predict_logits

try:  # the trainer's precision handling (train.precision), where this equimodal has it
    from equimodal.engine.trainer import precision_setup, to_channels_last
except ImportError:
    precision_setup = to_channels_last = None

TARGETS = {"alternating_vs_joint": 1.15, "shapley_eval_of_epoch": 0.03, "hybrid_inference": 1.2}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Shapes and split sizes of one dataset (full size, and tiny for ``--quick``)."""

    name: str
    audio: tuple[int, ...]
    visual: tuple[int, ...]
    num_classes: int
    train: int
    val: int
    quick_audio: tuple[int, ...]
    quick_visual: tuple[int, ...]


#: CREMA-D: the OGM-GE train list (6698 clips) less the loader's stratified 10 %
#: validation split (670); audio 1 x 257 x 188 log-STFT, 1 frame (the loader's default).
#: Kinetics-Sounds: about 15000 training clips in the OGM-GE lists, 10 % of them for
#: validation; audio 1 x 128 x 1024 fbank, 3 frames (the loader's default).
GEOMETRIES = {
    "cremad": Geometry(
        "cremad", (1, 257, 188), (1, 3, 224, 224), 6, 6028, 670, (1, 33, 24), (1, 3, 32, 32)
    ),
    "kinetics_sounds": Geometry(
        "kinetics_sounds",
        (1, 128, 1024),
        (3, 3, 224, 224),
        31,
        13500,
        1500,
        (1, 16, 64),
        (3, 3, 32, 32),
    ),
}


def info_of(geo: Geometry, quick: bool) -> DatasetInfo:
    """A dataset description with ``geo``'s modalities (tiny shapes with ``quick``)."""
    audio, visual = (geo.quick_audio, geo.quick_visual) if quick else (geo.audio, geo.visual)
    return DatasetInfo(
        name=geo.name,
        modalities=(
            ModalitySpec("audio", audio, "spectrogram"),
            ModalitySpec("visual", visual, "frames"),
        ),
        num_classes=geo.num_classes,
        num_samples=geo.train + geo.val,
        source="synthetic tensors of the real shapes",
        license="-",
    )


def library_precision() -> bool:
    """Whether this equimodal has ``train.precision`` (the trainer's own autocast)."""
    return "precision" in TrainConfig.model_fields and precision_setup is not None


def run_config(geo: Geometry, strategy: str, batch: int, device: str, precision: str = "fp32"):
    """The shipped config of ``strategy`` on ``geo``'s dataset, training batch ``batch``
    (the evaluation batch stays the config's, 64)."""
    tree = load_yaml(REPO / "configs" / f"{geo.name}_{strategy}.yaml")
    tree["train"].update(batch_size=batch, device=device)
    if library_precision():
        tree["train"]["precision"] = precision
    return build_config(tree)


def random_inputs(info: DatasetInfo, rows: int, generator: torch.Generator) -> dict[str, Any]:
    """Random inputs, all-present masks and labels for ``rows`` samples (on the CPU)."""
    return {
        "inputs": {
            m.name: torch.randn((rows, *m.shape), generator=generator) for m in info.modalities
        },
        "present": {m.name: torch.ones(rows, dtype=torch.bool) for m in info.modalities},
        "labels": torch.randint(0, info.num_classes, (rows,), generator=generator),
    }


class Setup:
    """One method's model, optimizer and strategy, built as the trainer builds them.

    With ``train.precision`` in the library, the training steps run under the trainer's
    own autocast (and channels-last layout where it uses one); otherwise under
    ``torch.autocast`` to bfloat16 for ``bf16``. Evaluation never autocasts, as in the
    trainer.
    """

    def __init__(self, cfg, info: DatasetInfo, device: torch.device, precision: str) -> None:
        seed_everything(cfg.seed, cfg.train.deterministic)
        self.cfg = cfg
        self.model = build_model(cfg, info).to(device)
        self.autocast = lambda: autocast(device, precision)
        self.channels_last = False
        extra: dict[str, Any] = {}
        if library_precision():
            try:
                self.autocast, scaler, self.channels_last = precision_setup(
                    cfg.train, device, self.model
                )
            except (TypeError, ValueError) as err:  # another version of the helper
                print(f"train.precision not applied ({err}); torch.autocast used instead")
            else:
                if "scaler" in {f.name for f in dataclasses.fields(TrainContext)}:
                    extra["scaler"] = scaler
        self.optimizer = build_optimizer(cfg, self.model)
        self.strategy = build_strategy(cfg.strategy)
        self.strategy.setup(
            TrainContext(
                model=self.model,
                optimizer=self.optimizer,
                modalities=info.modality_names,
                num_classes=info.num_classes,
                seed=cfg.seed,
                grad_clip=cfg.optim.grad_clip,
                batches_per_epoch=1,
                **extra,
            )
        )
        self.model.train()
        self.strategy.on_epoch_start(1)

    def step(self, batch: MultimodalBatch) -> None:
        """One training step of the strategy on ``batch``, as the trainer's loop runs it."""
        self.model.train()
        if self.channels_last:
            batch = dataclasses.replace(
                batch, inputs={m: to_channels_last(x) for m, x in batch.inputs.items()}
            )
        with self.autocast():
            self.strategy.training_step(batch)


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` to bfloat16 for ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(geo: Geometry, args, device: torch.device, reps: int) -> dict[str, float]:
    """Every timing of one geometry, in seconds (per step, per sample)."""
    info = info_of(geo, args.quick)
    batch_size = args.batch or (8 if args.quick else 64)
    train_n = 64 if args.quick else geo.train
    val_n = 16 if args.quick else geo.val
    generator = torch.Generator().manual_seed(0)
    batch = MultimodalBatch(
        **random_inputs(info, batch_size, generator), indices=torch.arange(batch_size)
    ).to(device)
    p = args.precision
    joint = Setup(run_config(geo, "joint", batch_size, device.type, p), info, device, p)
    alt = Setup(run_config(geo, "shapley_alternating", batch_size, device.type, p), info, device, p)

    # arithmetic of one step (matrix products and convolutions, forward and backward):
    # counted, not timed, so free of the machine's noise; on 2 samples of fresh models
    flops = {}
    rows = 2
    small = MultimodalBatch(**random_inputs(info, rows, generator), indices=torch.arange(rows))
    for key, strategy_name in (("joint", "joint"), ("alt", "shapley_alternating")):
        cfg = run_config(geo, strategy_name, rows, device.type, p)
        with FlopCounterMode(display=False) as counter:
            Setup(cfg, info, device, p).step(small.to(device))
        flops[key] = counter.get_total_flops() / rows

    # training steps, the two methods interleaved
    for s in (joint, alt):
        s.step(batch)  # warm-up (cuDNN autotuning, allocator)
    batches_per_epoch = math.ceil(train_n / batch_size)
    steps: dict[str, list[float]] = {"joint": [], "alt": []}
    for _ in range(batches_per_epoch if args.epoch else reps):
        for key, s in (("joint", joint), ("alt", alt)):
            steps[key] += time_calls(lambda s=s: s.step(batch), 1, device, 0)
    out = {"step_joint_s": median(steps["joint"]), "step_alt_s": median(steps["alt"])}
    out["flops_joint"], out["flops_alt"] = flops["joint"], flops["alt"]
    # the fastest step of each: on a shared machine the least disturbed one
    out["min_step_ratio"] = min(steps["alt"]) / min(steps["joint"])
    if not args.epoch:
        print(
            f"{geo.name}: step times in s, joint {[round(v, 3) for v in steps['joint']]}, "
            f"shapley_alternating {[round(v, 3) for v in steps['alt']]}"
        )
    for key, values in steps.items():
        # --epoch: every step of an epoch timed; otherwise the median step times the batches
        out[f"epoch_{key}_s"] = sum(values) if args.epoch else median(values) * batches_per_epoch

    # encoding (the trainer's encode_split), per sample, on a few eval batches
    model, strategy, cfg = alt.model, alt.strategy, alt.cfg
    enc_rows = args.encode_rows or (
        val_n if args.epoch else batch_size if args.quick else 2 * batch_size
    )
    parts = random_inputs(info, enc_rows, generator)
    split = FeatureSplit(
        parts["inputs"], parts["labels"], torch.arange(enc_rows), present=parts["present"]
    )
    ebs = cfg.train.eval_batch_size

    def encode() -> FeatureCache:
        return encode_split(model, split, batch_size=ebs, device=device)

    out["encode_per_sample_s"] = (
        median(time_calls(encode, max(1, reps), device, warmup=1)) / enc_rows
    )

    # evaluate_cache on a validation-sized cache (the work does not depend on the values)
    z = {m: torch.randn(val_n, model.dim, generator=generator) for m in info.modality_names}
    cache = FeatureCache(
        z={m: v.to(device) for m, v in z.items()},
        present={m: torch.ones(val_n, dtype=torch.bool, device=device) for m in z},
        labels=torch.randint(0, info.num_classes, (val_n,), generator=generator).to(device),
    )
    prior = torch.full((info.num_classes,), 1.0 / info.num_classes)
    tc = cfg.train

    def evaluate(shapley: bool):
        return evaluate_cache(
            model,
            cache,
            "val",
            prior,
            inference=strategy.inference_kwargs(),
            shapley=shapley,
            value_kind=strategy.schedule_value,
            max_exact=tc.shapley.max_exact,
            permutations=tc.shapley.permutations,
            seed=cfg.seed,
            batch_size=tc.eval_batch_size,
        )

    one = [strategy.epoch_order or strategy.order]
    hybrid = strategy.candidate_orders()

    def infer(orders):
        return predict_logits(model, cache, orders=orders, batch_size=tc.eval_batch_size)

    # fusion-only work is milliseconds: many repetitions, interleaved
    fusion_reps = max(3, reps) if args.quick else max(30, 3 * reps)
    timings: dict[str, list[float]] = {k: [] for k in ("plain", "shapley", "one", "hybrid")}
    for fn in (lambda: evaluate(False), lambda: evaluate(True), lambda: infer(hybrid)):
        fn()  # warm-up
    for _ in range(fusion_reps):
        timings["plain"] += time_calls(lambda: evaluate(False), 1, device, 0)
        timings["shapley"] += time_calls(lambda: evaluate(True), 1, device, 0)
        timings["one"] += time_calls(lambda: infer(one), 1, device, 0)
        timings["hybrid"] += time_calls(lambda: infer(hybrid), 1, device, 0)
    for key, values in timings.items():
        out[f"{key}_per_sample_s"] = median(values) / val_n
    # the Shapley part: the median of the paired differences (on a busy machine it can
    # come out slightly negative when it is below the noise)
    out["shapley_part_per_sample_s"] = (
        median([b - a for a, b in zip(timings["plain"], timings["shapley"], strict=True)]) / val_n
    )
    out.update(
        batch=batch_size,
        train=train_n,
        val=val_n,
        encode_rows=enc_rows,
        batches_per_epoch=batches_per_epoch,
        orders=len(hybrid),
    )
    return out


def ratios_of(t: dict[str, float]) -> dict[str, float]:
    """The epoch-level ratios extrapolated from one geometry's timings."""
    epoch_alt = t["epoch_alt_s"]
    val = t["val"]
    shapley_part = t["shapley_part_per_sample_s"]
    evaluation = t["encode_per_sample_s"] + t["shapley_per_sample_s"]
    return {
        "alternating_vs_joint": t["epoch_alt_s"] / t["epoch_joint_s"],
        "alternating_vs_joint_fastest_steps": t["min_step_ratio"],
        "alternating_vs_joint_flops": t["flops_alt"] / t["flops_joint"],
        "shapley_on_top_of_epoch": shapley_part * val / epoch_alt,
        "evaluation_of_epoch": evaluation * val / epoch_alt,
        "validation_pass_of_epoch": (t["encode_per_sample_s"] + t["plain_per_sample_s"])
        * val
        / epoch_alt,
        "hybrid_vs_one_order": (t["encode_per_sample_s"] + t["hybrid_per_sample_s"])
        / (t["encode_per_sample_s"] + t["one_per_sample_s"]),
        "hybrid_vs_one_order_cached": t["hybrid_per_sample_s"] / t["one_per_sample_s"],
    }


def main() -> None:
    """Measure each geometry and print the tables and the JSON line."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", default="cremad,kinetics_sounds")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 64)")
    p.add_argument("--encode-rows", type=int, default=None, help="rows encoded for the timing")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--epoch",
        action="store_true",
        help="time every training step of one epoch and encode the whole validation split",
    )
    args = p.parse_args()
    device = setup(args)
    reps = args.reps or (1 if args.quick else 3)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in GEOMETRIES]
    if unknown or not names:
        raise SystemExit(f"--datasets: choose from {', '.join(GEOMETRIES)}, got {args.datasets}")
    timed = "every step of one epoch" if args.epoch else f"{reps} timed training steps"
    how = "train.precision" if library_precision() else "torch.autocast in this script"
    print(f"precision {args.precision} ({how}; evaluation in fp32); {timed} per method")
    print("after 1 warm-up, the two methods interleaved")
    result: dict[str, float] = {}
    rows, ratio_rows = [], []
    for name in names:
        geo = GEOMETRIES[name]
        synchronize(device)
        t = measure(geo, args, device, reps)
        r = ratios_of(t)
        ms = 1e3
        rows.append(
            [
                name,
                t["batch"],
                t["step_joint_s"] * ms,
                t["step_alt_s"] * ms,
                t["encode_per_sample_s"] * ms,
                t["plain_per_sample_s"] * ms,
                t["shapley_per_sample_s"] * ms,
                t["shapley_part_per_sample_s"] * ms,
                t["one_per_sample_s"] * ms,
                t["hybrid_per_sample_s"] * ms,
            ]
        )
        epoch = f"x {t['val']} val / ({t['batches_per_epoch']} batches x step)"
        alt_how = "every step timed" if args.epoch else "step alt / step joint"
        ratio_rows += [
            [name, "alternating / joint epoch", alt_how, r["alternating_vs_joint"],
             TARGETS["alternating_vs_joint"]],
            [name, "same, fastest step of each", "min alt / min joint",
             r["alternating_vs_joint_fastest_steps"], "-"],
            [name, "same, arithmetic (counted FLOPs)", "FLOPs alt / FLOPs joint",
             r["alternating_vs_joint_flops"], "-"],
            [name, "Shapley on top of validation / epoch", f"Shapley part {epoch}",
             r["shapley_on_top_of_epoch"], TARGETS["shapley_eval_of_epoch"]],
            [name, "whole evaluation / epoch", f"(encode + shapley eval) {epoch}",
             r["evaluation_of_epoch"], "-"],
            [name, "plain validation pass / epoch", f"(encode + plain eval) {epoch}",
             r["validation_pass_of_epoch"], "-"],
            [name, "hybrid / one-order inference", "(encode + hybrid) / (encode + one)",
             r["hybrid_vs_one_order"], TARGETS["hybrid_inference"]],
            [name, "same, fusion only (cached features)", "hybrid / one",
             r["hybrid_vs_one_order_cached"], "-"],
        ]  # fmt: skip
        for key, value in r.items():
            result[f"{name}_{key}"] = value
        for key in ("step_joint_s", "step_alt_s"):
            result[f"{name}_{key[:-2]}_ms"] = t[key] * 1e3
        result[f"{name}_train_gflop_per_sample"] = t["flops_joint"] / 1e9
        result[f"{name}_epoch_joint_s"] = t["epoch_joint_s"]
        result[f"{name}_epoch_alt_s"] = t["epoch_alt_s"]
        result[f"{name}_evaluation_s"] = (t["encode_per_sample_s"] + t["shapley_per_sample_s"]) * t[
            "val"
        ]
        for key in ("encode", "plain", "shapley", "shapley_part", "one", "hybrid"):
            result[f"{name}_{key}_per_sample_ms"] = t[f"{key}_per_sample_s"] * 1e3
    print_table(
        f"Measured on {device.type} ({args.precision}): medians; per-sample costs in ms",
        [
            "dataset",
            "batch",
            "joint step ms",
            "alternating step ms",
            "encode / sample",
            "plain eval / sample",
            "Shapley eval / sample",
            "Shapley part / sample",
            "one order / sample",
            "hybrid / sample",
        ],
        rows,
    )
    print_table(
        "Extrapolated to one epoch",
        ["dataset", "ratio", "how", "value", "target"],
        ratio_rows,
    )
    emit(result)


if __name__ == "__main__":
    main()
