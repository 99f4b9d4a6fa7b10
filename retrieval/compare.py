"""A/B comparison of original and corrected search results."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from indexing.collection import SearchHit
from retrieval.corrections import unit
from retrieval.search import Retriever


@dataclass(frozen=True)
class RankChange:
    item_id: int
    rank_original: int | None  # None: not in the original top k
    rank_corrected: int | None  # None: not in the corrected top k

    @property
    def moved(self) -> int | None:
        """Positive when the item moved up with the correction."""
        if self.rank_original is None or self.rank_corrected is None:
            return None
        return self.rank_original - self.rank_corrected


@dataclass(frozen=True)
class ABComparison:
    """Both result lists for one query, and how they differ."""

    query: str
    k: int
    correction: str
    strategy: str
    original: list[SearchHit]
    corrected: list[SearchHit]
    overlap_at_k: float
    rank_changes: list[RankChange]
    concept_strength_original: float | None  # mean share of the hits' embeddings on the concept directions
    concept_strength_corrected: float | None
    attribute: str | None = None  # a metadata field that marks the concept (e.g. skin_tone)
    attribute_share_original: float | None = None  # share of hits where that field is set
    attribute_share_corrected: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rank_changes"] = [dict(asdict(c), moved=c.moved) for c in self.rank_changes]
        return d


@dataclass(frozen=True)
class ABSummary:
    """Averages of a set of comparisons."""

    n_queries: int
    mean_overlap_at_k: float
    mean_concept_strength_original: float | None
    mean_concept_strength_corrected: float | None
    mean_attribute_share_original: float | None
    mean_attribute_share_corrected: float | None
    comparisons: list[ABComparison] = field(repr=False, default_factory=list)


def overlap_at_k(a: list[int], b: list[int], k: int) -> float:
    """|top-k(a) & top-k(b)| / k."""
    return len(set(a[:k]) & set(b[:k])) / float(k)


def rank_changes(a: list[int], b: list[int]) -> list[RankChange]:
    """Every item of either list with its rank (1-based) in each."""
    ra = {item: r for r, item in enumerate(a, start=1)}
    rb = {item: r for r, item in enumerate(b, start=1)}
    order = list(dict.fromkeys(list(a) + list(b)))
    return [RankChange(item, ra.get(item), rb.get(item)) for item in order]


def concept_strength(vectors: np.ndarray, basis: np.ndarray) -> float:
    """Mean over rows of ||U' x||^2 / ||x||^2: how much of each vector lies on the concept."""
    x = unit(vectors)
    return float(np.mean(np.sum((x @ basis) ** 2, axis=1))) if len(x) else float("nan")


def attribute_share(hits: list[SearchHit], field_name: str) -> float | None:
    if not hits:
        return None
    return float(np.mean([bool((h.metadata or {}).get(field_name)) for h in hits]))


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def compare(retriever: Retriever, query_vec: np.ndarray, query_label: str, correction: str, *, k: int = 10,
            kind: str = "image", strategy: str = "auto", attribute: str | None = None,
            negative_weight: float = 1.0, nprobe: int | None = None) -> ABComparison:
    """Search with and without `correction` and measure how the lists differ.

    Both searches go through ``retriever`` with the same ``nprobe`` (default: the retriever's).
    """
    a = retriever.search(query_vec, k, kind=kind, nprobe=nprobe)
    b = retriever.search(query_vec, k, kind=kind, correction=correction, strategy=strategy,
                         negative_weight=negative_weight, nprobe=nprobe)
    ids_a = [h.item_id for h in a.hits]
    ids_b = [h.item_id for h in b.hits]
    k = min(int(k), max(len(ids_a), len(ids_b))) or int(k)  # a k beyond the index size: what it holds
    basis = retriever.correction(correction).concept_basis
    strength_a = strength_b = None
    if basis is not None:
        store = retriever.collection.embeddings
        strength_a = concept_strength(store.get(kind, ids_a), basis) if ids_a else None
        strength_b = concept_strength(store.get(kind, ids_b), basis) if ids_b else None
    return ABComparison(
        query=query_label, k=k, correction=correction, strategy=b.strategy, original=a.hits, corrected=b.hits,
        overlap_at_k=overlap_at_k(ids_a, ids_b, k), rank_changes=rank_changes(ids_a, ids_b),
        concept_strength_original=strength_a, concept_strength_corrected=strength_b, attribute=attribute,
        attribute_share_original=attribute_share(a.hits, attribute) if attribute else None,
        attribute_share_corrected=attribute_share(b.hits, attribute) if attribute else None,
    )


def summarize(comparisons: list[ABComparison]) -> ABSummary:
    if not comparisons:
        raise ValueError("no comparisons to summarise")
    return ABSummary(
        n_queries=len(comparisons),
        mean_overlap_at_k=float(np.mean([c.overlap_at_k for c in comparisons])),
        mean_concept_strength_original=_mean(c.concept_strength_original for c in comparisons),
        mean_concept_strength_corrected=_mean(c.concept_strength_corrected for c in comparisons),
        mean_attribute_share_original=_mean(c.attribute_share_original for c in comparisons),
        mean_attribute_share_corrected=_mean(c.attribute_share_corrected for c in comparisons),
        comparisons=comparisons,
    )
