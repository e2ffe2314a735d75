"""Images in WebDataset samples and folders: which member holds the image, which files are images,
and a plain reader of crawl shards (tarfile and PIL only: a reference independent of the loaders)."""

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from manifests import IMAGE_KEYS
from stages.common.tar_stream import tar_samples

# file suffixes read as images from a folder (the crawl's `source: folder`, a labelled test folder)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_key(sample: dict) -> str | None:
    """The member of a WebDataset sample that holds its image (jpg, jpeg, png, webp), or None."""
    return next((k for k in IMAGE_KEYS if k in sample), None)


def images_with_keys(shard: Path, keys: set[str]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the samples of ``shard`` whose key is in ``keys``; only their image
    members are read (``tar_stream``), the rest of the shard is skipped unread."""
    def wanted(name: str) -> bool:
        return is_image_member(name) and base_plus_ext(name)[0] in keys

    for sample in tar_samples([{"url": str(shard)}], handler=lambda e: False, select=wanted):
        if (ext := image_key(sample)) is not None:
            yield sample["__key__"], ext, sample[ext]


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """An (h, w, channels) uint8 array as PNG or JPEG (quality 95) bytes; one channel is stored grey."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    image.save(buffer, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **({"quality": 95} if fmt != "png" else {}))
    return buffer.getvalue()


def is_image_member(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS


def read_shard_images(shards_dir: Path, names=None) -> Iterator[tuple[str, Image.Image]]:
    """(uid, RGB image) of every image in img2dataset's shards (or the ``names`` ones), read with
    tarfile and PIL only: what the tests and benchmarks compare the stages' loaders with."""
    for tar_path in sorted(Path(shards_dir).glob("*.tar")):
        if names is not None and tar_path.name not in names:
            continue
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".json"):
                    uid = json.loads(tar.extractfile(members[name]).read())["uid"]
                    data = tar.extractfile(members[name.replace(".json", ".jpg")]).read()
                    yield uid, Image.open(io.BytesIO(data)).convert("RGB")
