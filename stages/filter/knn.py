"""Nearest-neighbour search with FAISS, sized to the data.

``build_index`` keeps a flat (exact) index up to ``exact_max`` vectors and builds an IVF index
above it, the usual FAISS recipe (`faiss wiki: Guidelines to choose an index`): about 4·√n
inverted lists trained on a sample, and the fewest probed lists that reach a target recall@k
against exact search on a sample of queries. The measured recall is kept with the index so the
stage that uses it can record it. faiss-gpu is used when it imports and sees a GPU.
"""

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from stages.common.faiss_import import faiss

log = logging.getLogger("webdistill.knn")

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


def backend() -> str:
    return "faiss-gpu" if _gpus() else "faiss-cpu"


def _gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


_GPU_RESOURCES = None


def _to_gpu(index: faiss.Index) -> faiss.Index:
    global _GPU_RESOURCES
    if not _gpus():
        return index
    _GPU_RESOURCES = _GPU_RESOURCES or faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


@dataclass
class KnnIndex:
    """A FAISS index over ``n`` vectors, and what it is: flat (exact) or IVF with its settings."""

    index: faiss.Index
    kind: str  # flat | ivf
    metric: str
    n: int
    nlist: int | None = None
    nprobe: int | None = None
    recall: float | None = None  # recall@k of the IVF index against exact search, on a sample
    recall_k: int | None = None
    recall_queries: int | None = None
    build_seconds: float = 0.0

    def search(self, queries: np.ndarray, k: int, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the ``k`` nearest of each query; squared L2 or inner product."""
        return search(self.index, queries, k, batch)

    def info(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "vectors": self.n, "nlist": self.nlist, "nprobe": self.nprobe,
                "recall_at_k": None if self.recall is None else round(self.recall, 4), "k": self.recall_k,
                "recall_queries": self.recall_queries, "backend": backend(), "build_s": round(self.build_seconds, 2)}


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def search(index: faiss.Index, queries: np.ndarray, k: int, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    distances, ids = [], []
    for start in range(0, len(queries), batch):
        d, i = index.search(as_float32(queries[start:start + batch]), k)
        distances.append(d)
        ids.append(i)
    return np.concatenate(distances), np.concatenate(ids)


def flat_index(database: np.ndarray, metric: str = "l2") -> faiss.Index:
    index = faiss.IndexFlat(database.shape[1], METRICS[metric])
    index.add(as_float32(database))
    return _to_gpu(index)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact k nearest neighbours that the approximate search also returned."""
    k = exact.shape[1]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))


def build_index(database: np.ndarray, metric: str = "l2", exact_max: int = 50000, k: int = 10,
                target_recall: float = 0.95, nprobe: int = 0, recall_queries: int = 1000, seed: int = 0) -> KnnIndex:
    """An exact index up to ``exact_max`` vectors, else IVF with its recall@k measured (and, when
    ``nprobe`` is 0, the smallest power-of-two ``nprobe`` that reaches ``target_recall``)."""
    t0 = time.time()
    database = as_float32(database)
    n, dim = database.shape
    if n <= exact_max:
        return KnnIndex(flat_index(database, metric), "flat", metric, n, build_seconds=time.time() - t0)

    rng = np.random.default_rng(seed)
    nlist = int(min(4 * math.sqrt(n), n // 39))  # FAISS wants ≥ 39 training points per list
    train = database[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
    quantizer = faiss.IndexFlat(dim, METRICS[metric])
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, METRICS[metric])
    index.cp.seed = seed
    index.train(train)
    index.add(database)
    index = _to_gpu(index)

    queries = database[rng.choice(n, min(n, recall_queries), replace=False)]
    _, exact = search(flat_index(database, metric), queries, k)
    candidates = [nprobe] if nprobe else [2 ** i for i in range(int(math.log2(nlist)) + 1)] + [nlist]
    for probe in candidates:
        faiss.extract_index_ivf(index).nprobe = probe
        recall = recall_at_k(search(index, queries, k)[1], exact)
        if recall >= target_recall:
            break
    if recall < target_recall:
        log.warning("IVF index over %d vectors reaches recall@%d %.3f, below the target %.3f", n, k, recall,
                    target_recall)
    return KnnIndex(index, "ivf", metric, n, nlist, probe, recall, k, len(queries), time.time() - t0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """``k`` centroids of ``x`` (faiss k-means; fewer points than k gives the points themselves)."""
    x = as_float32(x)
    if len(x) <= k:
        return x.copy()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(_gpus()), verbose=False)
    km.train(x)
    return km.centroids
