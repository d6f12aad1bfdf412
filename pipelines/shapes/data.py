"""Procedural data: coloured shapes on textured backgrounds, still and moving, deterministic from a seed.

Every batch is a pure function of (seed, batch index, batch size): the random parameters are drawn on the CPU
from a generator seeded with both, then the pixels are rendered with tensor ops on any device. Images are
float tensors in [-1, 1], (B, 3, H, W); videos (B, 3, T, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.10, 0.90),
    "cyan": (0.10, 0.90, 0.90),
}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = ("left", "right", "up", "down")
_DIRECTION_VECTORS = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # (dx, dy), y grows downwards


def image_caption(shape: int, colour: int) -> str:
    return f"a {COLOUR_NAMES[colour]} {SHAPES[shape]}"


def video_caption(shape: int, colour: int, direction: int) -> str:
    return f"{image_caption(shape, colour)} moving {DIRECTIONS[direction]}"


@dataclass
class ShapeBatch:
    pixels: torch.Tensor  # (B, 3, H, W) or (B, 3, T, H, W), in [-1, 1]
    shape: torch.Tensor  # (B,) index into SHAPES
    colour: torch.Tensor  # (B,) index into COLOUR_NAMES
    # Written from the CPU draws: read back from GPU tensors, each caption would wait for the GPU to drain its queue,
    # every training step.
    captions: list[str]
    direction: torch.Tensor | None = None  # (B,) index into DIRECTIONS (videos)


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device`. To a GPU through pinned memory, without waiting: a copy from pageable memory holds
    the host until the GPU has drained its queue, so each training step's batch would leave the GPU idle while the
    host drew the next one."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _background(g: torch.Generator, n: int, size: int, device) -> torch.Tensor:
    """Grey textures (level, stripes, noise): structure the model must ignore, never mistaken for a colour."""
    level, amp = _uniform(g, n, 0.25, 0.6), _uniform(g, n, 0.03, 0.1)
    freq, angle, phase = _uniform(g, n, 1.0, 4.0), _uniform(g, n, 0.0, math.pi), _uniform(g, n, 0.0, 2 * math.pi)
    noise = 0.03 * torch.randn(n, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    stripes = amp[:, None, None] * torch.sin(2 * math.pi * freq[:, None, None] * proj / size + phase[:, None, None])
    grey = (level[:, None, None] + stripes)[:, None] + noise
    return to_device(grey, device).expand(n, 3, size, size)


def shape_masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) masks; cx, cy, r may carry a trailing time axis (B, T) for videos -> (B, T, H, W)."""
    extra = cx.dim() - 1
    coords = torch.arange(float(size), device=cx.device)
    x = coords.view(*([1] * (extra + 1)), 1, size)
    y = coords.view(*([1] * (extra + 1)), size, 1)
    view = lambda t: t.reshape(*t.shape, 1, 1)  # noqa: E731
    dx, dy, r = x - view(cx), y - view(cy), view(r)
    s = view(shape.reshape(shape.shape + (1,) * extra).expand(cx.shape))
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    rise = dy + r  # 0 at the apex, 1.8 r at the base
    triangle = (rise >= 0) & (dy <= 0.8 * r) & (dx.abs() <= rise / 1.8)
    cross = ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r))
    masks = torch.where(s == 0, circle, torch.where(s == 1, square, torch.where(s == 2, triangle, cross)))
    return masks.float()


