"""A labelled grid of the five camera views of a minibench scene (`agnostos sim render`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from agnostos.atomic import atomic_write_bytes
from agnostos.envs.protocol import Observation
from agnostos.shards.episode import CAMERAS

LABEL_HEIGHT = 14


def camera_grid(observation: Observation, cameras: tuple[str, ...] = CAMERAS) -> Image.Image:
    """The rgb views side by side, each with its camera name above it."""
    frames = [observation.cameras[camera].rgb for camera in cameras]
    height, width = frames[0].shape[:2]
    grid = Image.new("RGB", (width * len(frames), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for index, (camera, frame) in enumerate(zip(cameras, frames, strict=True)):
        grid.paste(Image.fromarray(np.asarray(frame)), (index * width, LABEL_HEIGHT))
        draw.text((index * width + 3, 1), camera, fill="black")
    return grid


def render_task(
    task: str, out: str | Path, variation: int = 0, episode: int = 0, image_size: int = 128
) -> Path:
    """Reset `task` and save the grid of its first frame as a PNG at `out`."""
    import io

    from agnostos.envs.minibench.env import MiniBenchEnv

    env = MiniBenchEnv(image_size=image_size)
    try:
        observation = env.reset(task, variation, episode)
        buffer = io.BytesIO()
        camera_grid(observation).save(buffer, format="PNG")
    finally:
        env.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    return out
