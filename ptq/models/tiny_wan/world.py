"""The tiny model's world: its vocabulary, scenes <-> prompts, and a batched renderer of the videos it was trained on
(synthetic data; runs on any torch device)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

#: Colour names -> RGB in [0, 1].
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8),
    "orange": (1.0, 0.55, 0.05),
    "cyan": (0.1, 0.85, 0.9),
    "pink": (1.0, 0.5, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.5, 0.5, 0.5),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring")
#: Direction name -> (dx, dy) unit step in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up left": (-0.7071, -0.7071),
    "up right": (0.7071, -0.7071),
    "down left": (-0.7071, 0.7071),
    "down right": (0.7071, 0.7071),
}
#: Size word ("" = medium) -> radius in pixels at 64x64.
SIZES: dict[str, float] = {"small": 5.0, "": 8.0, "big": 12.0}
#: Non-translating motions.
SCALINGS: tuple[str, ...] = ("growing", "shrinking")
#: Background style word ("" = plain).
BACKGROUND_STYLES: tuple[str, ...] = ("", "striped", "checkered", "gradient")

_FUNCTION_WORDS = ("a", "an", "and", "on", "moving", "background")

#: Every word the tokenizer knows (besides special tokens); prompts outside it map to ``<unk>``.
TINY_VOCAB: list[str] = list(
    dict.fromkeys(
        [*_FUNCTION_WORDS, *COLORS, *SHAPES, "left", "right", "up", "down", *(s for s in SIZES if s)]
        + [*SCALINGS, *(s for s in BACKGROUND_STYLES if s)]
    )
)

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"


# ---------------------------------------------------------------------------------------------------------
# The tiny model's world: scenes <-> prompts, and a batched renderer (runs on any torch device)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object: colour, shape, size word ("", "small", "big"), motion (a DIRECTIONS key or a SCALINGS word)."""

    color: str
    shape: str
    size: str
    motion: str


@dataclass(frozen=True)
class SceneSpec:
    """One or two objects on a background; ``bg_color`` None = not named in the prompt (drawn at random)."""

    objects: tuple[ObjectSpec, ...]
    bg_style: str = ""
    bg_color: str | None = None


def scene_to_prompt(scene: SceneSpec) -> str:
    """``SceneSpec`` -> prompt, e.g. "a small red circle moving up left and a blue ring growing on a striped
    black background"."""
    parts = []
    for obj in scene.objects:
        motion = f"moving {obj.motion}" if obj.motion in DIRECTIONS else obj.motion
        size = f"{obj.size} " if obj.size else ""
        words = f"{size}{obj.color} {obj.shape} {motion}"
        parts.append(f"{'an' if words[0] in 'aeiou' else 'a'} {words}")
    text = " and ".join(parts)
    if scene.bg_color is not None:
        words = f"{scene.bg_style} {scene.bg_color}".strip()
        text += f" on {'an' if words[0] in 'aeiou' else 'a'} {words} background"
    return text


def parse_prompt(prompt: str) -> SceneSpec:
    """Inverse of :func:`scene_to_prompt` (lower-cased, whitespace-normalised); raises ValueError otherwise."""
    words = prompt.lower().replace(",", " ").split()
    i = 0

    def expect(*options: str) -> str:
        nonlocal i
        if i >= len(words) or words[i] not in options:
            raise ValueError(f"cannot parse {prompt!r} at word {i}: expected one of {options}")
        i += 1
        return words[i - 1]

    objects = []
    while True:
        expect("a", "an")
        size = words[i] if i < len(words) and words[i] in SIZES and words[i] else ""
        i += bool(size)
        color = expect(*COLORS)
        shape = expect(*SHAPES)
        if i < len(words) and words[i] in SCALINGS:
            motion = expect(*SCALINGS)
        else:
            expect("moving")
            motion = expect("left", "right", "up", "down")
            if motion in ("up", "down") and i < len(words) and words[i] in ("left", "right"):
                motion += " " + expect("left", "right")
        objects.append(ObjectSpec(color, shape, size, motion))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    bg_style, bg_color = "", None
    if i < len(words):
        expect("on")
        expect("a", "an")
        if words[i] in BACKGROUND_STYLES:
            bg_style = expect(*BACKGROUND_STYLES[1:])
        bg_color = expect(*COLORS)
        expect("background")
    if i != len(words):
        raise ValueError(f"trailing words in {prompt!r}")
    return SceneSpec(tuple(objects), bg_style, bg_color)


