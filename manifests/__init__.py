"""Contracts between stages: parquet schemas, the uid rule, and validated readers/writers.

Stages exchange only WebDataset shards, parquet manifests keyed by ``uid`` and row-aligned
``.npy`` arrays. Everything that crosses a stage boundary is described here.
"""

from manifests.io import (
                          ManifestError,
                          ManifestWriter,
                          atomic_write_bytes,
                          atomic_write_json,
                          concat_arrays,
                          expand_shards,
                          read_array,
                          read_manifest,
                          write_manifest,
)
from manifests.schemas import (
                          CRAWL,
                          IMAGE_KEYS,
                          PERTURBATION,
                          SCHEMAS,
                          SCORE,
                          SCORE_FAILURES,
                          SELECTION,
                          SYNTHESIS,
                          ManifestSchema,
)
from manifests.uid import uid_for

__all__ = [
    "ManifestWriter",
    "CRAWL",
    "IMAGE_KEYS",
    "PERTURBATION",
    "SCHEMAS",
    "SCORE",
    "SCORE_FAILURES",
    "SELECTION",
    "SYNTHESIS",
    "ManifestError",
    "ManifestSchema",
    "atomic_write_bytes",
    "atomic_write_json",
    "concat_arrays",
    "expand_shards",
    "read_array",
    "read_manifest",
    "uid_for",
    "write_manifest",
]
