"""Rollout videos: H.264 mp4 files encoded in-process with PyAV.

Why encode here rather than hand frames to `wandb.Video`: W&B encodes numpy input through
moviepy, whose 2.x release broke older wandb versions, and defaults to gif. An mp4 path is
uploaded as it is, works in offline mode (the file is copied into the run folder) and plays
in any browser. PyAV is used because its wheels bundle the FFmpeg libraries (libx264
included), so encoding needs neither a system ffmpeg nor a subprocess, and the same library
decodes the file back for checks.

The files are H.264 in yuv420p, the one pixel format every browser plays. yuv420p
subsamples colour in 2x2 blocks, so both sides must be even: odd-sized frames are padded by
one row or column (repeating the edge), never scaled, so every camera pixel is kept as is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from agnostos.atomic import TMP_SUFFIX, fsync_directory

__all__ = ["DEFAULT_FPS", "encode_mp4", "read_mp4"]

DEFAULT_FPS = 10
# x264's constant-quality setting: 18 is visually lossless for rendered scenes, small enough
# (tens of KB per episode at 128x128) to log every recorded episode.
_CRF = 18


def _check_frames(frames: Sequence[np.ndarray]) -> tuple[int, int]:
    if len(frames) == 0:
        raise ValueError("encode_mp4 needs at least one frame")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise ValueError(
            f"frames must be HxWx3 uint8 rgb arrays, got shape {first.shape} {first.dtype}"
        )
    for index, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.shape != first.shape or frame.dtype != np.uint8:
            raise ValueError(
                f"frame {index} has shape {frame.shape} {frame.dtype}, frame 0 has "
                f"{first.shape} uint8: all frames of a video must match"
            )
    return first.shape[0], first.shape[1]


def _rate(fps: float) -> Fraction:
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def _pad_even(frame: np.ndarray) -> np.ndarray:
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def encode_mp4(frames: Sequence[np.ndarray], path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """Write `frames` (HxWx3 uint8 rgb, all the same size) as an H.264 yuv420p mp4.

    The file is written under a temporary name and renamed when complete, so a reader (a W&B
    reporter scanning the video folder, a resumed run) never sees half a video. Odd sizes are
    padded to even by repeating the last row/column. Returns the path written.
    """
    import av

    height, width = _check_frames(frames)
    rate = _rate(fps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        # The temporary name hides the extension, so the container format is named.
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=rate, options={"crf": str(_CRF)})
            stream.width = width + width % 2
            stream.height = height + height % 2
            stream.pix_fmt = "yuv420p"
            for index, frame in enumerate(frames):
                picture = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(_pad_even(np.asarray(frame))), format="rgb24"
                )
                picture.pts = index
                picture.time_base = 1 / rate
                out.mux(stream.encode(picture))
            out.mux(stream.encode(None))  # flush the frames x264 holds back for lookahead
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def read_mp4(path: str | Path) -> list[np.ndarray]:
    """Decode every frame of a video file as HxWx3 uint8 rgb (padding included, if any)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