def sample_scene(rng: Any, two_object_prob: float = 0.3, no_background_prob: float = 0.1) -> SceneSpec:
    """A random scene (``rng``: a ``random.Random``); object colours differ from the background's and each
    other's."""
    colors = list(COLORS)
    bg_color = rng.choice(colors)
    n = 2 if rng.random() < two_object_prob else 1
    objects: list[ObjectSpec] = []
    used = {bg_color}
    for _ in range(n):
        color = rng.choice([c for c in colors if c not in used])
        used.add(color)
        motion = rng.choice(list(DIRECTIONS)) if rng.random() < 0.8 else rng.choice(SCALINGS)
        size = rng.choice(["small", "", "", "big"]) if motion in DIRECTIONS else ""
        objects.append(ObjectSpec(color, rng.choice(SHAPES), size, motion))
    bg_style = rng.choice(BACKGROUND_STYLES)
    if rng.random() < no_background_prob:
        return SceneSpec(tuple(objects), "", None)
    return SceneSpec(tuple(objects), bg_style, bg_color)


_SHAPE_ID = {s: k for k, s in enumerate(SHAPES)}
_STYLE_ID = {s: k for k, s in enumerate(BACKGROUND_STYLES)}
_COLOR_NAMES = list(COLORS)


def render_scenes(
    scenes: Sequence[SceneSpec],
    generator: torch.Generator | int = 0,
    num_frames: int = 9,
    size: int = 64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Render scenes to videos ``[B, 3, num_frames, size, size]`` in [-1, 1] (anti-aliased shapes).

    Positions, speeds and unnamed background colours are drawn from ``generator`` (a CPU generator or a seed),
    so a seed gives the same videos on any device. Speeds/radii are given for 64 px and scale with ``size``.
    """
    gen = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    b, k = len(scenes), 2
    u = torch.rand(b, k, 8, generator=gen)  # per-object random numbers
    ub = torch.rand(b, 2, generator=gen)  # per-scene random numbers
    px = size / 64.0
    ul, ubl = u.tolist(), ub.tolist()
    shape_l = [[0] * k for _ in range(b)]
    present_l = [[0.0] * k for _ in range(b)]
    color_l = [[(0.0, 0.0, 0.0)] * k for _ in range(b)]
    cx0_l, cy0_l, vx_l, vy_l = ([[0.0] * k for _ in range(b)] for _ in range(4))
    r0_l, dr_l = [[8.0] * k for _ in range(b)], [[0.0] * k for _ in range(b)]
    style_l, bg_l = [0] * b, [(0.0, 0.0, 0.0)] * b
    half = (num_frames - 1) / 2
    for n, scene in enumerate(scenes):
        bg_name = scene.bg_color
        if bg_name is None:
            names = {o.color for o in scene.objects}
            free = [c for c in _COLOR_NAMES if c not in names]
            bg_name = free[int(ubl[n][0] * len(free)) % len(free)]
            style_l[n] = int(ubl[n][1] * len(BACKGROUND_STYLES)) % len(BACKGROUND_STYLES)
        else:
            style_l[n] = _STYLE_ID[scene.bg_style]
        bg_l[n] = COLORS[bg_name]
        two = len(scene.objects) > 1
        for j, obj in enumerate(scene.objects[:k]):
            r = ul[n][j]
            present_l[n][j] = 1.0
            shape_l[n][j] = _SHAPE_ID[obj.shape]
            color_l[n][j] = COLORS[obj.color]
            # Centre of the path: jittered; two objects get opposite offsets along a diagonal.
            mid_x = 32 + (r[0] - 0.5) * 20 + ((-10 if j == 0 else 10) if two else 0)
            mid_y = 32 + (r[1] - 0.5) * 20 + ((-8 if j == 0 else 8) if two else 0)
            if obj.motion in DIRECTIONS:
                dx, dy = DIRECTIONS[obj.motion]
                speed = 1.6 + 0.8 * r[2]
                vx_l[n][j], vy_l[n][j] = dx * speed, dy * speed
                r0_l[n][j] = SIZES[obj.size] * (0.85 + 0.3 * r[3])
            else:
                lo, hi = 3.5 + r[3], 13.0 + 2.0 * r[4]
                start, end = (lo, hi) if obj.motion == "growing" else (hi, lo)
                r0_l[n][j], dr_l[n][j] = start, (end - start) / max(num_frames - 1, 1)
            cx0_l[n][j], cy0_l[n][j] = mid_x - vx_l[n][j] * half, mid_y - vy_l[n][j] * half
    shape_id, style = torch.tensor(shape_l), torch.tensor(style_l)
    present, color, bg = torch.tensor(present_l), torch.tensor(color_l), torch.tensor(bg_l)
    cx0, cy0, vx, vy = (torch.tensor(a) for a in (cx0_l, cy0_l, vx_l, vy_l))
    r0, dr = torch.tensor(r0_l), torch.tensor(dr_l)
    dev = torch.device(device)
    t = torch.arange(num_frames, dtype=torch.float32, device=dev).view(1, 1, -1, 1, 1)

    def per_obj(a: torch.Tensor) -> torch.Tensor:
        return a.to(dev).view(b, k, 1, 1, 1)

    coords = (torch.arange(size, dtype=torch.float32, device=dev) + 0.5) / px
    xg, yg = coords.view(1, 1, 1, 1, -1), coords.view(1, 1, 1, -1, 1)
    cx = per_obj(cx0) + per_obj(vx) * t
    cy = per_obj(cy0) + per_obj(vy) * t
    rad = (per_obj(r0) + per_obj(dr) * t).clamp_min(1.0)
    dx, dy = xg - cx, yg - cy  # [B, K, F, H, W]
    dist = torch.sqrt(dx * dx + dy * dy)
    adx, ady = dx.abs(), dy.abs()
    sdf = torch.stack(
        [
            dist - rad,  # circle
            torch.maximum(adx, ady) - 0.85 * rad,  # square
            torch.maximum(dy - 0.6 * rad, 0.866 * adx * 1.2 - 0.5 * dy - 0.6 * rad),  # triangle (apex up)
            adx + ady - 1.2 * rad,  # diamond
            (dist - 0.78 * rad).abs() - 0.3 * rad,  # ring
        ]
    )  # [S, B, K, F, H, W]
    sid = shape_id.to(dev).view(1, b, k, 1, 1, 1).expand(1, b, k, num_frames, size, size)
    d = sdf.gather(0, sid).squeeze(0) * px  # signed distance in output pixels
    alpha = (0.5 - d).clamp(0.0, 1.0) * per_obj(present)
    # Background: plain, vertical stripes, checkerboard or top-to-bottom gradient between c and a darker c2.
    c1 = bg.to(dev).view(b, 3, 1, 1, 1)
    c2 = 0.55 * c1 + 0.15
    xi, yi = torch.arange(size, device=dev) * 8 // size, torch.arange(size, device=dev) * 8 // size
    stripes = (xi.view(1, -1) % 2).float().expand(size, size)
    checks = ((xi.view(1, -1) + yi.view(-1, 1)) % 2).float()
    grad = (torch.arange(size, device=dev, dtype=torch.float32) / (size - 1)).view(-1, 1).expand(size, size)
    mix = torch.stack([torch.zeros(size, size, device=dev), stripes, checks, grad])[style.to(dev)]
    video = (c1 * (1 - mix.view(b, 1, 1, size, size)) + c2 * mix.view(b, 1, 1, size, size)).expand(
        b, 3, num_frames, size, size
    )
    for j in range(k):
        a = alpha[:, j].unsqueeze(1)  # [B, 1, F, H, W]
        col = color[:, j].to(dev).view(b, 3, 1, 1, 1)
        video = video * (1 - a) + col * a
    return (video * 2 - 1).contiguous()



def read_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty, non-comment lines of a prompt file."""
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
