"""Procedural video-caption dataset: a moving shape on a dark background.

Every example is a short clip of one or more coloured shapes moving in a
straight line, with a caption that names each object's size, colour, shape,
direction and speed, e.g. "a large red circle moves left quickly". Nothing is
downloaded: an example is rendered from its index, so the dataset is a Grain
random-access source of any length, deterministic per (seed, split, index).

Two splits:
  train    attributes drawn i.i.d. per example, never using the (colour, shape)
           pairs in `RESERVED_PAIRS`.
  heldout  captions unique within the split (retrieval has exactly one right
           answer); about a quarter of the examples use a reserved pair, i.e.
           an attribute combination the train split never shows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

COLOUR_NAMES = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
# [8, 3] RGB, far apart from each other and from the near-black background.
COLOUR_RGB = np.array(
    [
        (225, 30, 30),  # red
        (30, 200, 50),  # green
        (45, 80, 245),  # blue
        (240, 225, 30),  # yellow
        (30, 220, 225),  # cyan
        (220, 40, 220),  # magenta
        (245, 245, 245),  # white
        (255, 140, 0),  # orange
    ],
    dtype=np.float32,
)
SHAPE_NAMES = ("circle", "square", "triangle", "diamond")
SIZE_NAMES = ("small", "medium", "large")
# Nominal radius as a fraction of the resolution.
SIZE_RADIUS = (0.10, 0.16, 0.24)
DIRECTION_NAMES = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x right, y down).
DIRECTION_VECTORS = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))
SPEED_NAMES = ("slowly", "quickly")
# Nominal displacement per frame as a fraction of the resolution.
SPEED_PER_FRAME = (0.03, 0.08)

# (colour, shape) pairs the train split never generates: held-out examples
# using them test compositional generalisation. Each reserved colour and each
# shape still appears in train with other partners.
RESERVED_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "diamond"), ("yellow", "circle"), ("magenta", "square")}
)

SPLITS = ("train", "heldout")

# Every shape fits in a disc of radius _EXTENT * r around its centre, so a
# centre kept _EXTENT * r + _MARGIN pixels from the border keeps the whole shape
# inside the frame, with its anti-aliased edge (which reaches up to 1 pixel out
# at the triangle's apex, where the edge-distance estimate is halved).
_EXTENT = 1.2
_MARGIN = 1.5

# Streams of the seeded generators, so per-example draws and the held-out
# combination draw never share random numbers.
_EXAMPLE_STREAM = 0
_HELDOUT_PLAN_STREAM = 1


class ObjectSpec(NamedTuple):
    """Attribute indices of one object; tuple order is the caption's canonical order."""

    colour: int
    shape: int
    size: int
    direction: int
    speed: int

    @property
    def phrase(self) -> str:
        return (
            f"a {SIZE_NAMES[self.size]} {COLOUR_NAMES[self.colour]} {SHAPE_NAMES[self.shape]}"
            f" moves {DIRECTION_NAMES[self.direction]} {SPEED_NAMES[self.speed]}"
        )

    @property
    def uses_reserved_pair(self) -> bool:
        return (COLOUR_NAMES[self.colour], SHAPE_NAMES[self.shape]) in RESERVED_PAIRS


_ATTRIBUTE_COUNTS = (
    len(COLOUR_NAMES),
    len(SHAPE_NAMES),
    len(SIZE_NAMES),
    len(DIRECTION_NAMES),
    len(SPEED_NAMES),
)
# Every single-object description, in canonical order: 8*4*3*4*2 = 768.
ALL_OBJECTS = tuple(ObjectSpec(*attributes) for attributes in itertools.product(*map(range, _ATTRIBUTE_COUNTS)))
_ORDINARY_OBJECTS = tuple(spec for spec in ALL_OBJECTS if not spec.uses_reserved_pair)
_RESERVED_OBJECTS = tuple(spec for spec in ALL_OBJECTS if spec.uses_reserved_pair)


def caption_of(objects: Sequence[ObjectSpec]) -> str:
    """The canonical caption: object phrases in canonical order, joined by " and "."""
    return " and ".join(spec.phrase for spec in sorted(objects))


def parse_caption(caption: str) -> list[ObjectSpec]:
    """Inverse of `caption_of`: the objects a caption describes."""
    objects = []
    for phrase in caption.split(" and "):
        words = phrase.split()
        if len(words) != 7 or words[0] != "a" or words[4] != "moves":
            raise ValueError(f"not a synthetic caption phrase: {phrase!r}")
        objects.append(
            ObjectSpec(
                colour=COLOUR_NAMES.index(words[2]),
                shape=SHAPE_NAMES.index(words[3]),
                size=SIZE_NAMES.index(words[1]),
                direction=DIRECTION_NAMES.index(words[5]),
                speed=SPEED_NAMES.index(words[6]),
            )
        )
    return objects


