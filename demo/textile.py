"""The textile-inspection scenario: a defect classifier's private data and a web pool for it.

The private data come from the 2,000 simulated textile images of the ``conformal-clip-data`` package (MIT;
250×250 grey, 1,000 nominal, 500 with a local defect, 500 with a global defect). Inspection works on patches at
the camera's native resolution: a local defect is a cluster of a few extreme pixels about 8 px across, which
any downscaling of the whole image averages away (a teacher on whole images resized to 64 or 128 px finds
2% and 19% of them). So each image gives one TILE×TILE tile at native resolution — around the defect for a
local defect (found as the densest cluster of pixels far from their 3×3 median), anywhere otherwise — split
stratified into train / val / test shards like the digit demo's. The web pool is what a crawl for "fabric texture" returns: procedurally
generated fabric-like textures (oriented band-limited noise; some with a planted speck or a changed grain,
labelled with that defect kind for diagnostics only), crops of other textures and of photos, glyphs and noise.
"""

from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.errors import UserError

CLASSES = ["nominal", "local_defect", "global_defect"]
TILE = 96  # chosen on the val split: 97.5% (64 px tiles: 95.0%; bench/results/textile_teacher.md)
_FOLDERS = {"nominal": "nominal", "local_defect": "local", "global_defect": "global"}
SPLITS = {"test": 500, "val": 200}  # the rest (1,300) is train


def bundled_images() -> tuple[list[Path], np.ndarray]:
    """The package's image files and their class (index into CLASSES)."""
    try:
        import conformal_clip_data
    except ImportError as e:
        raise UserError("the textile scenario needs the conformal-clip-data package: pip install "
                        "conformal-clip-data (or `make setup`, which installs it)") from e
    root = conformal_clip_data.textile_simulated_root()
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        found = sorted((root / _FOLDERS[name]).glob("*.jpg"))
        files += found
        labels += [label] * len(found)
    return files, np.array(labels)


def defect_centre(pixels: np.ndarray) -> tuple[int, int]:
    """Where a local defect is: the 15×15 window with the most pixels more than 70 grey levels from their
    3×3 median (the defect's extreme pixels; the woven texture has almost none)."""
    from scipy import ndimage

    outliers = (np.abs(pixels - ndimage.median_filter(pixels, 3)) > 70).astype(np.float32)
    y, x = np.unravel_index(np.argmax(ndimage.uniform_filter(outliers, 15)), outliers.shape)
    return int(y), int(x)


def tile(path: Path, local_defect: bool, rng: np.random.Generator, side: int = TILE) -> Image.Image:
    """One side×side tile of an image: holding its local defect (up to a quarter tile off centre), or anywhere."""
    pixels = np.asarray(Image.open(path).convert("L"), np.float32)
    h, w = pixels.shape
    if local_defect:
        y, x = defect_centre(pixels)
        y0, x0 = (int(np.clip(c - side // 2 + rng.integers(-side // 4, side // 4 + 1), 0, n - side))
                  for c, n in ((y, h), (x, w)))
    else:
        y0, x0 = (int(v) for v in rng.integers(0, (h - side + 1, w - side + 1)))
    return Image.fromarray(pixels[y0:y0 + side, x0:x0 + side].astype(np.uint8), "L")


def build_private(folder: Path, seed: int) -> dict:
    """Stratified train / val / test shards of one native-resolution tile per bundled image (.png, .cls)."""
    from sklearn.model_selection import train_test_split

    from demo.world import encode

    files, labels = bundled_images()
    rng = np.random.default_rng(seed)
    tiles = [encode(tile(f, label == CLASSES.index("local_defect"), rng), "png") for f, label in zip(files, labels)]
    rest, test = train_test_split(np.arange(len(labels)), test_size=SPLITS["test"], stratify=labels,
                                  random_state=seed)
    train, val = train_test_split(rest, test_size=SPLITS["val"], stratify=labels[rest], random_state=seed)
    counts = {}
    for split, idx in (("train", train), ("val", val), ("test", test)):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=1000, verbose=0) as sink:
            for i in sorted(idx):
                sink.write({"__key__": f"{split}{i:05d}", "png": tiles[i], "cls": int(labels[i])})
        counts[split] = len(idx)
    return counts


# ---------------------------------------------------------------- web pool sources

def fabric(rng: np.random.Generator, side: int) -> np.ndarray:
    """Oriented band-limited noise plus a fine grain: threads at a random angle and scale, as woven or
    knitted fabric looks (zero mean, unit variance)."""
    fy, fx = np.fft.fftfreq(side)[:, None], np.fft.fftfreq(side)[None, :]
    theta = rng.uniform(0, np.pi)
    u, v = fx * np.cos(theta) + fy * np.sin(theta), -fx * np.sin(theta) + fy * np.cos(theta)
    along, across = rng.uniform(0.01, 0.05), rng.uniform(0.05, 0.2)
    envelope = np.exp(-((u / along) ** 2 + (v / across) ** 2) / 2)
    threads = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(side, side))) * envelope))
    threads = (threads - threads.mean()) / threads.std()
    tex = threads + rng.uniform(0.1, 0.5) * rng.normal(size=(side, side))
    return (tex - tex.mean()) / tex.std()


def _speck(tex: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A local defect: a small irregular cluster of off pixels (a knot, a stain, a hole)."""
    side = len(tex)
    size = int(rng.integers(max(3, side // 40), max(5, side // 16)))
    y, x = rng.integers(size, side - size, 2)
    patch = rng.random((size, size)) < 0.6
    out = tex.copy()
    out[y:y + size, x:x + size][patch] = rng.choice([-3.5, 3.5]) + rng.normal(0, 0.5, int(patch.sum()))
    return out


def _regrain(tex: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A global defect: the whole fabric's grain changed (its coarse threads weakened, fine noise added)."""
    fine = rng.normal(size=tex.shape)
    out = rng.uniform(0.4, 0.7) * tex + rng.uniform(0.5, 0.9) * fine
    return (out - out.mean()) / out.std()


def fabric_like(n: int, rng: np.random.Generator):
    """Procedural fabric: 60% plain, 20% with a speck, 20% regrained (labelled as such, for diagnostics)."""
    for _ in range(n):
        side = int(rng.integers(96, 257))
        tex, label = fabric(rng, side), 0
        kind = rng.random()
        if kind < 0.2:
            tex, label = _speck(tex, rng), 1
        elif kind < 0.4:
            tex, label = _regrain(tex, rng), 2
        arr = np.clip(rng.uniform(90, 170) + rng.uniform(18, 45) * tex, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
        if rng.random() < 0.3:  # a tinted photo of a grey fabric
            tint = rng.uniform(0.5, 1.0, 3)
            image = Image.fromarray((arr[..., None] * tint).astype(np.uint8), "RGB")
        yield image, label


def _texture_crops(n: int, rng: np.random.Generator):
    """Crops of other textures (brick, grass, gravel…) in grey or colour."""
    import skimage.data

    from demo.world import TEXTURES, crops

    yield from crops([getattr(skimage.data, name)() for name in TEXTURES], n, rng)


def _glyphs(n: int, rng: np.random.Generator):
    from demo.world import font_chars

    yield from font_chars("0123456789ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnpqrtuwxyz", False)(n, rng)


def sources() -> dict:
    """The textile web pool: source → (share of the pool, generator of (image, label) pairs)."""
    from demo.world import noise_images, photo_crops

    return {"fabric_like": (0.30, fabric_like), "texture_crops": (0.20, _texture_crops),
            "photo_crops": (0.20, photo_crops), "glyphs": (0.10, _glyphs), "noise": (0.20, noise_images)}
