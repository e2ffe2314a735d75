"""Parquet schemas of the manifests the stages exchange.

Each manifest is one parquet file with one row per sample, keyed by ``uid`` (see ``uid.py``).
The schema name and version are stored in the file's metadata so a reader can tell a crawl
manifest from any other parquet file. Later stages add their schemas to ``SCHEMAS``
(score, selection, perturbation, training log).
"""

from dataclasses import dataclass

import pyarrow as pa


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

SCHEMAS = {s.name: s for s in (CRAWL,)}
