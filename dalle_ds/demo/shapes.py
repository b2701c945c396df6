"""The embedded demo dataset: coloured shapes with a size, a position and a background, captioned
in a few phrasings; and the deterministic analyser that reads colour and shape back from pixels.

Shapes are drawn on a coarse grid of cells (CELLS x CELLS), each cell CELL_PIXELS wide, so every
pixel block the dVAE encodes is one flat colour: a token then stands for a colour, and a
shape is where tokens sit. That split is what lets a small DALL-E, trained minutes on a CPU,
compose a colour with a shape it never saw it with. Some (colour, shape) pairs are held out of
the training split entirely; the evaluation asks for exactly those.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

CELLS = 12  # grid side in cells
CELL_PIXELS = 4  # one dVAE code per cell: DiscreteVAE(num_layers=2) halves twice
IMAGE_SIZE = CELLS * CELL_PIXELS

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 225), "yellow": (240, 210, 40),
           "purple": (150, 60, 190)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 5, "large": 8}  # side of the shape's box, in cells
POSITIONS = ("left", "right", "top", "bottom", "centre")
# never in the training split: each shape and each of four colours loses one partner
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square"))

_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the centre"}
PHRASINGS = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "{colour} {shape}, {size}, {position}, {background} background",
    "a {colour} {shape}",
    "{size} {colour} {shape} {where}",
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    def caption(self, phrasing: int = 0) -> str:
        return PHRASINGS[phrasing].format(size=self.size, colour=self.colour, shape=self.shape,
                                           where=_WHERE[self.position], position=self.position,
                                           background=self.background)


def shape_mask(shape: str, box: int, x0: float = 0.0, y0: float = 0.0, cells: int = CELLS) -> np.ndarray:
    """(cells, cells) bool: ``shape`` filling the box of side ``box`` cells at (x0, y0), tested
    at cell centres."""
    y, x = (np.mgrid[0:cells, 0:cells] + 0.5 - np.array([y0, x0])[:, None, None]) / box - 0.5  # box: [-.5, .5]
    inside = (abs(x) <= 0.5) & (abs(y) <= 0.5)
    if shape == "circle":
        return x**2 + y**2 <= 0.25
    if shape == "square":
        return inside
    if shape == "triangle":  # apex up
        return inside & (abs(x) <= (y + 0.5) / 2)
    if shape == "cross":
        return inside & ((abs(x) <= 0.17) | (abs(y) <= 0.17))
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _corner(scene: Scene) -> tuple[int, int]:
    free = CELLS - SIZES[scene.size]
    x = {"left": 1, "right": free - 1}.get(scene.position, free // 2)
    y = {"top": 1, "bottom": free - 1}.get(scene.position, free // 2)
    return x, y


def render(scene: Scene) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) uint8."""
    x0, y0 = _corner(scene)
    mask = shape_mask(scene.shape, SIZES[scene.size], x0, y0)
    cells = np.where(mask[..., None], COLOURS[scene.colour], BACKGROUNDS[scene.background]).astype(np.uint8)
    return cells.repeat(CELL_PIXELS, axis=0).repeat(CELL_PIXELS, axis=1)


def scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """``count`` scenes of the ``train`` split (every pair but the held-out ones) or the
    ``heldout`` split (only those), deterministic in ``seed``."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = {"train": [p for p in pairs if p not in HELD_OUT], "heldout": list(HELD_OUT)}.get(split)
    if chosen is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{seed}/{split}")
    return [Scene(*rng.choice(chosen), rng.choice(list(SIZES)), rng.choice(POSITIONS), rng.choice(list(BACKGROUNDS)))
            for _ in range(count)]


# ---- reading generated pixels back -----------------------------------------------------------

def analyse(image: np.ndarray) -> dict:
    """(H, W, 3) uint8 (any size; resized to the cell grid by block means) -> the colour and
    shape it shows: background from the border cells, foreground the cells far from it, the
    colour the palette's nearest to their mean, the shape the template that best overlaps them
    in their bounding box."""
    cells = _to_cells(image)
    border = np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(cells - background, axis=-1) > 60
    if not foreground.any():
        return {"colour": None, "shape": None}
    mean = cells[foreground].mean(axis=0)
    colour = min(COLOURS, key=lambda name: np.linalg.norm(mean - COLOURS[name]))
    ys, xs = np.nonzero(foreground)
    box = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    x0, y0 = (xs.min() + xs.max() + 1 - box) / 2, (ys.min() + ys.max() + 1 - box) / 2

    def overlap(shape):
        template = shape_mask(shape, box, x0, y0)
        return (template & foreground).sum() / max((template | foreground).sum(), 1)

    return {"colour": colour, "shape": max(SHAPES, key=overlap)}


def _to_cells(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    if image.shape[0] != CELLS * CELL_PIXELS:
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return image.astype(np.float64).reshape(CELLS, CELL_PIXELS, CELLS, CELL_PIXELS, 3).mean(axis=(1, 3))


def parse_caption(caption: str) -> dict:
    """The colour and shape a demo caption asks for (None where it names none)."""
    words = caption.replace(",", " ").split()
    return {"colour": next((w for w in words if w in COLOURS), None),
            "shape": next((w for w in words if w in SHAPES), None)}
