"""A deterministic, seeded world of shapes: the project's own segmentation task, with exact label maps, so that a
small DiGSeg model can be trained and evaluated end to end on a CPU without downloading any weights.

- The class is the *shape* only: fill colour, texture, size, rotation and position are drawn independently of it.
- Later shapes occlude earlier ones and the label map records what is visible; a placement that would hide more
  than half of an earlier shape, or leave too little of the new one in the frame, is redrawn.
- Shapes are rasterised at pixel centres; in the ``"plain"`` style the image is painted through the same masks
  that write the label map, so both agree exactly. Fill colours are redrawn until they contrast with what they cover.

Rendering styles (``STYLES``) judge a model on shapes, not on one renderer: ``"plain"`` is generator version 2
exactly; ``"varied"`` (training) draws, per scene, antialiasing, blur, JPEG, noise, checker textures, outlines and
hollow shapes; ``"shifted"`` (evaluation only) uses renderings ``"varied"`` never draws (dots, stronger blur,
harsher JPEG). Only the image changes with the style, and styles draw from their own random stream.

Label maps use the generic folder format: ``0`` = background, ``c + 1`` = ``SHAPE_CLASSES[c]``. Scene ``i`` of
split ``s`` uses seed ``SPLIT_SEED_OFFSETS[s] + i``; the splits own disjoint blocks of ``SEEDS_PER_SPLIT`` seeds,
so held-out scenes are never trained on.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from digseg_diffusers.data.readers import BACKGROUND_INDEX, ValidationExample

# Six shapes that stay distinct at 64 px once rotated: a heart (in generator version 1) was read as a circle or a
# triangle at that size (per-class IoU 0.06 for the first demo model), so it was dropped.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")

BACKGROUND_LABEL = 0
"""Label-map value of background pixels; shape class ``c`` is written as ``c + 1``."""

SEEDS_PER_SPLIT = 10_000_000
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "val": SEEDS_PER_SPLIT, "test": 2 * SEEDS_PER_SPLIT}

GENERATOR_VERSION = 2
"""Bumped whenever the same seed would draw a different scene (2: six classes, larger shapes, at most 3 per scene)."""

# Size of a shape's radius as a fraction of the image side: 11-19 px at 64 px, so that with a 4x VAE a shape
# spans 6-10 latent pixels (version 1's 8-15 px left 4-8, and the demo model learned shapes several times slower).
RADIUS_RANGE: tuple[float, float] = (0.18, 0.30)
DEFAULT_MAX_OBJECTS = 3
# Shape centres are drawn in this fraction of the image (shapes may leave the frame a little).
CENTER_RANGE: tuple[float, float] = (0.1, 0.9)
# An earlier shape must keep at least this fraction of its in-frame area visible.
MIN_VISIBLE_FRACTION = 0.5
# A new shape must show at least this fraction of its nominal area inside the frame.
MIN_IN_FRAME_FRACTION = 0.4
# Minimum Euclidean RGB distance between a fill colour and the mean colour of the pixels it covers.
MIN_COLOR_CONTRAST = 90.0
MAX_PLACEMENT_TRIES = 40
MAX_COLOR_TRIES = 30
SUPERSAMPLING = 4  # antialiased styles render the image at 4x and box-filter it down


@dataclass(frozen=True)
class RenderStyle:
    """How a scene is drawn (never what it shows: the label map depends only on the layout).

    Probabilities are per scene (per shape for outlines and textures); ranges are drawn uniformly.
    """

    name: str
    radius_range: tuple[float, float] = RADIUS_RANGE
    noise_std: tuple[float, float] = (2.0, 10.0)
    antialias_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 0.0)  # pixels
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (95, 95)
    texture_prob: float = 0.0  # a fill (and, separately, the background) replaced by one of `textures`
    textures: tuple[str, ...] = ()
    outline_prob: float = 0.0  # a filled shape gets a stroke of another colour along its border
    hollow_prob: float = 0.0  # only the stroke is drawn; what the shape covers shows through
    outline_width: tuple[float, float] = (1.5, 3.0)  # pixels

    @property
    def is_plain(self) -> bool:
        return self == PLAIN_STYLE


PLAIN_STYLE = RenderStyle("plain")
STYLES: dict[str, RenderStyle] = {
    "plain": PLAIN_STYLE,
    "varied": RenderStyle(
        "varied", radius_range=(0.15, 0.33), noise_std=(0.0, 12.0), antialias_prob=0.6,
        blur_prob=0.4, blur_sigma=(0.3, 1.0), jpeg_prob=0.4, jpeg_quality=(40, 90),
        texture_prob=0.15, textures=("checker",), outline_prob=0.15, hollow_prob=0.1, outline_width=(1.5, 3.0),
    ),
    "shifted": RenderStyle(
        "shifted", radius_range=(0.15, 0.33), noise_std=(12.0, 20.0), antialias_prob=1.0,
        blur_prob=0.5, blur_sigma=(1.1, 1.5), jpeg_prob=0.5, jpeg_quality=(15, 35),
        texture_prob=0.3, textures=("dots",), outline_prob=0.2, hollow_prob=0.1, outline_width=(3.0, 4.5),
    ),
}
"""Rendering styles by name; ``"shifted"`` shares no texture and no degradation range with ``"varied"``."""


def _regular_star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = np.arange(2 * points) * math.pi / points - math.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Polygons in a unit frame (shape radius 1). Equilateral triangle with circumradius 1.2, 5-point star.
_POLYGONS: dict[str, np.ndarray] = {
    "triangle": _regular_star(3, 1.2, 1.2)[::2],
    "star": _regular_star(5, 1.15, 0.5),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(vertices)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(count):
            x1, y1 = vertices[i]
            x2, y2 = vertices[(i + 1) % count]
            crosses = (y1 > v) != (y2 > v)
            x_at_v = x1 + (x2 - x1) * (v - y1) / (y2 - y1)
            inside ^= crosses & (u < x_at_v)
    return inside


def rasterize_shape(
    shape: int | str,
    center: tuple[float, float],
    radius: float,
    rotation: float,
    size: int | tuple[int, int],
) -> np.ndarray:
    """Boolean mask of one shape, sampled at pixel centres (no antialiasing).

    Args:
        shape: a class index into ``SHAPE_CLASSES`` or a class name.
        center: ``(x, y)`` in pixels; pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``.
        radius: size of the shape in pixels (the circle's radius; other shapes are scaled alike).
        rotation: counter-clockwise rotation in radians.
        size: image side, or ``(height, width)``.
    """
    name = SHAPE_CLASSES[shape] if isinstance(shape, (int, np.integer)) else shape
    if name not in SHAPE_CLASSES:
        raise ValueError(f"`shape` must be one of {SHAPE_CLASSES} or an index into it, got {shape!r}.")
    if radius <= 0:
        raise ValueError(f"`radius` must be positive, got {radius}.")
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = xs - center[0], ys - center[1]
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    u = (dx * cos_r + dy * sin_r) / radius
    v = (-dx * sin_r + dy * cos_r) / radius
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 1.0) & (av <= 0.32)) | ((au <= 0.32) & (av <= 1.0))
    return _inside_polygon(u, v, _POLYGONS[name])


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn shape, in drawing order (later ones occlude earlier ones)."""

    class_index: int
    center: tuple[float, float]
    radius: float
    rotation: float

    @property
    def class_name(self) -> str:
        return SHAPE_CLASSES[self.class_index]


@dataclass(frozen=True)
class SyntheticScene:
    """A generated scene: ``image`` (``uint8 [H, W, 3]``), ``label`` (``uint8 [H, W]``, ``0`` = background,
    ``c + 1`` = ``SHAPE_CLASSES[c]``), the sorted ``class_indices`` visible in it, and its ``objects`` in drawing
    order (a fully described scene, for tests and debugging)."""

    seed: int
    image: np.ndarray
    label: np.ndarray
    class_indices: tuple[int, ...]
    objects: tuple[SyntheticObject, ...]

    @property
    def class_names(self) -> list[str]:
        return [SHAPE_CLASSES[c] for c in self.class_indices]

    def mask(self, class_index: int) -> np.ndarray:
        """Boolean ``[H, W]`` mask of the visible pixels of one class."""
        return self.label == class_index + 1

    def validation_example(self) -> ValidationExample:
        """The scene as the `ValidationExample` evaluation reads: class indices, ``BACKGROUND_INDEX`` (-1) for
        background, every shape class in the vocabulary."""
        label = np.where(self.label == BACKGROUND_LABEL, BACKGROUND_INDEX, self.label.astype(np.int64) - 1)
        return ValidationExample(self.image, label, list(SHAPE_CLASSES), image_path=f"synthetic scene {self.seed}")


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _pixel_grid(size: int, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sample positions ``(ys, xs)`` of a ``size * scale`` grid, in pixels of the ``size`` image from its centre."""
    grid = (np.mgrid[0 : size * scale, 0 : size * scale].astype(np.float64) + 0.5) / scale - size / 2
    return grid[0], grid[1]


def _blend(weight: np.ndarray, color_a: np.ndarray, color_b: np.ndarray) -> np.ndarray:
    """`color_a` where `weight` is 0, `color_b` where it is 1, mixed in between."""
    return color_a + weight[..., None] * (color_b - color_a)


def _coordinate_ramp(rng: np.random.Generator, size: int, scale: int = 1) -> np.ndarray:
    """Signed distance along a random direction, in pixels from the image centre."""
    angle = rng.uniform(0.0, 2 * math.pi)
    ys, xs = _pixel_grid(size, scale)
    return xs * math.cos(angle) + ys * math.sin(angle)


def _gradient(rng: np.random.Generator, size: int, color_a: np.ndarray, color_b: np.ndarray, scale: int = 1) -> np.ndarray:
    ramp = _coordinate_ramp(rng, size, scale)
    return _blend((ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-9), color_a, color_b)


def _stripes(rng: np.random.Generator, size: int, color_a: np.ndarray, color_b: np.ndarray, scale: int = 1) -> np.ndarray:
    ramp = _coordinate_ramp(rng, size, scale)
    period = rng.uniform(size / 16, size / 4)
    phase = rng.uniform(0.0, 2 * math.pi)
    wave = np.sin(2 * math.pi * ramp / period + phase)
    return _blend((wave > 0).astype(np.float64) if rng.random() < 0.5 else (wave + 1) / 2, color_a, color_b)


def _smooth_noise(rng: np.random.Generator, size: int, scale: int = 1) -> np.ndarray:
    grid = int(rng.integers(2, 7))
    coarse = rng.integers(0, 256, size=(grid, grid, 3)).astype(np.uint8)
    side = size * scale
    return np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), dtype=np.float64)


def _texture(kind: str, rng: np.random.Generator, size: int, color_a: np.ndarray, color_b: np.ndarray, scale: int) -> np.ndarray:
    """A two-colour checkerboard or polka-dot pattern (random period, phase and angle; styles only)."""
    period = rng.uniform(size / 12, size / 5)
    angle = rng.uniform(0.0, math.pi / 2)
    ys, xs = _pixel_grid(size, scale)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / period + rng.uniform(0, 1)
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) / period + rng.uniform(0, 1)
    if kind == "checker":
        weight = ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    elif kind == "dots":
        weight = ((u - np.floor(u) - 0.5) ** 2 + (v - np.floor(v) - 0.5) ** 2 <= 0.3**2).astype(np.float64)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return _blend(weight, color_a, color_b)


_TWO_COLOR_PATTERNS = {"gradient": _gradient, "stripes": _stripes}


def _background(rng: np.random.Generator, size: int, scale: int = 1, texture: str | None = None) -> np.ndarray:
    if texture is not None:
        return _texture(texture, rng, size, _random_color(rng), _random_color(rng), scale)
    kind = rng.choice(["gradient", "stripes", "noise"])
    if kind == "noise":
        return _smooth_noise(rng, size, scale)
    return _TWO_COLOR_PATTERNS[kind](rng, size, _random_color(rng), _random_color(rng), scale)


def _contrasting_colors(rng: np.random.Generator, num_colors: int, covered_mean: np.ndarray) -> list[np.ndarray]:
    """`num_colors` random colours, redrawn (up to MAX_COLOR_TRIES) until all differ clearly from `covered_mean`."""
    best_colors, best_contrast = None, -1.0
    for _ in range(MAX_COLOR_TRIES):
        colors = [_random_color(rng) for _ in range(num_colors)]
        contrast = min(float(np.linalg.norm(c - covered_mean)) for c in colors)
        if contrast > best_contrast:
            best_colors, best_contrast = colors, contrast
        if contrast >= MIN_COLOR_CONTRAST:
            break
    return best_colors


def _fill(rng: np.random.Generator, size: int, covered_mean: np.ndarray, scale: int = 1, texture: str | None = None) -> np.ndarray:
    """A fill (solid, gradient or stripes; or `texture`) whose colours all contrast with `covered_mean`."""
    if texture is not None:
        return _texture(texture, rng, size, *_contrasting_colors(rng, 2, covered_mean), scale)
    kind = rng.choice(["solid", "gradient", "stripes"], p=[0.6, 0.25, 0.15])
    num_colors = 1 if kind == "solid" else 2
    best_colors = _contrasting_colors(rng, num_colors, covered_mean)
    if kind == "solid":
        return np.broadcast_to(best_colors[0], (size * scale, size * scale, 3))
    return _TWO_COLOR_PATTERNS[kind](rng, size, *best_colors, scale)


def _resolve_style(style: str | RenderStyle | None) -> RenderStyle:
    if style is None:
        return PLAIN_STYLE
    if isinstance(style, RenderStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"`style` must be one of {tuple(STYLES)} or a RenderStyle, got {style!r}.")
    return STYLES[style]


def _stroke(mask: np.ndarray, width: float) -> np.ndarray:
    """The pixels of `mask` within `width` pixels of its border (a square erosion)."""
    side = 2 * max(1, int(round(width))) + 1
    eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(side))
    return mask & ~(np.asarray(eroded) > 127)


def _degrade(image: np.ndarray, style: RenderStyle, style_rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Blur, sensor noise and JPEG compression of a float image in [0, 255] (styles other than plain)."""
    if style_rng.random() < style.blur_prob:
        blurred = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        image = np.asarray(blurred.filter(ImageFilter.GaussianBlur(style_rng.uniform(*style.blur_sigma))), dtype=np.float64)
    image = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    if style_rng.random() < style.jpeg_prob:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(style_rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1)))
        image = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)
    return image