def _paint(background: torch.Tensor, masks: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    rgb = to_device(torch.tensor(list(COLOURS.values())), background.device)[colour]  # (B, 3)
    rgb = rgb.reshape(rgb.shape[0], 3, *([1] * (background.dim() - 2)))
    masks = masks.unsqueeze(1)
    return (background * (1 - masks) + rgb * masks) * 2 - 1


def image_batch(seed: int, index: int, batch_size: int, size: int = 32, device="cpu") -> ShapeBatch:
    g = _generator(seed, index)
    shape = torch.randint(len(SHAPES), (batch_size,), generator=g)
    colour = torch.randint(len(COLOURS), (batch_size,), generator=g)
    r = _uniform(g, batch_size, 0.15 * size, 0.3 * size)
    cx, cy = _uniform(g, batch_size, 0, 1) * (size - 1 - 2 * r) + r, _uniform(g, batch_size, 0, 1) * (size - 1 - 2 * r) + r
    background = _background(g, batch_size, size, device)
    captions = [image_caption(s, c) for s, c in zip(shape.tolist(), colour.tolist())]
    shape, colour, cx, cy, r = (to_device(t, device) for t in (shape, colour, cx, cy, r))
    masks = shape_masks(shape, cx, cy, r, size)
    return ShapeBatch(_paint(background, masks, colour), shape, colour, captions)


def _bounce(start: torch.Tensor, velocity: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, frames: int) -> torch.Tensor:
    """Positions over time inside [lo, hi], reflecting off both ends (a triangle wave)."""
    t = torch.arange(float(frames))
    span = (hi - lo)[:, None]
    u = (start - lo)[:, None] + velocity[:, None] * t
    return lo[:, None] + span - ((u % (2 * span)) - span).abs()


CLIP_FRAMES = 17  # a video's length; inside it a shape never turns back
# A motion trail: the shape again at each of the positions of its last TRAIL_FRAMES frames (at the clip's constant
# velocity), fading from TRAIL_OPACITY. It shows the direction of motion in every frame, as motion blur does in real
# video.
TRAIL_FRAMES, TRAIL_OPACITY = 6, 0.6


def video_batch(seed: int, index: int, batch_size: int, frames: int = CLIP_FRAMES, size: int = 32, start: int = 0,
                trail: bool = False, device="cpu") -> ShapeBatch:
    """Shapes moving at 0.6 to 0.9 px per frame in one of four directions, bouncing off the edges, frames
    [start, start + frames) of each path. The first CLIP_FRAMES frames never bounce: a clip moves one way throughout,
    starting near the edge it moves away from. (With a bounce inside the clip, "left" and "right" would differ mostly
    in where the clip starts.) A model needs to know where each token is, in the clip and in the frame, to draw a
    captioned direction from noise (`models.with_positions`).

    With `trail`, each shape draws a fading motion trail behind it (TRAIL_FRAMES). Without one, a clip played
    backwards is a clip of the opposite direction, so the data summed over the direction word is symmetric in time;
    a trail makes the direction a feature of every frame, learnt as the shape and colour are. Trails are for clips
    (frames inside the first CLIP_FRAMES), where the velocity never changes."""
    if trail and start + frames > CLIP_FRAMES:
        raise ValueError(f"motion trails follow a clip's constant velocity: frames [{start}, {start + frames}) run past "
                         f"the first {CLIP_FRAMES}, where shapes bounce")
    g = _generator(seed, index)
    shape = torch.randint(len(SHAPES), (batch_size,), generator=g)
    colour = torch.randint(len(COLOURS), (batch_size,), generator=g)
    direction = torch.randint(len(DIRECTIONS), (batch_size,), generator=g)
    r = _uniform(g, batch_size, 0.15 * size, 0.22 * size)
    speed = _uniform(g, batch_size, 0.6, 0.9)
    lo, hi = r, size - 1 - r
    free = (hi - lo - (CLIP_FRAMES - 1) * speed).clamp_min(0)  # room left after a clip's travel
    along = lo + _uniform(g, batch_size, 0, 1) * free  # start, measured from the edge the shape moves away from
    across = lo + _uniform(g, batch_size, 0, 1) * (hi - lo)
    vec = _DIRECTION_VECTORS[direction]
    forward = (vec.sum(1) > 0)  # moving towards larger coordinates
    start_along = torch.where(forward, along, hi - (along - lo))
    horizontal = vec[:, 0] != 0
    x0, y0 = torch.where(horizontal, start_along, across), torch.where(horizontal, across, start_along)
    xs = _bounce(x0, vec[:, 0] * speed, lo, hi, start + frames)[:, start:]
    ys = _bounce(y0, vec[:, 1] * speed, lo, hi, start + frames)[:, start:]
    background = _background(g, batch_size, size, device).unsqueeze(2).expand(-1, -1, frames, -1, -1)
    captions = [video_caption(s, c, d) for s, c, d in zip(shape.tolist(), colour.tolist(), direction.tolist())]
    shape, colour, direction, xs, ys = (to_device(t, device) for t in (shape, colour, direction, xs, ys))
    radii = to_device(r, device)[:, None].expand(-1, frames)
    masks = shape_masks(shape, xs, ys, radii, size)
    if trail:
        masks = torch.maximum(masks, _trail(shape, xs, ys, radii, to_device(vec * speed[:, None], device), size))
    pixels = _paint(background, masks, colour)
    return ShapeBatch(pixels, shape, colour, captions, direction)


def _trail(shape, xs, ys, radii, velocity, size: int) -> torch.Tensor:
    """Opacity (B, T, H, W) of the shape at its positions 1 .. TRAIL_FRAMES frames back along its velocity (B, 2),
    fading linearly from TRAIL_OPACITY; where two overlap, the stronger one."""
    opacity = torch.zeros(*xs.shape, size, size, dtype=xs.dtype, device=xs.device)
    for k in range(1, TRAIL_FRAMES + 1):
        back = shape_masks(shape, xs - k * velocity[:, :1], ys - k * velocity[:, 1:], radii, size)
        opacity = torch.maximum(opacity, back * TRAIL_OPACITY * (1 - (k - 1) / TRAIL_FRAMES))
    return opacity
