"""The procedural video-caption dataset: determinism, splits, and captions that describe the videos."""

import time
from collections import Counter

import numpy as np
import pytest

from input_pipeline import synthetic
from input_pipeline.synthetic import (
    COLOUR_NAMES,
    COLOUR_RGB,
    DIRECTION_NAMES,
    RESERVED_PAIRS,
    SHAPE_NAMES,
    SIZE_NAMES,
    SPEED_NAMES,
    SyntheticVideoCaptions,
    caption_of,
    is_reserved_caption,
    parse_caption,
)

# A pixel belongs to an object when its brightest channel is past the midpoint
# between the background (<= 24) and the dimmest palette colour's brightest channel (>= 220).
_OBJECT_THRESHOLD = 120


def _object_mask(frame: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels at least half covered by an object; frame is uint8 [H, W, 3]."""
    return frame.max(axis=-1) > _OBJECT_THRESHOLD


def _centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centre of the object's coverage (edge pixels weigh by how much they are covered)."""
    weight = np.clip(frame.max(axis=-1).astype(np.float32) - np.median(frame), 0, None)  # [H, W]
    rows, cols = np.indices(weight.shape)
    return np.array([(cols * weight).sum(), (rows * weight).sum()]) / weight.sum()


def _covered_area(frame: np.ndarray, colour: int) -> float:
    """Object area in pixels counting anti-aliased edge pixels fractionally; frame uint8 [H, W, 3]."""
    background = np.median(frame)
    brightest = COLOUR_RGB[colour].max()
    return float(np.clip((frame.max(axis=-1) - background) / (brightest - background), 0, 1).sum())


def _classify_shape(mask: np.ndarray) -> str:
    """Shape from its bounding-box fill ratio, and, for the half-filling ones, vertical asymmetry."""
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = mask.sum() / (height * width)
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    # A triangle (apex up) has most of its area low in its box; a diamond is symmetric.
    offset = (rows.mean() - (rows.min() + rows.max()) / 2) / height
    return "triangle" if offset > 0.05 else "diamond"


@pytest.mark.parametrize("split", ["validation", "eval", "test", "TRAIN"])
def test_unknown_split_raises_naming_valid_splits(split):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'heldout'\)"):
        SyntheticVideoCaptions(split, num_examples=4, num_frames=2, resolution=16)


@pytest.mark.parametrize(
    "keyword, value", [("num_examples", 0), ("num_frames", 0), ("resolution", 15), ("max_objects", 0)]
)
def test_invalid_sizes_raise(keyword, value):
    arguments = dict(split="train", num_examples=4, num_frames=2, resolution=16, max_objects=1)
    arguments[keyword] = value
    with pytest.raises(ValueError, match=keyword):
        SyntheticVideoCaptions(**arguments)


@pytest.mark.parametrize("num_frames, resolution", [(1, 16), (8, 32), (3, 24), (2, 48)])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_example_shapes_and_dtypes(split, num_frames, resolution):
    source = SyntheticVideoCaptions(split, num_examples=10, num_frames=num_frames, resolution=resolution)
    assert len(source) == 10
    for index in (0, 9, -1):
        example = source[index]
        assert example["video"].shape == (num_frames, resolution, resolution, 3)
        assert example["video"].dtype == np.uint8
        assert isinstance(example["caption"], str)
        # Every video shows its object: some pixels are bright, the background is dark.
        assert _object_mask(example["video"][0]).sum() >= 4
        assert np.median(example["video"]) <= 24
    with pytest.raises(IndexError):
        source[10]


def test_examples_are_deterministic_per_seed_split_and_index():
    first = SyntheticVideoCaptions("train", num_examples=100, num_frames=4, resolution=16, seed=3)
    second = SyntheticVideoCaptions("train", num_examples=100, num_frames=4, resolution=16, seed=3)
    # Random access in any order gives the same example.
    for index in (57, 3, 57, 0):
        np.testing.assert_array_equal(first[index]["video"], second[index]["video"])
        assert first[index]["caption"] == second[index]["caption"]
    assert not np.array_equal(first[1]["video"], first[2]["video"])
    other_seed = SyntheticVideoCaptions("train", num_examples=100, num_frames=4, resolution=16, seed=4)
    assert not np.array_equal(first[1]["video"], other_seed[1]["video"])
    # A longer train split has the same first examples: records do not depend on its size.
    longer = SyntheticVideoCaptions("train", num_examples=1_000_000, num_frames=4, resolution=16, seed=3)
    np.testing.assert_array_equal(first[42]["video"], longer[42]["video"])


