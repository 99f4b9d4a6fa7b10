"""Search a collection with original or concept-corrected embeddings.

Strategies for a correction:
- "query": apply the correction's projection P to the query and search the original index.
  For an inner-product index, (P q) . x == q . (P x), so this ranks exactly like a
  re-indexed version and works at once, without re-indexing (cosine projections only).
- "reindexed": search the index version built by `sce index reindex` (any correction; the
  only one for a head correction, which changes the image embeddings and not the query).
- "negative": the baseline users know from other vector databases, q - a * concept, on the
  original index; `concept` is the mean prompt direction stored with the correction.

Searching by vector needs no encoder: a :class:`Retriever` made without one loads the
collection's encoder only when a text or image query needs it, so a collection whose encoder
cannot be loaded here (imported embeddings of another tool's model) is still searched by vector.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from indexing.collection import Collection, IndexVersionInfo, SearchHit
from indexing.correction_store import StoredCorrection, load_correction
from retrieval.corrections import unit
from sce_correct import HeadAblation
from sce_correct.errors import InputError, MissingDependencyError, NotFoundError, SceError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "query", "reindexed", "negative")


class EncoderUnavailableError(MissingDependencyError):
    """The collection's encoder cannot be loaded or run here; searches by vector still work."""


def _unavailable(name: str | None, error: BaseException) -> EncoderUnavailableError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return EncoderUnavailableError(
        f"the collection's encoder {name!r} cannot be loaded here ({reason}); text and image queries need it, "
        "a search by vector does not (sce search --vector Q.npy)")


@dataclass
class CorrectionView:
    """A stored correction with what searching needs: its projection and concept direction."""

    stored: StoredCorrection

    @property
    def name(self) -> str:
        return self.stored.info.name

    @property
    def kind(self) -> str:
        return self.stored.info.target_kind

    @property
    def has_projection(self) -> bool:
        return self.stored.corrector.kernel == "cosine"

    @property
    def is_heads(self) -> bool:
        """A head correction (mean-ablated ViT heads): it changes image embeddings only."""
        return isinstance(self.stored.corrector, HeadAblation)

    @cached_property
    def projection(self) -> np.ndarray:
        if not self.has_projection:
            raise InputError(f"correction {self.name!r} uses the {self.stored.corrector.kernel} kernel: it has no projection")
        p = self.stored.info.parameters
        return self.stored.corrector.projection(n_components=p.get("n_components"), mode=p.get("mode", "nullify"))

    @cached_property
    def concept_basis(self) -> np.ndarray | None:
        """U_k: the concept's top directions (what a focus projection keeps), or None; for a head
        correction the span of its prompts' differences."""
        if self.is_heads:
            return self.stored.corrector.concept_basis_
        if not self.has_projection:
            return None
        k = self.stored.info.parameters.get("n_components") or 1
        return self.stored.corrector.explained_eigvecs_[:, :k]

    @property
    def concept_vector(self) -> np.ndarray:
        vector = self.stored.info.parameters.get("concept_vector")
        if vector is None:
            raise InputError(f"correction {self.name!r} has no concept direction for the negative-query baseline "
                             "(it was fitted on pairs without a prompt for the concept alone, e.g. --from-metadata)")
        return np.asarray(vector, dtype=np.float64)


@dataclass(frozen=True)
class SearchResult:
    hits: list[SearchHit]
    kind: str
    correction: str | None
    strategy: str  # "original", "query", "reindexed" or "negative"


