"""Build the bundled ``glyphs`` set: capital letters A-X drawn from the DejaVu fonts of matplotlib.

    python scripts/build_glyphs.py            # writes src/kind/assets/glyphs.npz
    python scripts/build_glyphs.py --out DIR  # somewhere else
    python scripts/build_glyphs.py --grid glyphs.png  # also a grid of samples, to look at

Why: a third 28x28 domain that is neither digits nor silhouettes, for pre-training on one domain
and transferring to another, made from files that already ship with a dependency (matplotlib's
``mpl-data/fonts/ttf/DejaVu*.ttf``, Bitstream Vera licence, see ``assets/DATA_LICENSES.md``), so
nothing is downloaded.

24 classes (A..X, so each has a single-letter name distinct from mnist's digits and the animals'
words), 300 images a class (the every-5th-is-test split gives 240/60), sorted by class. Each
image: one of the 12 DejaVu faces (Sans, Sans Mono, Serif; each regular, bold, oblique/italic,
bold oblique/italic; the two "Display" faces have no letters), drawn white on black at a 96 px
font size, its strokes thickened (``stroke_width`` 1-5 px for regular faces, 0-3 px for bold ones)
or, for bold faces only, thinned (3 or 5 px ``MinFilter``), then an affine jitter (rotation +-12
degrees, shear +-0.2, x and y scale 0.8-1.2), cropped to the ink, resized so the longer side is
16-22 px (box filter), centred on its centre of mass in the 28x28 frame as MNIST is, and moved by
up to 2 px while staying at least 1 px inside the frame.

Deterministic: image ``i`` of class ``k`` is drawn with ``numpy.random.default_rng([seed, k, i])``,
so any image can be remade on its own (the tests remake a few), and the layout engine is Pillow's
BASIC one (no raqm). Same Pillow/FreeType and font files -> same arrays, and same ``.npz`` bytes
(written as ``scripts/build_data.py`` writes, zip timestamps pinned).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build_data beside this file
from build_data import DEFAULT_OUT, pack, save_npz_deterministic, sha256_bytes  # noqa: E402

log = logging.getLogger("build_glyphs")

CLASSES = [chr(c) for c in range(ord("A"), ord("X") + 1)]  # 24 letters, A..X
PER_CLASS = 300
SEED = 0
SIZE = 28  # final image side
FONT_PX = 96  # font size of the high-resolution drawing (~70 px capitals), reduced later
CANVAS = 4 * FONT_PX  # side of the drawing canvas: room for any stroke, rotation and shear

# The faces used, with the sha256 of the files in matplotlib 3.11.2 (DejaVu 2.x, unchanged for
# years). Another file still works, but the output will differ from the shipped glyphs.npz.
FONTS = {
    "DejaVuSans.ttf": "3fdf69cabf06049ea70a00b5919340e2ce1e6d02b0cc3c4b44fb6801bd1e0d22",
    "DejaVuSans-Bold.ttf": "b184b89e3c1075f22f6b71575b6fc20d4972b3cfd3b23322ca6fd596dcaef167",
    "DejaVuSans-Oblique.ttf": "ccdf74b350f11fd3dd5774de50e5e6346a1a5da1f5b7d5fb83590665e97a5213",
    "DejaVuSans-BoldOblique.ttf": "6edf0283160186af451cbee71e7b845f2e4cabf264bb992ce668c83c25465e6f",
    "DejaVuSansMono.ttf": "602ec86b8948cfcd956482fe64f94c36c867770149ef2f791d4613f443bcecb3",
    "DejaVuSansMono-Bold.ttf": "baada9a5172fe20886251aff0433fc38461912d5daf07287e7bee56620a8da96",
    "DejaVuSansMono-Oblique.ttf": "28052813f7a709fc89f52d192dc995ef4f0fdc5c3d7b73a49d6849b1916d0cd0",
    "DejaVuSansMono-BoldOblique.ttf": "a69081c15c76c827e0a27a5a7f5c74b6135c843499955495ffa8c20d3a98288b",
    "DejaVuSerif.ttf": "107244956e9962b9e96faccdc551825e0ae0898ae13737133e1b921a2fd35ffa",
    "DejaVuSerif-Bold.ttf": "c3753f2ed6bc673f15846dc45addbeb3b9c872f32fb18fd53a21f1bef1ed7676",
    "DejaVuSerif-Italic.ttf": "3e7994fbc54fa10ce3352a42d548fadd7d9cadb69cb1109bc9d960f6dac57f04",
    "DejaVuSerif-BoldItalic.ttf": "d93efec7a9d2e826768d1a2ee95b95870e15e29599a84f3484af1de1cec2e181",
}  # fmt: skip


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder, found without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: matplotlib is not installed; run `pip install matplotlib`.")
    return Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"


@functools.lru_cache(maxsize=len(FONTS))
def load_font(name: str) -> ImageFont.FreeTypeFont:
    path = font_dir() / name
    if not path.is_file():
        sys.exit(f"error: font {path} is missing; reinstall matplotlib.")
    got = sha256_bytes(path.read_bytes())
    if got != FONTS[name]:
        log.warning("%s has sha256 %s, expected %s: glyphs will differ", path, got, FONTS[name])
    return ImageFont.truetype(str(path), FONT_PX, layout_engine=ImageFont.Layout.BASIC)


def render(k: int, i: int, seed: int = SEED) -> np.ndarray:
    """Image ``i`` of class ``k`` (letter ``CLASSES[k]``) as uint8 [28, 28], white on black."""
    rng = np.random.default_rng([seed, k, i])
    face = list(FONTS)[rng.integers(len(FONTS))]
    # stroke weight in high-res px: > 0 thickens (stroke_width), < 0 thins (MinFilter). Bold faces
    # go either way; regular faces are always thickened a little, or their serif hairlines fade
    weight = int(rng.integers(*((-2, 4) if "Bold" in face else (1, 6))))
    angle = math.radians(rng.uniform(-12, 12))
    shear = rng.uniform(-0.2, 0.2)
    sx, sy = rng.uniform(0.8, 1.2, size=2)
    side = rng.uniform(16, 22)  # final length of the longer side of the ink, px
    dx, dy = rng.integers(-2, 3, size=2)  # final px

    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(canvas).text(
        (CANVAS / 2, CANVAS / 2), CLASSES[k], fill=255, font=load_font(face), anchor="mm",
        stroke_width=max(weight, 0), stroke_fill=255,
    )  # fmt: skip
    if weight < 0:
        canvas = canvas.filter(ImageFilter.MinFilter(2 * -weight + 1))

    # output -> input map about the canvas centre: inverse of rotation @ shear @ scale
    c, s = math.cos(angle), math.sin(angle)
    forward = np.array([[c, -s], [s, c]]) @ np.array([[1, shear], [0, 1]]) @ np.diag([sx, sy])
    inv = np.linalg.inv(forward)
    centre = np.array([CANVAS / 2, CANVAS / 2])
    offset = centre - inv @ centre
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    canvas = canvas.transform(
        canvas.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )

    ink = canvas.crop(canvas.getbbox())
    scale = side / max(ink.size)
    w, h = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    small = np.asarray(ink.resize((w, h), Image.Resampling.BOX), dtype=np.float64)

    # centre of mass at the frame centre, jittered, then clamped so the ink keeps a 1 px margin
    ys, xs = np.indices(small.shape)
    mass = small.sum()
    cy, cx = (ys * small).sum() / mass, (xs * small).sum() / mass
    top = int(np.clip(round(SIZE / 2 - cy) + dy, 1, SIZE - 1 - h))
    left = int(np.clip(round(SIZE / 2 - cx) + dx, 1, SIZE - 1 - w))
    out = np.zeros((SIZE, SIZE), dtype=np.uint8)
    out[top : top + h, left : left + w] = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return out


def build(seed: int = SEED) -> dict[str, np.ndarray]:
    images = np.stack([render(k, i, seed) for k in range(len(CLASSES)) for i in range(PER_CLASS)])
    labels = np.repeat(np.arange(len(CLASSES), dtype=np.int64), PER_CLASS)
    return pack(images, labels, CLASSES, per_class=PER_CLASS)


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 16) -> None:
    """A PNG with one row per class: its first ``per_class`` images, scaled x2."""
    rows = [np.concatenate(images[labels == k][:per_class], axis=1) for k in range(len(CLASSES))]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST
    ).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG of samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    log.info("fonts from %s; Pillow %s, FreeType %s", font_dir(), Image.__version__,
             features.version("freetype2"))  # fmt: skip
    arrays = build(args.seed)
    path = args.out / "glyphs.npz"
    data = save_npz_deterministic(path, arrays)
    with np.load(path, allow_pickle=False) as check:  # round trip, no pickles
        assert all(np.array_equal(check[k], v) for k, v in arrays.items())
    log.info("wrote %s  sha256 %s  (%d bytes; images %s %s, classes %s)", path,
             sha256_bytes(data), len(data), arrays["images"].dtype,
             arrays["images"].shape, ",".join(CLASSES))  # fmt: skip
    if args.grid:
        save_grid(arrays["images"], arrays["labels"], args.grid)
        log.info("wrote %s", args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