def test_captions_generator_matches_rendered_captions():
    for split in ("train", "heldout"):
        source = SyntheticVideoCaptions(split, num_examples=50, num_frames=2, resolution=16, seed=1, max_objects=2)
        generated = list(synthetic.captions(split, 50, seed=1, max_objects=2))
        assert generated == [source[index]["caption"] for index in range(50)]


def test_caption_format_and_canonical_order():
    source = SyntheticVideoCaptions("train", num_examples=300, num_frames=1, resolution=16, max_objects=3)
    counts = Counter()
    for index in range(300):
        caption = source.caption(index)
        objects = parse_caption(caption)
        counts[len(objects)] += 1
        assert caption_of(objects) == caption
        assert objects == sorted(objects)
        assert len(set(objects)) == len(objects)
    assert set(counts) == {1, 2, 3}
    assert min(counts.values()) > 60
    assert caption_of(parse_caption("a large red circle moves left quickly")) == "a large red circle moves left quickly"


def test_heldout_captions_are_unique_and_a_quarter_use_reserved_pairs():
    heldout = list(synthetic.captions("heldout", 256))
    assert len(set(heldout)) == 256
    assert sum(map(is_reserved_caption, heldout)) == 64
    # Reserved examples are spread through the split, not bunched at one end.
    assert 8 <= sum(map(is_reserved_caption, heldout[:64])) <= 24
    # The full single-object caption space: 8 colours * 4 shapes * 3 sizes * 4 directions * 2 speeds.
    everything = list(synthetic.captions("heldout", 768))
    assert len(set(everything)) == 768
    assert sum(map(is_reserved_caption, everything)) == len(RESERVED_PAIRS) * 3 * 4 * 2
    with pytest.raises(ValueError, match="768 unique captions"):
        SyntheticVideoCaptions("heldout", num_examples=769, num_frames=1, resolution=16)


def test_heldout_with_several_objects_is_unique():
    heldout = list(synthetic.captions("heldout", 600, max_objects=3))
    assert len(set(heldout)) == 600
    assert sum(map(is_reserved_caption, heldout)) == 150
    assert Counter(len(parse_caption(caption)) for caption in heldout) == {1: 200, 2: 200, 3: 200}


def test_train_never_uses_reserved_pairs_but_uses_all_others():
    pairs = Counter()
    for caption in synthetic.captions("train", 20_000, max_objects=2):
        for spec in parse_caption(caption):
            pairs[(COLOUR_NAMES[spec.colour], SHAPE_NAMES[spec.shape])] += 1
    assert not RESERVED_PAIRS & set(pairs)
    assert len(pairs) == len(COLOUR_NAMES) * len(SHAPE_NAMES) - len(RESERVED_PAIRS)
    # Attributes are drawn uniformly: each allowed pair about 1/28 of ~30k objects.
    assert min(pairs.values()) > 0.8 * sum(pairs.values()) / len(pairs)
    # Every reserved colour and shape still appears in train, with other partners.
    colours_seen = {colour for colour, _ in pairs}
    shapes_seen = {shape for _, shape in pairs}
    assert colours_seen == set(COLOUR_NAMES) and shapes_seen == set(SHAPE_NAMES)


