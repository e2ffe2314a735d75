"""Nearest-neighbour search with FAISS, sized to the data.

``build_index`` keeps a flat (exact) index up to ``exact_max`` vectors and builds an approximate
one above it, the usual FAISS recipe (`faiss wiki: Guidelines to choose an index`): about 2·√n
inverted lists trained on a sample, codes compressed by product quantisation and re-ranked with
exact distances, and the fewest probed lists that reach a target recall@k against exact search on
a sample of queries. The measured recall is kept with the index so the stage that uses it can
record it. faiss-gpu is used when it imports and sees a GPU.
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
    """A FAISS index over ``n`` vectors, and what it is: flat (exact), ivf (IVF-Flat) or ivf_pq
    (IVF-PQ fast-scan re-ranked exactly), with its settings and measured recall."""

    index: faiss.Index
    kind: str  # flat | ivf | ivf_pq
    metric: str
    n: int
    nlist: int | None = None
    nprobe: int | None = None
    recall: float | None = None  # recall@k of the approximate index against exact search, on a sample
    recall_k: int | None = None
    recall_queries: int | None = None
    build_seconds: float = 0.0
    k_factor: int | None = None  # ivf_pq: candidates re-ranked with exact distances, per neighbour asked for

    def search(self, queries: np.ndarray, k: int, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the ``k`` nearest of each query; squared L2 or inner product."""
        return search(self.index, queries, k, batch)

    def info(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "vectors": self.n, "nlist": self.nlist, "nprobe": self.nprobe,
                "k_factor": self.k_factor, "recall_at_k": None if self.recall is None else round(self.recall, 4),
                "k": self.recall_k, "recall_queries": self.recall_queries, "backend": backend(),
                "build_s": round(self.build_seconds, 2)}


def describe(info: dict | None) -> str:
    """One line for an index's ``info()``: what it is, over how much, and its measured recall."""
    if not info or info.get("kind") not in KINDS:
        return (info or {}).get("reason", "none")
    if info["kind"] == "flat":
        return f"exact ({info['backend']}) over {info['vectors']:,} vectors"
    refine = f", {info['k_factor']}×k re-ranked exactly" if info["kind"] == "ivf_pq" else ""
    return (f"{KINDS[info['kind']]} nlist {info['nlist']} nprobe {info['nprobe']}{refine} over {info['vectors']:,} "
            f"vectors, recall@{info['k']} {info['recall_at_k']} vs exact search")


