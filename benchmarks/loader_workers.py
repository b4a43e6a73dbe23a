"""Items per second of the CREMA-D loader at 0, 2 and 4 DataLoader worker processes.

Writes a CREMA-D download in the real raw layout (16 kHz wavs in ``AudioWAV/``, 1 fps jpg
frames in ``Image-01-FPS/<clip>/``, ``train.csv`` / ``test.csv``; the frames rewritten at
CREMA-D's 480 x 360 with texture, so decoding costs what a real frame costs; ``--quick``
keeps the fixture's tiny frames), runs the
real ``prepare`` step on it, then loads it with ``load_dataset("cremad", num_workers=w)``
(the shipped config's options: 1 frame at 224 px, training augmentation) and iterates
the training split in shuffled batches of 64 exactly as the trainer does
(``ItemSplit.batches``: one DataLoader per pass, worker start-up included). Each number
is the median over passes, the worker counts interleaved; the first pass per count is a
warm-up (page cache).

With 2 CPU cores, 4 workers cannot run faster than 2 and the training step competes
with them for the same cores; the numbers say how fast the loader alone can go.

    python benchmarks/loader_workers.py [--quick] [--reps 3] [--workers 0,2,4]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, emit, median, parser, print_table, setup

sys.path.insert(0, str(REPO))
from equimodal.data.cremad import prepare_cremad  # noqa: E402
from equimodal.data.registry import load_dataset  # noqa: E402
from tests.av_fixtures import make_cremad_raw  # noqa: E402

#: CREMA-D's video frames are 480 x 360
FRAME_SIZE = (480, 360)


def texture(size: tuple[int, int]) -> np.ndarray:
    """A ``height x width x 3`` uint8 image: smooth colour gradients plus noise."""
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 90 * np.sin(x / (17 + 5 * c) + y / (23 + 3 * c)) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def make_raw(raw: Path, per_class: int, realistic: bool) -> tuple[int, str]:
    """The raw CREMA-D fixture with ``per_class`` training clips per class.

    ``realistic`` rewrites every frame as a textured jpg of CREMA-D's frame size (each
    frame the texture shifted, so no two are equal). Returns the number of frames and
    their size.
    """
    from PIL import Image

    make_cremad_raw(raw, train_per_class=per_class, test_per_class=1, videos=0)
    frames = sorted((raw / "Image-01-FPS").glob("*/*.jpg"))
    if not realistic:
        return len(frames), "64x48"
    image = texture(FRAME_SIZE)
    for i, frame in enumerate(frames):
        Image.fromarray(np.roll(image, 7 * i, axis=1)).save(frame, quality=90)
    return len(frames), f"{FRAME_SIZE[0]}x{FRAME_SIZE[1]}"


def pass_rate(split, batch_size: int, generator: torch.Generator) -> float:
    """Items per second of one shuffled pass over ``split`` (start-up included)."""
    start = time.perf_counter()
    items = 0
    for batch in split.batches(batch_size, shuffle=True, generator=generator):
        items += len(batch)
    return items / (time.perf_counter() - start)


def main() -> None:
    """Prepare the fixture, time passes at each worker count, print the table and JSON."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
    p.add_argument("--per-class", type=int, default=None, help="training clips per class")
    args = p.parse_args()
    setup(args)
    workers = [int(w) for w in args.workers.split(",")]
    if 0 not in workers:
        workers = [0, *workers]
    reps = args.reps or (1 if args.quick else 3)
    per_class = args.per_class or (3 if args.quick else 40)
    batch_size = 8 if args.quick else 64
    with tempfile.TemporaryDirectory(prefix="equimodal-loader-") as tmp:
        raw, root = Path(tmp) / "raw", Path(tmp) / "root"
        started = time.perf_counter()
        frames, size = make_raw(raw, per_class, realistic=not args.quick)
        prepare_cremad(raw, root, progress=False, workers=os.cpu_count() or 1)
        took = time.perf_counter() - started
        print(f"fixture: {6 * per_class} training clips, {frames} frames of {size}, {took:.1f} s")
        splits = {
            w: load_dataset(
                "cremad",
                seed=0,
                root=str(root),
                num_workers=w,
                num_frames=1,
                frame_size=224,
                # a stratified validation split needs one clip per class
                val_fraction=0.1 if per_class >= 10 else 1 / per_class,
            ).train
            for w in workers
        }
        generator = torch.Generator().manual_seed(0)
        for w in workers:
            pass_rate(splits[w], batch_size, generator)  # warm-up
        rates: dict[int, list[float]] = {w: [] for w in workers}
        for _ in range(reps):
            for w in workers:  # interleaved
                rates[w].append(pass_rate(splits[w], batch_size, generator))
        items = len(splits[workers[0]])
    base = median(rates[0])
    rows, result = [], {}
    for w in workers:
        rate = median(rates[w])
        rows.append([w, items, rate, rate / base])
        result[f"items_per_s_{w}_workers"] = rate
        if w:
            result[f"speedup_{w}_workers"] = rate / base
    print_table(
        f"CREMA-D loader, training split ({items} items, batch {batch_size}, 1 frame at "
        f"224 px, augmentation on), median of {reps} passes",
        ["workers", "items / pass", "items / s", "ratio to 0 workers"],
        rows,
    )
    emit(result)


if __name__ == "__main__":
    main()
