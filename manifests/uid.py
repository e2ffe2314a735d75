"""The uid rule: every sample is known by a stable id derived from where it came from.

A uid is the first 20 hex digits (80 bits) of the SHA-256 of the sample's identity: its URL for
crawled images, its path relative to the folder root for ``source: folder``. It never depends on
row order, shard layout or crawl outcome, so manifests written by different stages (or by
different runs of one stage) join on it.
"""

import hashlib

UID_HEX_DIGITS = 20


def uid_for(identity: str) -> str:
    """Stable uid of a sample from its identity string (URL or relative path)."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:UID_HEX_DIGITS]