def test_caption_describes_video():
    """Colour, shape, size, direction and speed words match what the pixels show."""
    num_frames, resolution = 8, 32
    source = SyntheticVideoCaptions("train", num_examples=400, num_frames=num_frames, resolution=resolution)
    areas_by_size = {name: [] for name in SIZE_NAMES}
    travel_by_speed = {(size, speed): [] for size in SIZE_NAMES for speed in SPEED_NAMES}
    shape_hits = 0
    for index in range(400):
        example = source[index]
        (spec,) = parse_caption(example["caption"])
        first, last = example["video"][0], example["video"][-1]
        first_mask = _object_mask(first)
        # Colour: the palette colour nearest to the median object pixel of frame 0.
        median_colour = np.median(first[first_mask].astype(np.float32), axis=0)
        nearest = np.argmin(np.linalg.norm(COLOUR_RGB - median_colour, axis=1))
        assert COLOUR_NAMES[nearest] == COLOUR_NAMES[spec.colour], example["caption"]
        # Direction: the centroid moves along the named direction, and barely across it.
        displacement = _centroid(last) - _centroid(first)  # (x, y), y down
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[DIRECTION_NAMES[spec.direction]]
        along = displacement @ np.array(expected)
        across = abs(displacement @ np.array(expected[::-1]))
        assert along > 0.5 and across < 0.1, (example["caption"], displacement)
        # The object stays whole: the same area in the first and last frame.
        first_area, last_area = _covered_area(first, spec.colour), _covered_area(last, spec.colour)
        assert last_area == pytest.approx(first_area, rel=0.1), example["caption"]
        areas_by_size[SIZE_NAMES[spec.size]].append(first_mask.sum())
        travel_by_speed[(SIZE_NAMES[spec.size], SPEED_NAMES[spec.speed])].append(along)
        shape_hits += _classify_shape(first_mask) == SHAPE_NAMES[spec.shape]
    # Shapes are told apart by two simple pixel statistics in nearly all examples (32 px).
    assert shape_hits >= 0.9 * 400
    mean_area = [np.mean(areas_by_size[name]) for name in SIZE_NAMES]
    assert mean_area[0] < 0.6 * mean_area[1] and mean_area[1] < 0.6 * mean_area[2]
    for size in SIZE_NAMES:
        slow, quick = np.mean(travel_by_speed[(size, "slowly")]), np.mean(travel_by_speed[(size, "quickly")])
        assert quick > 1.8 * slow, (size, slow, quick)
    # Nominal speeds when the path fits: small objects, 0.03 and 0.08 of the frame per frame.
    steps = num_frames - 1
    assert np.mean(travel_by_speed[("small", "slowly")]) == pytest.approx(0.03 * resolution * steps, rel=0.1)
    assert np.mean(travel_by_speed[("small", "quickly")]) == pytest.approx(0.08 * resolution * steps, rel=0.1)


def test_objects_stay_inside_frame_for_long_clips():
    # 24 frames: even a quick large object has to fit its whole path in the frame.
    source = SyntheticVideoCaptions("train", num_examples=60, num_frames=24, resolution=32)
    for index in range(60):
        video = source[index]["video"]
        border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
        # The border pixels are pure background (<= 24): no edge of any object touches them.
        assert border.max() <= 25, source[index]["caption"]
        (spec,) = parse_caption(source[index]["caption"])
        areas = [_covered_area(frame, spec.colour) for frame in video]
        assert max(areas) == pytest.approx(min(areas), rel=0.1)


def test_every_caption_object_is_visible_with_several_objects():
    source = SyntheticVideoCaptions("heldout", num_examples=60, num_frames=2, resolution=32, max_objects=3)
    num_named = num_shown = 0
    for index in range(60):
        example = source[index]
        frame = example["video"][0].astype(np.float32)
        mask = _object_mask(example["video"][0])
        # [N, 8] distances from object pixels to each palette colour. Only pixels
        # fully inside an object count: edge pixels blend two colours.
        distances = np.linalg.norm(frame[mask][:, None] - COLOUR_RGB[None], axis=-1)
        solid = distances.min(axis=1) < 20
        counts = Counter(np.argmin(distances[solid], axis=1).tolist())
        shown = {colour for colour, count in counts.items() if count >= 2}
        named = {spec.colour for spec in parse_caption(example["caption"])}
        # Occlusion may hide an object; it may never show a colour the caption does not name.
        assert shown <= named and len(shown) >= 1
        num_named += len(named)
        num_shown += len(shown)
    assert num_shown >= 0.9 * num_named


def test_render_time():
    source = SyntheticVideoCaptions("train", num_examples=1000, num_frames=8, resolution=32)
    start = time.perf_counter()
    for index in range(128):
        source[index]
    elapsed = time.perf_counter() - start
    # About 25 ms here; the bound leaves room for a loaded machine.
    assert elapsed < 1.0, elapsed
