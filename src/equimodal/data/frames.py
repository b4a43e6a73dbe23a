"""Video frames: reading jpg frames, sampling them per clip, and extracting them with ffmpeg.

Images are read with pillow (the ``media`` extra, imported when first used); videos are
decoded by the ffmpeg program that :func:`find_ffmpeg` finds (a system ffmpeg or the one
imageio-ffmpeg ships), so neither torchvision nor a video library is needed.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equimodal.data.prepare import atomic_output

#: ImageNet channel statistics (torchvision's ``Normalize`` values used by the community)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov")


# --------------------------------------------------------------------------- reading
def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_frames(folder: str | Path) -> list[Path]:
    """Image files (jpg, jpeg, png) in ``folder``, in natural sorted order (2 before 10)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: _natural_key(p.name))


def sample_frame_indices(
    num_available: int,
    num_frames: int,
    train: bool,
    generator: np.random.Generator | torch.Generator | None = None,
) -> list[int]:
    """Sorted indices of ``num_frames`` frames out of ``num_available`` (TSN-style).

    The frames are cut into ``num_frames`` evenly spaced segments; training draws one
    frame uniformly inside each segment (from ``generator``, NumPy or torch), evaluation
    takes each segment's centre. With fewer frames than asked, frames repeat.
    """
    if num_available <= 0:
        raise ValueError("no frames to sample from")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    out = []
    for i in range(num_frames):
        start = (i * num_available) // num_frames
        stop = max(((i + 1) * num_available) // num_frames, start + 1)
        if not train:
            out.append((start + stop - 1) // 2)
        elif isinstance(generator, torch.Generator):
            out.append(int(torch.randint(start, stop, (1,), generator=generator)))
        else:
            rng = generator if generator is not None else np.random.default_rng()
            out.append(int(rng.integers(start, stop)))
    return out


def _open_rgb(path: Path):
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading frames needs pillow: pip install 'equimodal[media]'") from None
    if not path.is_file():
        raise FileNotFoundError(f"frame {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # pillow raises several error types for bad files
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None


def _random_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random-resized-crop box: area 8-100 %, aspect 3/4-4/3 (torchvision's defaults)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)  # fall back to the centre square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def load_frames(
    paths: Sequence[str | Path],
    size: int = 224,
    *,
    augment: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Frames as float32 ``(T, 3, size, size)``, RGB, ImageNet-normalised.

    Each image is resized to ``size`` x ``size`` (bilinear). With ``augment`` one random
    resized crop and one random horizontal flip (probability 1/2), drawn from ``rng``,
    are applied to every frame of the clip alike.
    """
    if not paths:
        raise ValueError("load_frames needs at least one path")
    images = [_open_rgb(Path(p)) for p in paths]
    from PIL import Image

    box, flip = None, False
    if augment:
        rng = rng if rng is not None else np.random.default_rng()
        box = _random_crop_box(*images[0].size, rng)
        flip = bool(rng.random() < 0.5)
    # normalised in NumPy: per-frame torch ops cost 100x more where a loader worker's
    # threads compete for the cores
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 1, 3)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 1, 3)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for t, img in enumerate(images):
        if box is not None and img.size == images[0].size:
            img = img.crop(box)
        img = img.resize((size, size), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        out[t] = ((x - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- ffmpeg
FFMPEG_HINT = (
    "install it with `apt-get install ffmpeg` (Debian/Ubuntu), `brew install ffmpeg` "
    "(macOS), or `pip install imageio-ffmpeg`"
)


def find_ffmpeg() -> str:
    """Path of an ffmpeg program: the system's, else the one imageio-ffmpeg ships."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found]

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    raise FileNotFoundError(
        f"ffmpeg is needed to extract video frames but was not found; {FFMPEG_HINT}"
    )


def run_ffmpeg(args: list[str], source: Path, what: str) -> bytes:
    """Run ffmpeg with ``args`` and return its stdout; a one-line error naming ``source``."""
    command = [find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]
    try:
        done = subprocess.run(command, capture_output=True, check=False)
    except OSError as err:
        raise FileNotFoundError(f"cannot run ffmpeg ({command[0]}): {err}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise ValueError(f"ffmpeg could not {what} {str(source)!r}: {reason}")
    return done.stdout


def extract_frames(video: str | Path, out_dir: str | Path, fps: float, size: int | None) -> int:
    """Write ``video``'s frames at ``fps`` as ``out_dir/frame_00000.jpg``, ...; the count.

    ``size`` scales each frame so its shorter side has ``size`` pixels (None keeps the
    video's size). The folder is written under a temporary name and renamed when
    complete (:func:`equimodal.data.prepare.atomic_output`), replacing an older one.
    """
    video, out_dir = Path(video), Path(out_dir)
    if not video.is_file():
        raise FileNotFoundError(f"video {str(video)!r} does not exist")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    filters = [f"fps={fps:g}"]
    if size is not None:
        filters.append(f"scale={size}:{size}:force_original_aspect_ratio=increase")
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        run_ffmpeg(
            [
                "-i",
                str(video),
                "-an",
                "-vf",
                ",".join(filters),
                "-q:v",
                "2",
                "-start_number",
                "0",
                str(tmp / "frame_%05d.jpg"),
            ],
            video,
            "extract frames from",
        )
        count = len(list_frames(tmp))
        if count == 0:
            raise ValueError(f"ffmpeg wrote no frames for video {str(video)!r}")
    return count


# --------------------------------------------------------------------------- prepared copies
def find_frame_folder(name: str, folders: Sequence[Path]) -> Path | None:
    """The first ``folder/name/`` holding at least one image."""
    for folder in folders:
        if list_frames(folder / name):
            return folder / name
    return None


def copy_frames(source: Path, dest: Path, size: int | None) -> int:
    """Copy the images of ``source`` into ``dest`` atomically (shorter side scaled to ``size``)."""
    frames = list_frames(source)
    if not frames:
        raise ValueError(f"frame folder {str(source)!r} holds no images")
    with atomic_output(dest) as tmp:
        tmp.mkdir(parents=True)
        for frame in frames:
            if size is None:
                shutil.copyfile(frame, tmp / frame.name)
                continue
            from PIL import Image

            img = _open_rgb(frame)
            scale = size / min(img.size)
            new = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img.resize(new, Image.BILINEAR).save(tmp / f"{frame.stem}.jpg", quality=95)
    return len(frames)