def generate_scene(
    seed: int,
    size: int = 64,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    min_objects: int = 1,
    style: str | RenderStyle | None = None,
) -> SyntheticScene:
    """Draw one scene; the same arguments always give the same arrays.

    Args:
        seed: any non-negative integer (see ``SPLIT_SEED_OFFSETS`` for the seeds each split uses).
        size: image side in pixels (square images).
        max_objects / min_objects: the number of shapes is drawn uniformly in ``[min_objects, max_objects]``;
            a shape that finds no acceptable placement is left out, so a scene can show fewer (never zero).
        style: a name in ``STYLES`` or a `RenderStyle` (default ``"plain"``: generator version 2's scenes).
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"`size` must be an integer of at least 16 pixels, got {size!r}.")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"`min_objects` and `max_objects` must satisfy 1 <= min_objects <= max_objects, "
            f"got min_objects={min_objects}, max_objects={max_objects}."
        )
    style = _resolve_style(style)
    plain = style.is_plain
    rng = np.random.default_rng(int(seed))
    # The style's own choices come from a second stream, so they never shift the plain style's draws.
    style_rng = np.random.default_rng([int(seed), 1 + sum(map(ord, style.name))])
    scale = 1 if plain or style_rng.random() >= style.antialias_prob else SUPERSAMPLING

    def texture_choice() -> str | None:
        if plain or style_rng.random() >= style.texture_prob:
            return None
        return str(style_rng.choice(style.textures))

    image = _background(rng, size, scale, texture_choice())  # [size * scale, size * scale, 3]
    label = np.full((size, size), BACKGROUND_LABEL, dtype=np.uint8)
    visible: list[np.ndarray] = []  # visible mask of each placed object
    in_frame_area: list[int] = []
    objects: list[SyntheticObject] = []

    num_objects = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(num_objects):
        class_index = int(rng.integers(len(SHAPE_CLASSES)))
        for _ in range(MAX_PLACEMENT_TRIES):
            radius = rng.uniform(*style.radius_range) * size
            center = (rng.uniform(*CENTER_RANGE) * size, rng.uniform(*CENTER_RANGE) * size)
            rotation = rng.uniform(0.0, 2 * math.pi)
            mask = rasterize_shape(class_index, center, radius, rotation, size)
            nominal = rasterize_shape(class_index, (2 * radius, 2 * radius), radius, 0.0, int(4 * radius) + 1)
            if mask.sum() < MIN_IN_FRAME_FRACTION * nominal.sum():
                continue
            if all(
                (earlier & ~mask).sum() >= MIN_VISIBLE_FRACTION * area
                for earlier, area in zip(visible, in_frame_area)
            ):
                break
        else:
            continue  # no acceptable placement for this shape: leave it out
        paint = mask  # where the shape is painted, at the image's (possibly supersampled) resolution
        if scale != 1:
            paint = rasterize_shape(class_index, (center[0] * scale, center[1] * scale), radius * scale, rotation, size * scale)
        covered_mean = image[paint].mean(axis=0) if paint.any() else image.reshape(-1, 3).mean(axis=0)
        fill = _fill(rng, size, covered_mean, scale, texture_choice())
        if not plain:
            hollow = style_rng.random() < style.hollow_prob
            if hollow or style_rng.random() < style.outline_prob:
                stroke = _stroke(paint, style_rng.uniform(*style.outline_width) * scale)
                fill_mean = np.asarray(fill, dtype=np.float64).reshape(-1, 3).mean(axis=0)
                outline_color = _contrasting_colors(style_rng, 1, covered_mean if hollow else fill_mean)[0]
                fill = np.where(stroke[..., None], outline_color, fill)
                if hollow:
                    paint = stroke
        image = np.where(paint[..., None], fill, image)
        label[mask] = class_index + 1
        visible = [earlier & ~mask for earlier in visible] + [mask]
        in_frame_area.append(int(mask.sum()))
        center = (float(center[0]), float(center[1]))
        objects.append(SyntheticObject(class_index, center, float(radius), float(rotation)))

    if not objects:  # cannot happen with the default ranges; guards against future edits
        raise RuntimeError(f"seed {seed} produced a scene without objects.")
    if scale != 1:  # box filter: each pixel averages its scale x scale samples (antialiased edges)
        image = image.reshape(size, scale, size, scale, 3).mean(axis=(1, 3))
    noise_std = rng.uniform(*style.noise_std)
    noise = rng.normal(0.0, noise_std, size=(size, size, 3))
    if plain:
        image = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    else:
        image = _degrade(image, style, style_rng, noise)
    class_indices = tuple(int(v) - 1 for v in np.unique(label) if v != BACKGROUND_LABEL)
    return SyntheticScene(int(seed), image, label, class_indices, tuple(objects))


def split_seeds(split: str, num_images: int, seed_offset: int | None = None) -> range:
    """The seeds of a split's scenes. Known splits own disjoint blocks of ``SEEDS_PER_SPLIT`` seeds.

    For ``train``/``val``/``test`` the range must stay inside the split's block (so held-out seeds are never
    trained on); any other split name needs an explicit ``seed_offset``.
    """
    if num_images < 0:
        raise ValueError(f"`num_images` must be non-negative, got {num_images}.")
    if split in SPLIT_SEED_OFFSETS:
        block_start = SPLIT_SEED_OFFSETS[split]
        start = block_start if seed_offset is None else seed_offset
        if not (block_start <= start and start + num_images <= block_start + SEEDS_PER_SPLIT):
            raise ValueError(
                f"split {split!r} owns seeds [{block_start}, {block_start + SEEDS_PER_SPLIT}); "
                f"seed_offset={seed_offset} with num_images={num_images} leaves that block."
            )
        return range(start, start + num_images)
    if seed_offset is None:
        raise ValueError(
            f"split {split!r} is not one of {tuple(SPLIT_SEED_OFFSETS)}; pass an explicit `seed_offset`."
        )
    if seed_offset < 0:
        raise ValueError(f"`seed_offset` must be non-negative, got {seed_offset}.")
    return range(seed_offset, seed_offset + num_images)


def split_scene_tensors(split: str, num_scenes: int, size: int, first: int = 0):
    """Scenes `first`, `first + 1`, ... of a split, with their images ``[N, 3, size, size]`` in [-1, 1] (the VAE's
    pixel space) and label maps ``[N, size, size]`` (int64) as torch tensors: what VAE training and studies use."""
    import torch  # only here: the generator itself needs numpy alone

    seeds = split_seeds(split, num_scenes, SPLIT_SEED_OFFSETS[split] + first)
    scenes = [generate_scene(seed, size=size) for seed in seeds]
    images = torch.from_numpy(np.stack([scene.image for scene in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return scenes, images, torch.from_numpy(np.stack([scene.label for scene in scenes])).long()


def write_dataset(
    root: str | os.PathLike,
    split: str = "train",
    num_images: int = 100,
    seed_offset: int | None = None,
    size: int = 64,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    min_objects: int = 1,
    overwrite: bool = False,
    style: str = "plain",
) -> Path:
    """Write scenes in the generic folder format (``root/classes.txt``, ``root/<split>/{images,labels}``).

    Images and labels are PNG (lossless, so they agree pixel for pixel); ``<split>/synthetic.json`` records the
    generator version, seeds and settings. Returns the split folder.
    """
    seeds = split_seeds(split, num_images, seed_offset)
    root = Path(root)
    split_dir = root / split
    images_dir, labels_dir = split_dir / "images", split_dir / "labels"
    if not overwrite and images_dir.is_dir() and any(images_dir.iterdir()):
        raise FileExistsError(f"{images_dir} already holds images; pass overwrite=True to replace them.")
    root.mkdir(parents=True, exist_ok=True)
    classes_file = root / "classes.txt"
    classes_text = "\n".join(SHAPE_CLASSES) + "\n"
    if classes_file.exists():
        if classes_file.read_text(encoding="utf-8").splitlines() != list(SHAPE_CLASSES):
            raise ValueError(f"{classes_file} exists with other classes than {SHAPE_CLASSES}.")
    else:
        classes_file.write_text(classes_text, encoding="utf-8")
    for folder in (images_dir, labels_dir):
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in folder.glob("*.png"):
                stale.unlink()
    for seed in seeds:
        scene = generate_scene(seed, size=size, max_objects=max_objects, min_objects=min_objects, style=style)
        stem = f"scene_{seed:08d}"
        Image.fromarray(scene.image).save(images_dir / f"{stem}.png")
        Image.fromarray(scene.label).save(labels_dir / f"{stem}.png")
    metadata = {
        "generator": "digseg_diffusers.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "first_seed": seeds.start,
        "num_images": num_images,
        "size": size,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "style": _resolve_style(style).name,
        "classes": list(SHAPE_CLASSES),
    }
    (split_dir / "synthetic.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return split_dir
