"""Draw the demo input video: a red ball and a blue square moving over a sky-and-grass scene.

Everything is drawn with numpy in this file (no third-party footage):

    python assets/make_demo_video.py               # writes assets/demo_input.mp4
    python assets/make_demo_video.py --frames 81 --width 960 --height 544 --output big.mp4
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wanx.video import write_video  # noqa: E402

SKY_TOP = np.array([90, 150, 235], dtype=np.float32)
SKY_HORIZON = np.array([200, 225, 250], dtype=np.float32)
GRASS = np.array([70, 150, 60], dtype=np.float32)
BALL = np.array([220, 40, 40], dtype=np.float32)
SQUARE = np.array([40, 60, 200], dtype=np.float32)


def draw_frame(k: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """Frame k of the clip as uint8 [height, width, 3]."""
    phase = k / max(1, num_frames - 1)  # 0 .. 1 over the clip
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = 0.62 * height

    mix = np.clip(y / horizon, 0.0, 1.0)[..., None]
    image = (1 - mix) * SKY_TOP + mix * SKY_HORIZON
    ground = (y >= horizon)[..., None]
    stripes = 0.9 + 0.1 * np.sin((x + 40 * phase * width / 8) / width * 24.0)[..., None]
    image = np.where(ground, GRASS * stripes, image)

    # The ball rolls left to right and bounces once.
    radius = 0.09 * height
    cx = (0.1 + 0.8 * phase) * width
    cy = horizon - radius - abs(np.sin(np.pi * 2 * phase)) * 0.25 * height
    ball = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    shade = np.clip(1.15 - 0.5 * np.hypot(x - cx + radius / 3, y - cy + radius / 3) / radius, 0.5, 1.15)
    image = np.where(ball[..., None], BALL * shade[..., None], image)

    # The square slides right to left across the sky.
    side = 0.12 * height
    sx = (0.85 - 0.7 * phase) * width
    sy = 0.18 * height
    square = (abs(x - sx) <= side / 2) & (abs(y - sy) <= side / 2)
    image = np.where(square[..., None], SQUARE, image)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    """Write the clip; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--output", default=os.path.join(here, "demo_input.mp4"))
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=176)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--fps", type=float, default=16.0)
    args = parser.parse_args(argv)
    frames = np.stack([draw_frame(k, args.frames, args.height, args.width) for k in range(args.frames)])
    write_video(args.output, frames, fps=args.fps)
    print(f"wrote {args.output}: {args.frames} frames, {args.width}x{args.height}, {args.fps:g} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
