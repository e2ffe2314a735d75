"""Benchmark: at what resolution the textile teacher tells nominal, local and global defects apart.

Trains the textile scenario's teacher recipe (``demo.teacher.train``: timm mobilenetv3_small_050, AdamW,
flips, 24 epochs) on the scenario's stratified train split, for each input: the whole 250×250 image
resized to S px, or one native-resolution T×T tile (``demo.textile.tile``). Reports top-1 on the val and
test splits and the recall of each class on test.

    python bench/bench_textile_teacher.py [--whole 64 128] [--tiles 64 96]

Writes bench/results/textile_teacher.{csv,md}.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from bench.methods import machine  # noqa: E402
from demo.teacher import TEXTILE_MEAN, TEXTILE_STD, train  # noqa: E402
from demo.textile import CLASSES, SPLITS, bundled_images, tile  # noqa: E402
from manifests import atomic_write_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def inputs(files, labels, kind: str, side: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = []
    for f, label in zip(files, labels):
        if kind == "whole":
            image = Image.open(f).convert("L").resize((side, side), Image.Resampling.BILINEAR)
        else:
            image = tile(f, CLASSES[label] == "local_defect", rng, side)
        images.append(np.asarray(image, np.float32) / 255)
    return (torch.tensor(np.stack(images))[:, None] - TEXTILE_MEAN) / TEXTILE_STD


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--whole", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--tiles", type=int, nargs="*", default=[64, 96])
    parser.add_argument("--epochs", type=int, default=24)
    args = parser.parse_args()
    files, labels = bundled_images()
    rest, test = train_test_split(np.arange(len(labels)), test_size=SPLITS["test"], stratify=labels, random_state=0)
    train_idx, val = train_test_split(rest, test_size=SPLITS["val"], stratify=labels[rest], random_state=0)
    rows = []
    for kind, sides in (("whole", args.whole), ("tile", args.tiles)):
        for side in sides:
            x, y = inputs(files, labels, kind, side), torch.tensor(labels)
            model, _ = train(x[train_idx], y[train_idx], "mobilenetv3_small_050", args.epochs, 0, textile=True)
            with torch.no_grad():
                predicted = model(x).argmax(1).numpy()
            row = {"input": kind, "side": side, "val_top1": (predicted[val] == labels[val]).mean(),
                   "test_top1": (predicted[test] == labels[test]).mean()}
            row |= {f"recall_{c}": (predicted[test][labels[test] == i] == i).mean() for i, c in enumerate(CLASSES)}
            rows.append(row)
            print(row, flush=True)
    table = pd.DataFrame(rows)
    atomic_write_bytes(RESULTS / "textile_teacher.csv", table.to_csv(index=False, float_format="%.4f").encode())
    atomic_write_bytes(RESULTS / "textile_teacher.md", "\n".join([
        "# The textile teacher: whole images vs native-resolution tiles", "", f"Machine: {machine()}. "
        f"`python bench/bench_textile_teacher.py`: mobilenetv3_small_050, {args.epochs} epochs, the scenario's "
        "train split; top-1 on its val and test splits, recall per class on test.", "",
        table.to_markdown(index=False, floatfmt=".3f"), ""]).encode())


if __name__ == "__main__":
    main()
