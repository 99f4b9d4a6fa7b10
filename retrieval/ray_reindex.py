"""``sce index reindex --engine ray``: the correction re-index with the vectors computed on Ray Data.

The job is :func:`retrieval.reindex.reindex` with another runner: the same plan
(:func:`~retrieval.reindex.plan_reindex`), the same index-version writer (created, trained,
checkpointed and published by ``reindex``), the same corrected-vector function
(:func:`~retrieval.reindex.corrected_vectors`). Only the middle runs on the cluster: the ids
still to do (all stored vectors of the kind, less those a killed job already staged) are cut
into blocks of ``chunk_size``; each actor of a fixed pool opens the collection once (read only)
and, per block, reads the stored vectors (``EmbeddingStore.get``, memory-mapped ``.npy``
shards: the files must be visible to every node) and corrects them. The driver consumes the
corrected blocks in order and stages them through the writer, whose checkpoints make a killed
driver resume where it was.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from indexing.collection import Collection, IndexVersionInfo, IndexVersionWriter
from indexing.ray_engine import (
    actor_pool,
    import_ray,
    quiet_ordered_execution,
    raise_sce_error,
    ray_cluster,
    returning_sce_errors,
)
from retrieval.reindex import ReindexPlan, Runner, corrected_vectors, reindex

logger = logging.getLogger(__name__)

_MAX_BLOCKS = 4096


class CorrectBlocks:
    """``map_batches`` callable: rows (start, stop) name blocks of ``ids``; returns their
    corrected vectors (columns id, vector), block after block in row order."""

    def __init__(self, root: str, db: str, plan: ReindexPlan, ids: np.ndarray) -> None:
        self.collection = Collection.open(root, db)
        self.plan = plan
        self.ids = ids

    @returning_sce_errors
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        block_ids, vectors = [], []
        for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist()):
            ids = self.ids[start:stop]
            raw = self.collection.embeddings.get(self.plan.kind, ids)
            block_ids.append(ids)
            vectors.append(corrected_vectors(self.collection, self.plan, ids, raw))
        return {"id": np.concatenate(block_ids), "vector": np.concatenate(vectors).astype(np.float32, copy=False)}

    def __del__(self) -> None:
        collection = getattr(self, "collection", None)
        if collection is not None:
            collection.close()


def ray_runner(address: str | None = None, *, num_cpus: int | None = None, actors: int | None = None) -> Runner:
    """A :data:`retrieval.reindex.Runner` computing the corrected vectors on Ray Data."""

    def run(collection: Collection, plan: ReindexPlan, chunk_size: int, writer: IndexVersionWriter, bar: Any) -> int:
        ids = collection.embeddings.ids(plan.kind)
        done = writer.done_ids
        if len(done):
            ids = ids[~np.isin(ids, done)]
        if not len(ids):
            return 0
        starts = list(range(0, len(ids), chunk_size))
        blocks = [{"start": start, "stop": min(start + chunk_size, len(ids))} for start in starts]
        db = collection.catalog.engine.url.render_as_string(hide_password=False)
        with ray_cluster(address, num_cpus=num_cpus) as ray, quiet_ordered_execution(ray):
            count = min(len(blocks), _MAX_BLOCKS)
            dataset = ray.data.from_items(blocks, override_num_blocks=count)
            dataset = dataset.map_batches(
                CorrectBlocks, fn_constructor_kwargs={"root": str(collection.root), "db": db, "plan": plan, "ids": ids},
                batch_size=1, batch_format="numpy", compute=actor_pool(ray, actors, count),
            )
            computed = 0
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                raise_sce_error(batch)
                writer.add(batch["id"], batch["vector"], check_new=False, normalize=plan.normalize_output)
                computed += len(batch["id"])
                bar.update(len(batch["id"]))
        return computed

    return run


def reindex_on_ray(collection: Collection, correction: str, *, address: str | None = None,
                   num_cpus: int | None = None, actors: int | None = None, **options: Any) -> IndexVersionInfo:
    """:func:`retrieval.reindex.reindex` (same ``options``) with the vectors computed on Ray:
    on the cluster at ``address``, or on a local one started with ``num_cpus``."""
    import_ray()  # before any work: a missing Ray is one line
    return reindex(collection, correction, runner=ray_runner(address, num_cpus=num_cpus, actors=actors), **options)