KINDS = {"flat": "exact", "ivf": "IVF-Flat", "ivf_pq": "IVF-PQ fast-scan"}


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
    """An exact index up to ``exact_max`` vectors; above it the fastest of these that reaches
    ``target_recall`` (recall@k against exact search, measured on a sample of the database):

    1. IVF-PQ fast-scan (4-bit codes, 4 dimensions per sub-quantizer) whose candidates are re-ranked
       with exact distances (IndexRefineFlat): FAISS's fastest CPU index, and the distances it returns
       are exact. CPU only (fast-scan has no GPU kernel).
    2. IVF-Flat, where quantisation loses neighbours the re-ranking cannot recover (data of high
       intrinsic dimension).
    3. Exact search, where either would have to visit more than ``MAX_PROBED_SHARE`` of the lists: BLAS
       brute force is as fast by then (measured: IVF-Flat probing 1/10 of its lists was slower).

    Each approximate kind probes the fewest lists (powers of two, or exactly ``nprobe`` when it is not
    0) that reach the target."""
    t0 = time.time()
    database = as_float32(database)
    n, dim = database.shape
    if n <= exact_max:
        return KnnIndex(flat_index(database, metric), "flat", metric, n, build_seconds=time.time() - t0)

    rng = np.random.default_rng(seed)
    # 2·√n lists (FAISS suggests 4–16·√n for IVF-Flat): fast-scan makes a longer list cheap to scan, and
    # fewer lists train faster and keep more true neighbours per probed list (measured at 1M: nprobe 32 of
    # 632 reached recall 0.956, 64 of 1,264 were needed for 0.970, in twice the build time)
    nlist = int(min(2 * math.sqrt(n), n // 39))  # FAISS wants ≥ 39 training points per list
    train = database[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
    queries = database[rng.choice(n, min(n, recall_queries), replace=False)]
    exact_index = flat_index(database, metric)  # the recall's reference, and the index if none is faster
    _, exact = search(exact_index, queries, k)
    most = max(1, int(nlist * MAX_PROBED_SHARE))
    probes = [nprobe] if nprobe else [2 ** i for i in range(int(math.log2(most)) + 1)]
    kinds = ["ivf_pq", "ivf"] if dim % 8 == 0 and not _gpus() else ["ivf"]
    for kind in kinds:
        index = _to_gpu(_ivf(kind, database, train, nlist, metric, seed))
        for probe in probes:
            faiss.extract_index_ivf(index).nprobe = probe
            recall = recall_at_k(search(index, queries, k)[1], exact)
            if recall >= target_recall:
                k_factor = REFINE_K_FACTOR if kind == "ivf_pq" else None
                return KnnIndex(index, kind, metric, n, nlist, probe, recall, k, len(queries), time.time() - t0,
                                k_factor)
        log.info("%s over %d vectors reaches recall@%d %.3f at nprobe %d of %d lists, below the target %.3f",
                 KINDS[kind], n, k, recall, probe, nlist, target_recall)
    if nprobe:  # a fixed nprobe is the user's choice: keep the IVF index and say what it reaches
        log.warning("IVF index over %d vectors reaches recall@%d %.3f at nprobe %d, below the target %.3f", n, k,
                    recall, nprobe, target_recall)
        return KnnIndex(index, "ivf", metric, n, nlist, nprobe, recall, k, len(queries), time.time() - t0)
    log.info("exact search over %d vectors: no approximate index reaches recall@%d %.3f probing ≤ %d of %d lists",
             n, k, target_recall, most, nlist)
    return KnnIndex(exact_index, "flat", metric, n, build_seconds=time.time() - t0)


MAX_PROBED_SHARE = 1 / 16
REFINE_K_FACTOR = 8


def _ivf(kind: str, database: np.ndarray, train: np.ndarray, nlist: int, metric: str, seed: int) -> faiss.Index:
    dim = database.shape[1]
    recipe = f"IVF{nlist},PQ{dim // 4}x4fs,RFlat" if kind == "ivf_pq" else f"IVF{nlist},Flat"
    index = faiss.index_factory(dim, recipe, METRICS[metric])
    faiss.extract_index_ivf(index).cp.seed = seed
    if kind == "ivf_pq":
        index.k_factor = REFINE_K_FACTOR
    index.train(train)
    index.add(database)
    return index


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """``k`` centroids of ``x`` (faiss k-means; fewer points than k gives the points themselves)."""
    x = as_float32(x)
    if len(x) <= k:
        return x.copy()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(_gpus()), verbose=False)
    km.train(x)
    return km.centroids


# ---------------------------------------------------------------- beyond one machine

def serve_part(part: np.ndarray, port: int, metric: str = "l2", **build) -> None:
    """Serve one machine's part of a database too large for one machine, indexed as ``build_index``
    indexes it (recall measured), with FAISS's index server (faiss.contrib.client_server); blocks for
    good. The server unpickles only numpy and builtins but listens on every interface: a trusted
    network only."""
    from faiss.contrib.client_server import run_index_server

    _unpickle_numpy2_arrays()
    built = build_index(part, metric, **build)
    index = built.index
    if built.kind == "flat":  # FAISS's server speaks IVF: an exact part is one inverted list, all probed
        part = as_float32(part)
        index = _ivf("ivf", part, part[:256], 1, metric, seed=0)
    log.info("serving %s on port %d", describe(built.info()), port)
    run_index_server(index, port)


class ShardedIndex:
    """A database split into row ranges, each served by ``serve_part`` on its machine: a search asks
    every part at once and merges their k nearest (FAISS's ResultHeap) into the whole database's k
    nearest, ids counted in the whole database's rows. ``parts``: (host, port, first row) of each."""

    def __init__(self, parts: list[tuple[str, int, int]], metric: str = "l2"):
        from faiss.contrib.client_server import ClientIndex

        _unpickle_numpy2_arrays()
        self.client = ClientIndex([(host, port) for host, port, _ in parts])
        self.first_rows = [first for _, _, first in parts]
        self.keep_max = metric == "ip"  # inner product: the largest are the nearest

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_float32(queries)
        heap = faiss.ResultHeap(len(queries), k, keep_max=self.keep_max)
        found = self.client.pool.map(lambda part: part.search(queries, k), self.client.sub_indexes)
        for (distances, ids), first in zip(found, self.first_rows):
            heap.add_result(np.ascontiguousarray(distances, np.float32), np.where(ids >= 0, ids + first, -1))
        heap.finalize()
        return heap.D, heap.I


def _unpickle_numpy2_arrays() -> None:
    """FAISS's RPC unpickles arrays only from ``numpy.core.multiarray``, where numpy < 2 kept them: under
    numpy 2 every search fails with "global 'numpy._core.multiarray._reconstruct' is forbidden"
    (facebookresearch/faiss#4379, closed unfixed). Allow the module under its numpy 2 name: the same one
    FAISS meant to allow, nothing more."""
    from faiss.contrib import rpc

    rpc.safe_modules.add("numpy._core.multiarray")
