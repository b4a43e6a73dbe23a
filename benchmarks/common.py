"""Shared helpers of the benchmark scripts: arguments, device, timing, tables, JSON line.

Every script takes ``--device auto|cpu|cuda|mps`` (auto: CUDA, then MPS, then CPU),
``--quick`` (CI-sized: tiny data, one or two repetitions), ``--reps`` and ``--threads``,
prints a readable table and ends its output with exactly one line: a JSON object of the
ratios it measured (:func:`emit`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from equimodal.engine.trainer import select_device

REPO = Path(__file__).resolve().parents[1]


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--quick", action="store_true", help="CI-sized run: tiny data, 1-2 reps")
    p.add_argument("--reps", type=int, default=None, help="repetitions (median is reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice, every core; 1 with --quick)",
    )
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, resolve ``--device`` and print what the numbers were measured on."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.quick:
        # CI machines are often shared: one thread avoids the many-fold slowdown of
        # oversubscribed intra-op threads
        torch.set_num_threads(1)
    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    load = ""
    if hasattr(os, "getloadavg"):
        load = " load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    print(
        f"device {device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads on {os.cpu_count()} cores,{load}"
    )
    if args.quick:
        print("quick mode: CI-sized inputs, the ratios are not meaningful")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a timer reads the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(
    fn: Callable[[], Any], reps: int, device: torch.device, warmup: int = 1
) -> list[float]:
    """Wall times in seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    """The median (the statistic every script reports: robust to a busy machine)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (floats to 4 significant digits), readable as is."""
    text = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[k]) for r in text)) for k, h in enumerate(headers)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in text:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def emit(ratios: dict[str, float]) -> None:
    """Print the JSON line of the ratios: the last line of every script's output."""
    sys.stdout.flush()
    print(json.dumps({k: round(float(v), 5) for k, v in ratios.items()}), flush=True)
