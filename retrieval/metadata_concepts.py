"""Concept corrections fitted on the collection itself: `sce correct fit --from-metadata FIELD`.

A concept file pairs standalone prompts ("dark skin tone") with images. A collection whose
items carry the concept in a metadata field (``skin_tone``) and name it in their captions
("waving hand sign, dark skin tone") has better pairs already: each item's caption with its
image, the concept *in context*. Fitted as they are, those pairs would explain the object
too; so the fit is centred within groups of items that differ only in the concept value
(:meth:`sce_correct.SchurCorrector.fit` with ``groups``), and what it removes is what varies
with the value inside each group.

A group is the item's ``--group-by`` field when given, else its caption with its own value
taken out ("waving hand sign, skin tone" for every tone of the waving hand). Nothing is
encoded: both sides are the stored embeddings (t2i: captions explain images and the image
index is corrected; i2t: images explain captions and the caption index is corrected).

Measured on the sample corpus (``benchmarks/eval_concept_removal.py``, held-out objects, groups
by the ``object`` field, single-tone items): t2i probe 0.359 (the concept-file fit) -> 0.309 at
k = 8 with object R@10 kept; on the caption index, i2t probe 0.862 -> 0.284 with the dark
share of "<object>, dark skin tone" within 0.002 of a tone-blind ranking's.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from indexing.collection import Collection
from indexing.correction_store import check_correction_name, save_correction
from retrieval.corrections import MODES, FitResult
from sce_correct import SchurCorrector, sce_score
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)

#: Concept directions removed by default. The energy rule of concept-file fits does not suit
#: these fits: their R has a long tail (0.99 of tr R takes 37 directions on the sample corpus,
#: which costs object retrieval), and 8 kept object R@10 while lowering the held-out probe most.
DEFAULT_COMPONENTS = 8
DIRECTIONS = ("t2i", "i2t")


@dataclass(frozen=True)
class MetadataPairs:
    """The items a metadata field pairs: their ids, concept values and groups (same order)."""

    field: str
    group_by: str | None
    ids: np.ndarray
    values: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def caption_without(caption: str, value: str) -> str:
    """The caption with the value's last occurrence taken out as a phrase, spacing and stray
    commas tidied. The last one: in "Dark horse, dark skin tone" the tone is the second
    "dark", so the item groups with "Dark horse, light skin tone"."""
    pattern = r"(?<![\w-])" + re.escape(value) + r"(?![\w-])"
    found = list(re.finditer(pattern, caption, flags=re.IGNORECASE))
    text = caption if not found else caption[:found[-1].start()] + " " + caption[found[-1].end():]
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    return re.sub(r"\s+", " ", text).strip(" ,").lower()


def metadata_pairs(collection: Collection, field: str, group_by: str | None = None) -> MetadataPairs:
    """Items with ``field`` set and both a stored image and caption embedding, with their groups."""
    field = (field or "").strip()
    if not field:
        raise InputError("--from-metadata needs a metadata field name, e.g. --from-metadata skin_tone")
    store = collection.embeddings
    both = np.intersect1d(store.ids("image"), store.ids("caption"))
    if not len(both):
        raise InputError(f"collection {collection.root} has no items with both an image and a caption embedding")
    records = collection.items(both)
    ids, values, groups = [], [], []
    for item_id in both.tolist():
        record = records.get(int(item_id))
        metadata = (record.metadata or {}) if record is not None else {}
        value = metadata.get(field)
        if value is None or not str(value).strip() or not record.caption:
            continue
        value = str(value).strip()
        if group_by is not None:
            group = metadata.get(group_by)
            if group is None or not str(group).strip():
                continue
            group = str(group).strip()
        else:
            group = caption_without(record.caption, value)
        ids.append(int(item_id))
        values.append(value)
        groups.append(group)
    if not ids:
        raise InputError(f"no captioned item of {collection.root} sets the metadata field {field!r}"
                         + (f" (and {group_by!r})" if group_by else ""))
    if len(set(values)) < 2:
        raise InputError(f"every item sets {field!r} to {values[0]!r}: the concept needs at least two values")
    counts: dict[str, set[str]] = {}
    for value, group in zip(values, groups):
        counts.setdefault(group, set()).add(value)
    if not any(len(v) > 1 for v in counts.values()):
        how = f"field {group_by!r}" if group_by else "caption without the value"
        raise InputError(f"no group (items with the same {how}) holds two values of {field!r}: "
                         "nothing varies with the concept inside a group; try --group-by FIELD")
    return MetadataPairs(field=field, group_by=group_by, ids=np.asarray(ids, dtype=np.int64),
                         values=values, groups=groups)


def fit_metadata_correction(collection: Collection, *, name: str, field: str, group_by: str | None = None,
                            direction: str = "t2i", mode: str = "nullify", n_components: int | None = None,
                            ridge: float = 1e-4, replace: bool = False) -> FitResult:
    """Fit a cosine correction on the collection's own (caption, image) pairs, centred within
    groups, and store it; ``n_components`` defaults to :data:`DEFAULT_COMPONENTS`."""
    check_correction_name(name)
    if direction not in DIRECTIONS:
        raise InputError(f"--from-metadata fits t2i (captions explain images) or i2t (images explain captions), "
                         f"not {direction!r}")
    if mode not in MODES:
        raise InputError(f"mode must be 'nullify' or 'focus', got {mode!r}")
    pairs = metadata_pairs(collection, field, group_by)
    captions = collection.embeddings.get("caption", pairs.ids)
    images = collection.embeddings.get("image", pairs.ids)
    source, target = (captions, images) if direction == "t2i" else (images, captions)
    corrector = SchurCorrector(direction=direction, ridge=ridge, center=True).fit(source, target,
                                                                                 groups=np.asarray(pairs.groups))
    if n_components is None:  # the default, or fewer when the pairs give fewer directions
        k = min(DEFAULT_COMPONENTS, max(1, int((corrector.explained_eigvals_ > 0).sum())))
    else:
        k = int(n_components)
    corrector.projection(n_components=k, mode=mode)  # checks k now
    lam = corrector.explained_eigvals_
    share = float(lam[:k].sum() / lam.sum()) if lam.sum() > 0 else 0.0
    report = sce_score(source, target, ridge=ridge)
    n_groups = len(set(pairs.groups))
    parameters = {
        "mode": mode, "n_components": k, "energy": None, "explained_share": share, "strength": 1.0,
        "ridge": ridge, "center": True, "from_metadata": field, "group_by": group_by or "caption without the value",
        "groups": n_groups, "values": sorted(set(pairs.values)), "n_pairs": len(pairs),
        "distinct_prompts": len(set(pairs.values)),
        # no "concept_vector": the pairs give no prompt for the concept alone, so the
        # negative-query baseline (q - a * concept) is refused for these corrections
    }
    info = save_correction(collection, name, corrector, encoder=collection.encoder_name, dim=collection.dim,
                           parameters=parameters, fitted_on=f"metadata:{field}", report=report.to_dict(),
                           replace=replace)
    logger.info("%s: %d items in %d groups, %d values of %s; k=%d holds %.1f%% of tr R", name, len(pairs), n_groups,
                len(set(pairs.values)), field, k, 100 * share)
    return FitResult(info=info, report=report, n_components=k, explained_share=share)
