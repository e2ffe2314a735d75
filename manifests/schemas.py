"""Parquet schemas of the manifests the stages exchange.

Each manifest is one parquet file with one row per sample, keyed by ``uid`` (see ``uid.py``).
The schema name and version are stored in the file's metadata so a reader can tell a crawl
manifest from any other parquet file. All of them are in ``SCHEMAS``.
"""

from dataclasses import dataclass

import pyarrow as pa

# the extensions under which a WebDataset sample of any stage holds its image
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ManifestSchema:
    name: str
    version: int
    schema: pa.Schema
    key: str = "uid"

    @property
    def required(self) -> list[str]:
        return [f.name for f in self.schema if not f.nullable]


CRAWL = ManifestSchema(
    name="crawl",
    version=1,
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            # "success" or "failed"; `reason` is a short category, `error` img2dataset's message
            pa.field("status", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
            pa.field("error", pa.string()),
            # where the image is: shard file name (relative to the crawl folder) and its key in it
            pa.field("shard", pa.string()),
            pa.field("key", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("original_width", pa.int32()),
            pa.field("original_height", pa.int32()),
            pa.field("caption", pa.string()),
        ]
    ),
)

SCORE = ManifestSchema(
    name="score",
    version=1,
    # one row per scored image, row i ↔ row i of score/logits.npy, features.npy (, embeddings.npy)
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),  # crawl shard (relative to the crawl folder)
            pa.field("key", pa.string(), nullable=False),  # the sample's key in that shard
            pa.field("pseudo_label", pa.int32(), nullable=False),  # the teacher's top class
            pa.field("pseudo_class", pa.string(), nullable=False),  # its name
            pa.field("confidence", pa.float32(), nullable=False),  # softmax probability of the top class
            pa.field("entropy", pa.float32(), nullable=False),  # of the softmax, in nats
            pa.field("margin", pa.float32(), nullable=False),  # top-1 minus top-2 probability
            pa.field("topk_labels", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_probs", pa.list_(pa.float32()), nullable=False),
        ]
    ),
)

SCORE_FAILURES = ManifestSchema(
    name="score_failures",
    version=1,
    # crawled images the score stage could not use: undecodable, or missing from a damaged shard
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("key", pa.string()),
            pa.field("reason", pa.string(), nullable=False),  # decode_error | missing_from_shard
            pa.field("error", pa.string()),
        ]
    ),
)

SELECTION = ManifestSchema(
    name="selection",
    version=1,
    # one row per scored image, in the order of the score manifest: which ones the student learns from
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),  # crawl shard (relative to the crawl folder)
            pa.field("key", pa.string(), nullable=False),
            pa.field("pseudo_label", pa.int32(), nullable=False),  # the teacher's, from the score manifest
            pa.field("keep", pa.bool_(), nullable=False),
            # per-sample loss weight = 1/propensity, normalised to mean 1 over the kept samples and
            # clipped; 0 for a dropped sample
            pa.field("weight", pa.float32(), nullable=False),
            pa.field("propensity", pa.float32()),  # estimated P(machine domain | x); null when dropped
            pa.field("propensity_formula", pa.string(), nullable=False),  # filter.propensity that made it
            pa.field("nearest_class", pa.int32()),  # class of the nearest reference prototype, if it has classes
            pa.field("agrees", pa.bool_()),  # nearest_class == pseudo_label (null without classes)
            pa.field("similarity", pa.float32(), nullable=False),  # to the reference; higher: more alike
            pa.field("density_ratio", pa.float32()),  # kNN estimate of p_reference / p_pool (reference_set)
            pa.field("reason", pa.string()),  # why a sample was dropped; null when kept
        ]
    ),
)

PERTURBATION = ManifestSchema(
    name="perturbation",
    version=1,
    # one row per perturbed image: which kept image it perturbs, with whose statistics, how much
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),  # the source image (the sample's key in the shard)
            pa.field("variant", pa.int32(), nullable=False),  # stored as <uid>.mix<variant>.<format>
            pa.field("partner_uid", pa.string(), nullable=False),  # whose channel statistics are mixed in
            pa.field("lam", pa.float32(), nullable=False),  # weight of the source's own statistics
            pa.field("pseudo_label", pa.int32(), nullable=False),
            pa.field("partner_pseudo_label", pa.int32(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),  # perturb shard (relative to the perturb folder)
        ]
    ),
)

SYNTHESIS = ManifestSchema(
    name="synthesis",
    version=1,
    # one row per synthesised image, row i ↔ row i of synthesize/logits.npy, features.npy: its lineage
    # (where it started, what it was optimised toward, for how long, how far it got) and what the
    # teacher makes of the stored image
    schema=pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),  # the sample's key in its shard
            pa.field("shard", pa.string(), nullable=False),  # synthesize shard (relative to the synthesize folder)
            pa.field("start", pa.string(), nullable=False),  # noise, or kept (a kept web image refined)
            pa.field("source_uid", pa.string()),  # the kept web image it started from; null from noise
            pa.field("target", pa.int32(), nullable=False),  # the class it was optimised toward
            pa.field("steps", pa.int32(), nullable=False),  # optimisation steps run on its batch
            pa.field("best_step", pa.int32(), nullable=False),  # the step whose pixels were kept
            # its batch's loss terms at that step (BatchNorm statistics are a property of a batch)
            pa.field("batch_loss", pa.float32(), nullable=False),
            pa.field("batch_ce", pa.float32(), nullable=False),
            pa.field("batch_bn", pa.float32(), nullable=False),
            pa.field("batch_tv", pa.float32(), nullable=False),
            # the teacher on the stored image: its top class, the probability of the target, and the
            # image's own distance from every BatchNorm layer's running statistics (score's bn_distance)
            pa.field("pseudo_label", pa.int32(), nullable=False),
            pa.field("target_probability", pa.float32(), nullable=False),
            pa.field("bn_distance", pa.float32(), nullable=False),
        ]
    ),
)

SCHEMAS = {s.name: s for s in (CRAWL, SCORE, SCORE_FAILURES, SELECTION, PERTURBATION, SYNTHESIS)}