def is_reserved_caption(caption: str) -> bool:
    """Whether any object in the caption uses a (colour, shape) pair train never shows."""
    return any(spec.uses_reserved_pair for spec in parse_caption(caption))


def num_unique_heldout_captions(max_objects: int) -> tuple[int, int]:
    """(reserved, ordinary) numbers of distinct captions with 1..max_objects objects."""
    num_all, num_ordinary = len(ALL_OBJECTS), len(_ORDINARY_OBJECTS)
    reserved = sum(math.comb(num_all, k) - math.comb(num_ordinary, k) for k in range(1, max_objects + 1))
    ordinary = sum(math.comb(num_ordinary, k) for k in range(1, max_objects + 1))
    return reserved, ordinary


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (part < total % parts) for part in range(parts)]


def _heldout_plan(num_examples: int, seed: int, max_objects: int) -> list[tuple[ObjectSpec, ...]]:
    """Objects of every held-out example: unique captions, ~1/4 using reserved pairs.

    Examples are grouped in buckets by (uses a reserved pair, number of objects
    k); each bucket's quota is drawn without replacement from that bucket's
    caption space. For k = 1 the space (96 reserved + 672 ordinary captions) is
    enumerated and drawn through a seeded permutation; for k >= 2 it has at least
    tens of thousands of captions and is drawn by rejection of repeats. Finally
    the buckets are interleaved by a seeded permutation.
    """
    rng = np.random.default_rng([seed, SPLITS.index("heldout"), _HELDOUT_PLAN_STREAM, 0])
    num_all, num_ordinary = len(ALL_OBJECTS), len(_ORDINARY_OBJECTS)
    num_reserved_wanted = round(num_examples / 4)
    plan: list[tuple[ObjectSpec, ...]] = []
    reserved_quotas = _split_evenly(num_reserved_wanted, max_objects)
    ordinary_quotas = _split_evenly(num_examples - num_reserved_wanted, max_objects)
    for k, reserved_quota, ordinary_quota in zip(range(1, max_objects + 1), reserved_quotas, ordinary_quotas):
        reserved_space = math.comb(num_all, k) - math.comb(num_ordinary, k)
        ordinary_space = math.comb(num_ordinary, k)
        # A small reserved space (k = 1: 96 captions) hands its excess to ordinary.
        ordinary_quota += max(0, reserved_quota - reserved_space)
        reserved_quota = min(reserved_quota, reserved_space)
        if ordinary_quota > ordinary_space:
            reserved_total, ordinary_total = num_unique_heldout_captions(max_objects)
            raise ValueError(
                f"heldout split with max_objects={max_objects} has {reserved_total + ordinary_total} unique"
                f" captions ({reserved_space + ordinary_space} with {k} object(s)); num_examples={num_examples}"
                " is too many"
            )
        if k == 1:
            plan += [(_RESERVED_OBJECTS[i],) for i in rng.permutation(len(_RESERVED_OBJECTS))[:reserved_quota]]
            plan += [(_ORDINARY_OBJECTS[i],) for i in rng.permutation(len(_ORDINARY_OBJECTS))[:ordinary_quota]]
            continue
        for quota, space, pool, want_reserved in (
            (reserved_quota, reserved_space, ALL_OBJECTS, True),
            (ordinary_quota, ordinary_space, _ORDINARY_OBJECTS, False),
        ):
            if quota > space // 2:
                raise ValueError(
                    f"num_examples={num_examples} asks for {quota} of the {space} heldout captions with {k}"
                    " objects; use at most half of them"
                )
            drawn: set[tuple[ObjectSpec, ...]] = set()
            while len(drawn) < quota:
                objects = tuple(sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False)))
                if any(spec.uses_reserved_pair for spec in objects) == want_reserved:
                    drawn.add(objects)
            plan += sorted(drawn)
    return [plan[i] for i in rng.permutation(len(plan))]