class Retriever:
    """The one search entry point: embeds queries with the collection's encoder and searches the
    original index or a corrected one, by any strategy, always with the same ``nprobe``.

    ``nprobe``: how many inverted lists an IVF index visits per query (None: the one tuned
    when the version was built, recorded in its parameters; ignored by other index types). It applies to every index searched, the
    original one and a re-indexed version alike; :meth:`search` can override it per call.
    """

    def __init__(self, collection: Collection, encoder=None, *, nprobe: int | None = None):
        if encoder is not None:
            collection.check_encoder(encoder.name, encoder.dim)
        self.collection = collection
        self._encoder = encoder  # None: the collection's own, loaded when a text/image query needs it
        self.nprobe = check_nprobe(nprobe)
        self._dim = collection.dim  # the embedding space's dimension, checked against each query
        self._encoded = False  # whether a query has been encoded (the weights are loaded)
        self._corrections: dict[str, CorrectionView] = {}

    @property
    def encoder(self):
        """The query encoder (the collection's own, loaded on first use when none was given);
        :class:`EncoderUnavailableError` when it cannot be loaded here."""
        if self._encoder is None:
            name = self.collection.encoder_name
            if name is None:
                raise InputError(f"collection {self.collection.root} has no encoder yet; build it first")
            try:
                encoder = self.collection.load_encoder()
                dim = encoder.dim  # an open_clip hub model is built to learn it
            except EncoderUnavailableError:
                raise
            except (SceError, OSError, ImportError, RuntimeError) as error:
                raise _unavailable(name, error) from error
            self.collection.check_encoder(encoder.name, dim)
            self._encoder = encoder
        return self._encoder

    @property
    def encoder_name(self) -> str | None:
        """The encoder the searched versions must have been built with (no loading)."""
        return self._encoder.name if self._encoder is not None else self.collection.encoder_name

    # -- queries ----------------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise InputError("the text query is empty")
        return unit(self._encode(lambda encoder: encoder.encode_texts([text.strip()])[0]))

    def embed_image(self, image: str | Path) -> np.ndarray:
        from indexing.encoders.encoder import open_image

        decoded = open_image(image)  # the user's file checked first: its error is its own, not the encoder's
        return unit(self._encode(lambda encoder: encoder.encode_images([decoded])[0]))

    def _encode(self, run) -> np.ndarray:
        """``run(encoder)``. Encoders load their weights on first use: until one query has been
        encoded, a failure (weights that cannot be downloaded offline, a missing package) is an
        :class:`EncoderUnavailableError` saying why; a user's mistake (an unreadable image)
        stays itself, and later failures are what they are."""
        encoder = self.encoder
        try:
            vector = run(encoder)
        except SceError:
            raise
        except (OSError, ImportError, RuntimeError) as error:
            if self._encoded:
                raise
            raise _unavailable(encoder.name, error) from error
        self._encoded = True
        return vector

    def correction(self, name: str) -> CorrectionView:
        if name not in self._corrections:
            self._corrections[name] = CorrectionView(load_correction(self.collection, name))
        return self._corrections[name]

    # -- search -----------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int = 10, *, kind: str = "image", correction: str | None = None,
               strategy: str = "auto", negative_weight: float = 1.0, nprobe: int | None = None) -> SearchResult:
        """Top-k hits for a query vector (from `embed_text` or `embed_image`).

        ``k`` larger than the index holds returns every item; ``nprobe`` (default: the
        retriever's) reaches whichever index the strategy searches.
        """
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        k = check_k(k)
        nprobe = self.nprobe if nprobe is None else check_nprobe(nprobe)
        q = np.asarray(query, dtype=np.float64).reshape(1, -1)
        if not np.isfinite(q).all():
            raise InputError("the query vector contains NaN or infinite values")
        dim = self._dim
        if dim is not None and q.shape[1] != dim:
            raise InputError(f"the query vector has dimension {q.shape[1]}; the collection's embeddings "
                             f"have dimension {dim}")
        if correction is None:
            return SearchResult(self._search(q, k, self._version(kind, None), nprobe), kind, None, "original")
        view = self.correction(correction)
        if view.kind != kind:
            raise InputError(
                f"correction {correction!r} ({view.stored.info.direction}) applies to the {view.kind} index, "
                f"not the {kind} index"
            )
        version = (self.collection.current_version(kind, correction)
                   if strategy in ("auto", "reindexed") else None)
        if strategy == "auto":
            strategy = "reindexed" if version is not None else "query"
        if strategy == "negative":
            weight = float(negative_weight)
            if not np.isfinite(weight):
                raise InputError(f"the negative-query weight must be a finite number, got {negative_weight}")
            moved = unit(q) - weight * view.concept_vector
            return SearchResult(self._search(moved, k, self._version(kind, None), nprobe), kind, correction,
                                "negative")
        if strategy == "query":
            if view.is_heads:
                raise InputError(
                    f"correction {correction!r} mean-ablates heads of the image tower: it changes the image "
                    f"embeddings, not the query, so it has no query-side form; re-index first: "
                    f"sce index reindex --correction {correction}"
                )
            if not view.has_projection:
                raise InputError(
                    f"correction {correction!r} has no query-side form (kernel {view.stored.corrector.kernel}); "
                    f"re-index first: sce index reindex --correction {correction}"
                )
            return SearchResult(self._search(q @ view.projection.T, k, self._version(kind, None), nprobe),
                                kind, correction, "query")
        if version is None:
            raise NotFoundError(f"correction {correction!r} has no re-indexed version yet: run "
                                f"`sce index reindex --correction {correction}` or use the query strategy")
        if not view.has_projection and not view.is_heads:  # a Gaussian kernel's index is in feature space
            q = view.stored.corrector.feature_map_.transform(unit(q))  # fitted on unit-norm embeddings
        return SearchResult(self._search(q, k, version, nprobe), kind, correction, "reindexed")

    def _version(self, kind: str, correction: str | None) -> IndexVersionInfo:
        version = self.collection.current_version(kind, correction)
        if version is None:
            raise NotFoundError(f"collection {self.collection.root} has no ready {kind} index; "
                                "build it with `sce index build`")
        return version

    def _search(self, q: np.ndarray, k: int, version: IndexVersionInfo, nprobe: int | None) -> list[SearchHit]:
        """The one call that searches a faiss index: every strategy ends here."""
        k = min(k, max(int(version.count), 1))  # more than the index holds cannot be found
        if nprobe is None:  # an IVF version's nprobe tuned when it was built (recall@10 >= 0.95)
            nprobe = version.parameters.get("nprobe")
        return self.collection.search(q, k, version=version, encoder=self.encoder_name, nprobe=nprobe)[0]


def check_k(k) -> int:
    """``k`` as an int >= 1 (a huge k is capped at the index size by the search)."""
    try:
        value = int(k)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float('inf')
        raise InputError(f"k must be a whole number >= 1, got {k!r}") from None
    if value < 1 or value != k:
        raise InputError(f"k must be a whole number >= 1, got {k!r}")
    return value


def check_nprobe(nprobe) -> int | None:
    """None, or ``nprobe`` as an int >= 1."""
    if nprobe is None:
        return None
    try:
        value = int(nprobe)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"nprobe must be a whole number >= 1, got {nprobe!r}") from None
    if value < 1 or value != nprobe:
        raise InputError(f"nprobe must be a whole number >= 1, got {nprobe!r}")
    return value
