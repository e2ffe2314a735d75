"""The textile scenario's data: native-resolution tiles that hold their defect, a stratified private split,
and a web pool of the planned sources (the digit demo is unchanged: test_make_all)."""

import io
import json

import numpy as np
import pandas as pd
import webdataset as wds
from PIL import Image

from demo.textile import CLASSES, TILE, bundled_images, defect_centre, fabric_like, tile


def test_the_bundle_holds_the_three_classes():
    files, labels = bundled_images()
    assert np.bincount(labels).tolist() == [1000, 500, 500] and all(f.suffix == ".jpg" for f in files)


def test_a_local_defect_tile_holds_the_defect_and_is_cut_at_native_resolution():
    files, labels = bundled_images()
    rng = np.random.default_rng(0)
    local = [f for f, label in zip(files, labels) if CLASSES[label] == "local_defect"][:20]
    nominal = [f for f, label in zip(files, labels) if CLASSES[label] == "nominal"][:20]

    def outliers(image):  # the defect's extreme pixels in the tile's densest 15×15 window
        from scipy import ndimage

        pixels = np.asarray(image, np.float32)
        far = (np.abs(pixels - ndimage.median_filter(pixels, 3)) > 70).astype(np.float32)
        return ndimage.uniform_filter(far, 15).max() * 225

    local_tiles = [tile(f, True, rng) for f in local]
    assert all(t.size == (TILE, TILE) and t.mode == "L" for t in local_tiles)
    assert np.median([outliers(t) for t in local_tiles]) > 3 * np.median([outliers(tile(f, False, rng))
                                                                             for f in nominal])
    # native resolution: the tile's pixels are the image's own, found at some offset
    source = np.asarray(Image.open(local[0]).convert("L"))
    y, x = defect_centre(source.astype(np.float32))
    assert 0 <= y < source.shape[0] and 0 <= x < source.shape[1]


def test_the_private_split_is_stratified(tmp_path, monkeypatch):
    import demo.textile
    from demo.textile import build_private

    # the tiles' content is tested above: a blank tile of the right size keeps this test to the split
    monkeypatch.setattr(demo.textile, "tile", lambda path, local, rng: Image.new("L", (TILE, TILE)))
    counts = build_private(tmp_path, seed=0)
    assert counts == {"train": 1300, "val": 200, "test": 500}
    labels = {split: [int(s["cls"]) for s in wds.WebDataset(sorted(str(p) for p in tmp_path.glob(f"{split}-*.tar")),
                                                            shardshuffle=False)] for split in counts}
    for split, n in counts.items():
        assert np.bincount(labels[split]).tolist() == [n // 2, n // 4, n // 4], split
    sample = next(iter(wds.WebDataset(str(tmp_path / "test-000000.tar"), shardshuffle=False)))
    assert Image.open(io.BytesIO(sample["png"])).size == (TILE, TILE)
    assert json.loads(sample["cls"]) in (0, 1, 2)


def test_fabric_like_images_plant_the_defects_they_are_labelled_with():
    rng = np.random.default_rng(0)
    images = list(fabric_like(200, rng))
    labels = pd.Series([label for _, label in images])
    assert set(labels) == {0, 1, 2} and 0.1 < (labels == 1).mean() < 0.3 and 0.1 < (labels == 2).mean() < 0.3
    assert all(96 <= image.size[0] <= 256 for image, _ in images)