def _signed_distance(shape: int, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance in pixels to the shape's edge (negative inside).

    dx: [T, 1, W], dy: [T, H, 1] offsets from the object centre; returns [T, H, W].
    """
    name = SHAPE_NAMES[shape]
    if name == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    if name == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.15 * radius) * np.float32(1 / math.sqrt(2))
    # Equilateral triangle, apex up, centred on its centroid, circumradius
    # 1.2 r: inside when the offset's projections on the three outward edge
    # normals (down; up-left; up-right) are all below the inradius 0.6 r.
    bottom = dy
    upper_sides = np.float32(math.sqrt(3) / 2) * np.abs(dx) - 0.5 * dy
    return np.maximum(bottom, upper_sides) - 0.6 * radius


class SyntheticVideoCaptions:
    """Grain random-access source of {"video": uint8 [T, H, W, 3], "caption": str}."""

    def __init__(
        self,
        split: str,
        num_examples: int,
        num_frames: int,
        resolution: int,
        seed: int = 0,
        max_objects: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16, got {resolution}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.split = split
        self.num_examples = num_examples
        self.num_frames = num_frames
        self.resolution = resolution
        self.seed = seed
        self.max_objects = max_objects
        self._split_id = SPLITS.index(split)
        self._heldout_objects = _heldout_plan(num_examples, seed, max_objects) if split == "heldout" else None
        # Pixel-centre coordinates: [W] and [H].
        self._coordinates = np.arange(resolution, dtype=np.float32) + np.float32(0.5)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"SyntheticVideoCaptions(split={self.split!r}, num_examples={self.num_examples},"
            f" num_frames={self.num_frames}, resolution={self.resolution}, seed={self.seed},"
            f" max_objects={self.max_objects})"
        )

    def _checked_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return index

    def _objects_and_rng(self, index: int) -> tuple[tuple[ObjectSpec, ...], np.random.Generator]:
        """The example's objects (canonical order) and its generator for the nuisances."""
        rng = np.random.default_rng([self.seed, self._split_id, _EXAMPLE_STREAM, index])
        if self._heldout_objects is not None:
            return self._heldout_objects[index], rng
        num_objects = int(rng.integers(1, self.max_objects + 1))
        if num_objects == 1:
            chosen = [int(rng.integers(len(_ORDINARY_OBJECTS)))]
        else:
            chosen = rng.choice(len(_ORDINARY_OBJECTS), size=num_objects, replace=False)
        return tuple(sorted(_ORDINARY_OBJECTS[i] for i in chosen)), rng

    def objects(self, index: int) -> tuple[ObjectSpec, ...]:
        """The objects of example `index`, in canonical (caption) order."""
        return self._objects_and_rng(self._checked_index(index))[0]

    def caption(self, index: int) -> str:
        """The caption of example `index`, without rendering its video."""
        return caption_of(self.objects(index))

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        objects, rng = self._objects_and_rng(self._checked_index(index))
        return {"video": self._render(objects, rng), "caption": caption_of(objects)}

    def _render(self, objects: Sequence[ObjectSpec], rng: np.random.Generator) -> np.ndarray:
        """Paints the objects over a near-black background; returns uint8 [T, H, W, 3]."""
        num_frames, resolution = self.num_frames, self.resolution
        background = rng.uniform(0.0, 24.0)
        video = np.full((num_frames, resolution, resolution, 3), background, dtype=np.float32)
        frame_steps = np.arange(num_frames, dtype=np.float32)  # [T]
        # Large objects first so small ones are never hidden behind them.
        for spec in sorted(objects, key=lambda spec: -spec.size):
            radius = SIZE_RADIUS[spec.size] * resolution
            extent = _EXTENT * radius + _MARGIN
            room = resolution - 2 * extent  # free travel along an axis, pixels
            # The quick travel is shrunk to fit the room when the clip is long or
            # the object large; slow shrinks by the same factor so it stays slower.
            quick_travel = SPEED_PER_FRAME[-1] * resolution * max(num_frames - 1, 1)
            step = SPEED_PER_FRAME[spec.speed] * resolution * min(1.0, room / quick_travel)
            travel = step * (num_frames - 1)
            direction_x, direction_y = DIRECTION_VECTORS[spec.direction]
            start_x, start_y = rng.uniform(extent, resolution - extent, size=2)
            # On the motion axis, start where the whole path stays inside.
            along = extent + rng.random() * max(room - travel, 0.0)
            if direction_x:
                start_x = along if direction_x > 0 else resolution - along
            else:
                start_y = along if direction_y > 0 else resolution - along
            centre_x = np.float32(start_x) + np.float32(direction_x * step) * frame_steps  # [T]
            centre_y = np.float32(start_y) + np.float32(direction_y * step) * frame_steps  # [T]
            dx = self._coordinates[None, None, :] - centre_x[:, None, None]  # [T, 1, W]
            dy = self._coordinates[None, :, None] - centre_y[:, None, None]  # [T, H, 1]
            # Coverage of each pixel, with a one-pixel linear ramp for anti-aliasing.
            alpha = np.clip(0.5 - _signed_distance(spec.shape, dx, dy, radius), 0.0, 1.0)  # [T, H, W]
            video += alpha[..., None] * (COLOUR_RGB[spec.colour] - video)
        return (video + 0.5).astype(np.uint8)


def captions(split: str, num_examples: int, seed: int = 0, max_objects: int = 1) -> Iterator[str]:
    """Captions of examples 0..num_examples-1 of a split, without rendering (for tokenizer training).

    They equal `SyntheticVideoCaptions(split, num_examples, ..., seed, max_objects)[i]["caption"]`.
    """
    source = SyntheticVideoCaptions(
        split, num_examples, num_frames=1, resolution=16, seed=seed, max_objects=max_objects
    )
    for index in range(num_examples):
        yield source.caption(index)
