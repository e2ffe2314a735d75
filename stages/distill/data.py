"""The transfer set as a WebDataset stream: perturb's shards, shuffled, split by rank and worker.

Small generator stages composed into a ``wds.DataPipeline`` (each testable on plain lists).
Every epoch is a pure function of (seed, epoch): the shard order is a seeded permutation, each
rank takes every world_size-th shard of it, each DataLoader worker every num_workers-th of those,
and the sample shuffle buffer is seeded too. So a run resumed from its last epoch checkpoint sees
exactly the batches an uninterrupted run would have.

Ranks hold different numbers of samples; DDP needs every rank to take the same number of steps.
The shard sizes are known (``perturb/shards.json``), so every rank computes every rank's batch
count and all stop after the smallest: no collective is needed to agree. With few shards per rank
that wastes data; ``split: sample`` then has every rank read every shard and keep every
world_size-th sample (more reading, equal shares).

Each worker keeps the shards it has decoded in memory, up to ``distill.cache_mb``: on a small
transfer set every epoch after the first skips reading and decoding, with the same batches.
"""

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.errors import UserError
from stages.common.images import image_key
from stages.common.tar_stream import tar_samples


def epoch_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """This epoch's shard order: a permutation that depends on (seed, epoch) only."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def rank_shards(ordered: list[str], rank: int, world: int) -> list[str]:
    return ordered[rank::world]


def batches_per_rank(ordered: list[str], counts: dict[str, int], world: int, workers: int, batch_size: int,
                     split: str = "shard") -> list[int]:
    """Batches each rank's loader yields this epoch (each worker batches its own shards, the last
    batch of each worker partial). ``split``: ranks take whole shards, or every world-th sample."""
    out = []
    for r in range(world):
        mine = rank_shards(ordered, r, world) if split == "shard" else ordered
        share = (lambda s: counts[s]) if split == "shard" else (lambda s: len(range(r, counts[s], world)))
        per_worker = [sum(share(s) for s in mine[w::max(workers, 1)]) for w in range(max(workers, 1))]
        out.append(sum(-(-n // batch_size) for n in per_worker))
    return out


def every_nth_per_shard(samples, rank: int, world: int):
    """The samples at positions rank, rank + world, … of each shard (split by sample)."""
    url, i = None, 0
    for sample in samples:
        if sample["__url__"] != url:
            url, i = sample["__url__"], 0
        if i % world == rank:
            yield sample
        i += 1


def decode(sample: dict, transform, rows: dict[str, int], with_mix: bool) -> dict:
    """A transfer-set sample → the original (and its first perturbation) as model inputs + its row
    in the score/filter arrays."""
    ext = image_key(sample)
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


class EpochStream(torch.utils.data.IterableDataset):
    """This rank's batches, one epoch per ``iter()``: epoch e = start_epoch + how often it was
    iterated. Kept alive in persistent DataLoader workers (no start-up cost per epoch), every
    worker's copy counts the same epochs, so the stream stays a function of (seed, epoch)."""

    def __init__(self, data: "TransferSet", transform, seed: int, rank: int, world: int, batch_size: int,
                 shuffle_buffer: int, with_mix: bool, start_epoch: int, split: str, cache_mb: float):
        self.data, self.transform, self.seed, self.rank, self.world = data, transform, seed, rank, world
        self.split = split
        self.batch_size, self.shuffle_buffer, self.with_mix = batch_size, shuffle_buffer, with_mix
        self.epoch = start_epoch
        # decoded shards kept by this worker, up to cache_mb: later epochs skip reading and decoding
        self.cache_bytes, self.cached_bytes, self.cache = cache_mb * 2 ** 20, 0, {}

    def shard(self, url: str) -> list[dict]:
        """One shard's samples for this rank, decoded (from the cache after the first time)."""
        if url in self.cache:
            return self.cache[url]
        samples = tar_samples([{"url": url}], handler=lambda e: False)  # damage raises: the inventory was checked
        if self.split == "sample":
            samples = every_nth_per_shard(samples, self.rank, self.world)
        decoded = [decode(s, self.transform, self.data.rows, self.with_mix) for s in samples]
        size = sum(t.numel() * t.element_size() for d in decoded for t in d.values() if torch.is_tensor(t))
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[url], self.cached_bytes = decoded, self.cached_bytes + size
        return decoded

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        ordered = epoch_order(sorted(self.data.counts), self.seed, epoch)
        mine = rank_shards(ordered, self.rank, self.world) if self.split == "shard" else ordered
        decoded = (sample for s in mine[worker::workers] for sample in self.shard(s))
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
        shuffled = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(decoded)
        yield from wds.batched(self.batch_size, collation_fn=collate, partial=True)(shuffled)


@dataclass
class TransferSet:
    """The shards the student learns from (perturb's, synthesize's) with their sizes, and the row of each
    sample (uid) in the per-sample arrays distill holds."""

    counts: dict[str, int]  # shard path -> samples
    rows: dict[str, int]  # uid -> its row in the per-sample arrays distill holds (weights, cached teacher outputs)

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    split: str = "shard"  # ranks read whole shards, or every world-th sample of every shard

    def workers(self, world: int, workers: int) -> int:
        """DataLoader workers per rank: no more than the fewest shards a rank holds (the same every
        epoch and on every rank, which the step count relies on)."""
        if self.split == "sample":
            return min(workers, len(self.counts))
        if len(self.counts) < world:
            raise UserError(f"the transfer set has {len(self.counts)} shard(s), fewer than the {world} torchrun "
                            "ranks: lower crawl.number_sample_per_shard (or synthesize.images_per_shard) so every "
                            "rank gets a shard, or set distill.split: sample")
        return min(workers, len(self.counts) // world)

    def steps(self, epoch: int, seed: int, world: int, workers: int, batch_size: int) -> int:
        """Batches every rank takes in ``epoch``: the smallest rank's count."""
        ordered = epoch_order(sorted(self.counts), seed, epoch)
        return min(batches_per_rank(ordered, self.counts, world, self.workers(world, workers), batch_size, self.split))

    def loader(self, transform, start_epoch: int, seed: int, rank: int, world: int, batch_size: int, workers: int,
               shuffle_buffer: int, with_mix: bool, cache_mb: float = 0) -> torch.utils.data.DataLoader:
        """This rank's loader; each ``iter()`` of it is the next epoch, from ``start_epoch`` on."""
        stream = EpochStream(self, transform, seed, rank, world, batch_size, shuffle_buffer, with_mix, start_epoch,
                             self.split, cache_mb)
        n = self.workers(world, workers)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n, persistent_workers=n > 0,
                                           prefetch_factor=4 if n else None)
