"""The transfer set as a WebDataset stream: perturb's shards, shuffled, split by rank and worker.

Small generator stages composed into a ``wds.DataPipeline`` (each testable on plain lists).
Every epoch is a pure function of (seed, epoch): the shard order is a seeded permutation, each
rank takes every world_size-th shard of it, each DataLoader worker every num_workers-th of those,
and the sample shuffle buffer is seeded too. So a run resumed from its last epoch checkpoint sees
exactly the batches an uninterrupted run would have.

Ranks hold different numbers of samples; DDP needs every rank to take the same number of steps.
The shard sizes are known (``perturb/shards.json``), so every rank computes every rank's batch
count and all stop after the smallest: no collective is needed to agree.
"""

import io
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def epoch_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """This epoch's shard order: a permutation that depends on (seed, epoch) only."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def rank_shards(ordered: list[str], rank: int, world: int) -> list[str]:
    return ordered[rank::world]


def batches_per_rank(ordered: list[str], counts: dict[str, int], world: int, workers: int, batch_size: int) -> list[int]:
    """Batches each rank's loader yields this epoch (each worker batches its own shards, the last
    batch of each worker partial)."""
    out = []
    for r in range(world):
        mine = rank_shards(ordered, r, world)
        per_worker = [sum(counts[s] for s in mine[w::max(workers, 1)]) for w in range(max(workers, 1))]
        out.append(sum(-(-n // batch_size) for n in per_worker))
    return out


def decode(sample: dict, transform, rows: dict[str, int], with_mix: bool) -> dict:
    """A transfer-set sample → the original (and its first perturbation) as model inputs + its row
    in the score/filter arrays."""
    ext = next(k for k in IMAGE_KEYS if k in sample)
    out = {"row": rows[sample["__key__"]], "image": transform(Image.open(io.BytesIO(sample[ext])))}
    if with_mix:
        mix = next((sample[k] for k in sample if k.startswith("mix")), None)
        if mix is None:
            raise ValueError(f"sample {sample['__key__']} of {sample['__url__']} has no perturbation: run perturb "
                             "with variants ≥ 1, or set distill.perturbation to online or none")
        out["mix"] = transform(Image.open(io.BytesIO(mix)))
    return out


def collate(samples: list[dict]) -> dict:
    batch = {"row": torch.tensor([s["row"] for s in samples]), "image": torch.stack([s["image"] for s in samples])}
    if "mix" in samples[0]:
        batch["mix"] = torch.stack([s["mix"] for s in samples])
    return batch


@dataclass
class TransferSet:
    """perturb's shards with their sizes, and the row of each sample (uid) in the score arrays."""

    folder: Path
    counts: dict[str, int]  # shard (relative to folder) -> samples
    rows: dict[str, int]  # uid -> row of score/logits.npy and filter/selection.parquet

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    def loader(self, transform, epoch: int, seed: int, rank: int, world: int, batch_size: int, workers: int,
               shuffle_buffer: int, with_mix: bool):
        """(loader, steps): this rank's batches of ``epoch`` and how many of them to take."""
        ordered = epoch_order(sorted(self.counts), seed, epoch)
        steps = min(batches_per_rank(ordered, self.counts, world, workers, batch_size))
        mine = rank_shards(ordered, rank, world)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([str(self.folder / s) for s in mine]),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(f"{seed}-{epoch}-{rank}")),
            wds.map(partial(decode, transform=transform, rows=self.rows, with_mix=with_mix)),
            wds.batched(batch_size, collation_fn=collate, partial=True),
        )
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=min(workers, len(mine)),
                               persistent_workers=False)
        return loader, steps
