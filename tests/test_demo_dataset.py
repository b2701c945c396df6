"""The embedded demo dataset and its analyser: splits, determinism, img2dataset layout, and an
analyser that reads back what was drawn (and only that)."""

import json

import numpy as np
import pytest
from PIL import Image

from dalle_ds.data.sources import raw_shard_samples
from dalle_ds.data.stream import ImageTextStream, StreamConfig
from dalle_ds.demo.dataset import write_demo_dataset, write_split
from dalle_ds.demo.shapes import (BACKGROUNDS, COLOURS, HELD_OUT, IMAGE_SIZE, SHAPES, Scene, analyse, parse_caption,
                                  render, scenes, shape_mask)
from data_fixtures import shard_members


def test_held_out_pairs_appear_in_the_heldout_split_only():
    train = {(s.colour, s.shape) for s in scenes("train", 2000)}
    heldout = {(s.colour, s.shape) for s in scenes("heldout", 200)}
    assert not train & set(HELD_OUT) and heldout == set(HELD_OUT)
    assert len(train) == len(COLOURS) * len(SHAPES) - len(HELD_OUT)  # every other pair is seen
    with pytest.raises(ValueError, match="split must be"):
        scenes("test", 1)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_the_analyser_reads_every_drawn_scene_back(split):
    for scene in scenes(split, 300, seed=4):
        assert analyse(render(scene)) == {"colour": scene.colour, "shape": scene.shape}, scene


def test_the_analyser_survives_noise_and_other_sizes():
    rng = np.random.default_rng(0)
    for scene in scenes("heldout", 40, seed=1):
        image = render(scene).astype(np.float64) + rng.normal(0, 20, (IMAGE_SIZE, IMAGE_SIZE, 3))
        image = np.asarray(Image.fromarray(image.clip(0, 255).astype(np.uint8)).resize((96, 96)))
        assert analyse(image) == {"colour": scene.colour, "shape": scene.shape}, scene


def test_the_analyser_does_not_see_what_is_not_there():
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUNDS["white"], dtype=np.uint8)
    assert analyse(blank) == {"colour": None, "shape": None}
    square = render(Scene("red", "square", "large", "centre", "white"))
    assert analyse(square)["shape"] == "square" and analyse(square)["colour"] != "blue"


def test_masks_have_the_shapes_geometry():
    circle, square, triangle = (shape_mask(s, 8, 2, 2) for s in ("circle", "square", "triangle"))
    assert square.sum() == 64 and circle.sum() < square.sum() and triangle.sum() < circle.sum()
    assert triangle[2].sum() < triangle[9].sum()  # apex up: narrow top row, wide bottom row
    assert (circle & ~square).sum() == 0 and (triangle & ~square).sum() == 0


def test_captions_name_the_scene_in_every_phrasing():
    scene = Scene("purple", "cross", "small", "left", "black")
    for phrasing in range(4):
        assert parse_caption(scene.caption(phrasing)) == {"colour": "purple", "shape": "cross"}


def test_shards_are_img2dataset_layout_deterministic_and_stream(tmp_path):
    paths = write_demo_dataset(tmp_path / "a", train=30, heldout=10, seed=3)
    again = write_demo_dataset(tmp_path / "b", train=30, heldout=10, seed=3)
    assert [p.read_bytes() for p in paths["train"]] == [p.read_bytes() for p in again["train"]]
    members = shard_members(paths["train"][0])
    keys = {name.split(".")[0] for name in members}
    assert len(keys) == 30 and all(f"{k}.{ext}" in members for k in keys for ext in ("png", "txt", "json"))
    meta = json.loads(members["000000000.json"])
    caption = members["000000000.txt"].decode()
    assert parse_caption(caption) == {"colour": meta["colour"], "shape": meta["shape"]}
    stats = json.loads(paths["train"][0].with_name("00000_stats.json").read_text())
    assert stats["successes"] == raw_shard_samples(str(paths["train"][0])) == 30
    batch = next(iter(ImageTextStream(tmp_path / "a" / "train", IMAGE_SIZE, StreamConfig(batch_size=5, num_workers=0))))
    assert batch["images"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="count and per_shard"):
        write_split(tmp_path / "c", "train", 0)
