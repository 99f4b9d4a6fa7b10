"""`sce demo`: build the sample collection and corrections when missing, then show what they do.

The sample corpus and the concept sets come with the package (:mod:`indexing.shipped_data`),
so the demo works from an installed wheel in any folder.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ui.cli_index import configure_logging, reporting_errors

logger = logging.getLogger(__name__)

DEMO_DIR = Path("demo-collection")
DEMO_K = 8

#: (correction name, concept file, direction) fitted for the demo.
DEMO_CORRECTIONS = (
    ("no-skin-tone", "skin_tone_large.csv", "nullify"),  # all in the sample corpus: stored embeddings reused
    ("no-gender", "gender.csv", "nullify"),
    ("no-colour", "colour.csv", "nullify"),
)

#: (correction name, metadata field) fitted from the collection's own captions and images
#: (`sce correct fit --from-metadata`): the concept in context, centred within each object.
DEMO_METADATA_CORRECTIONS = (
    ("no-skin-tone-in-context", "skin_tone"),
)


@dataclass(frozen=True)
class DemoQuery:
    """An A/B example: a query that names one value of a concept, and the correction removing it.

    The original top k is dominated by that value; with the concept removed the results spread
    over the other values, so the share of the dominant value drops. `field` is the catalog's
    metadata column holding the value; None reads the colour word in the caption (the sample
    corpus has no colour column; the words are the prompts of concepts/colour.csv).
    """

    query: str
    correction: str
    concept: str
    field: str | None


#: Chosen on the sample collection (`sce demo`): dark 88% -> 25%, woman 88% -> 12%, green 50% -> 12%;
#: "ok hand, dark skin tone": dark 100% -> 25% in context (the concept-file correction: 100% -> 62%).
DEMO_QUERIES = (
    DemoQuery("thumbs up, dark skin tone", "no-skin-tone", "skin tone", "skin_tone"),
    DemoQuery("woman dancing", "no-gender", "gender", "gender"),
    DemoQuery("green book", "no-colour", "colour", None),
    DemoQuery("ok hand, dark skin tone", "no-skin-tone-in-context", "skin tone", "skin_tone"),
)
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white")


def concept_value(hit: Any, field: str | None) -> str | None:
    """The concept's value in a search hit: its metadata `field`, or the colour its caption names."""
    if field is not None:
        return (hit.metadata or {}).get(field) or None
    words = re.findall(r"[a-z]+", (hit.caption or "").lower())
    return next((word for word in words if word in COLOURS), None)


def dominant_shares(original: Sequence[Any], corrected: Sequence[Any],
                    value: Callable[[Any], str | None]) -> tuple[str | None, float, float]:
    """The most common value among the original hits and its share of each list (0..1)."""
    counts = Counter(v for v in map(value, original) if v)
    if not counts:
        return None, 0.0, 0.0
    top = counts.most_common(1)[0][0]

    def share(hits: Sequence[Any]) -> float:
        return sum(value(h) == top for h in hits) / len(hits) if hits else 0.0

    return top, share(original), share(corrected)


def ensure_demo_collection(root: Path, data_dir: Path | None = None, *, progress: bool = True):
    """Build the sample collection and fit the demo corrections, each only when missing or stale.

    `data_dir` holds ``sample/captions.csv`` and ``concepts/``; by default the shipped data.
    """
    from indexing.collection import Collection
    from indexing.correction_store import list_corrections
    from indexing.pipeline import build_collection
    from indexing.shipped_data import shipped_data
    from retrieval.concepts import load_concept_set
    from retrieval.corrections import fit_concept_correction
    from retrieval.metadata_concepts import fit_metadata_correction
    from sce_correct.errors import NotFoundError

    data_dir = shipped_data() if data_dir is None else Path(data_dir)
    captions = data_dir / "sample" / "captions.csv"
    if not captions.is_file():
        raise NotFoundError(f"the sample corpus is missing ({captions}); rebuild it with data/build_sample_corpus.py")
    built = False
    if (root / "catalog.sqlite").exists():
        with Collection.open(root) as coll:
            built = coll.current_version("image") is not None
    if not built:
        typer.echo(f"building the sample collection in {root} (first run only) ...")
        build_collection(captions, root, encoder="default", progress=progress)
    with Collection.open(root) as coll:
        have = {c.name: c for c in list_corrections(coll)}
        # Missing, or fitted by an older demo (another concept file, or uncentred): fit again.
        todo = [c for c in DEMO_CORRECTIONS if c[0] not in have
                or Path(have[c[0]].fitted_on or "").name != c[1] or not have[c[0]].parameters.get("center")]
        if todo:
            encoder = coll.load_encoder()
            for name, concept_file, mode in todo:
                typer.echo(f"fitting correction {name} from concepts/{concept_file} ...")
                fit_concept_correction(coll, encoder, load_concept_set(data_dir / "concepts" / concept_file),
                                       name=name, mode=mode, replace=name in have)
        for name, field in DEMO_METADATA_CORRECTIONS:  # from stored embeddings: nothing is encoded
            if name not in have or have[name].parameters.get("from_metadata") != field:
                typer.echo(f"fitting correction {name} from the collection's {field} metadata ...")
                fit_metadata_correction(coll, name=name, field=field, replace=name in have)
    return root


def show_ab_examples(coll, encoder, queries: Sequence[DemoQuery] = DEMO_QUERIES, *, k: int = DEMO_K) -> None:
    """Print each example's dominant value share before and after its correction, and both lists."""
    from retrieval.compare import compare
    from retrieval.search import Retriever

    retriever = Retriever(coll, encoder)
    for example in queries:
        cmp = compare(retriever, retriever.embed_text(example.query), example.query, example.correction, k=k)
        top, before, after = dominant_shares(cmp.original, cmp.corrected,
                                             lambda hit: concept_value(hit, example.field))
        shares = (f"{top} {before:.0%} -> {after:.0%} of the top {k}" if top
                  else f"no {example.concept} in the top {k}")
        typer.echo(f"\n'{example.query}' with {example.correction}: {example.concept} {shares} "
                   f"(overlap@{k} {cmp.overlap_at_k:.2f})")
        for a, b in zip(cmp.original, cmp.corrected):
            typer.echo(f"  {(a.caption or '')[:44]:<44} | {(b.caption or '')[:44]}")


def demo_command(
    collection: Annotated[Path, typer.Option("--collection", "-c", help="Where the demo collection lives.")] = DEMO_DIR,
    report_dir: Annotated[Path, typer.Option(help="Where the SCE report files go.")] = Path("demo-report"),
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Open the web UI afterwards.")] = True,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the web UI.")] = 7860,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Build the sample collection and corrections (when missing), print what they show, open the UI."""
    configure_logging(quiet)
    with reporting_errors():
        from indexing.collection import Collection
        from retrieval.report import report_for_collection, write_report
        from ui.cli_retrieval import _print_score

        ensure_demo_collection(collection, progress=not quiet)
        with Collection.open(collection) as coll:
            encoder = coll.load_encoder()
            report = report_for_collection(coll, encoder, where={"category": "people & body"})
            paths = write_report(report, report_dir)
            typer.echo(f"\nSCE report of the sample corpus ({report.source}):")
            _print_score(report.score)
            typer.echo(f"  wrote {paths['json']}, {paths['spectra']}, {paths['modes']}")
            show_ab_examples(coll, encoder)
    if serve:
        from ui.app import serve_command

        typer.echo("\nopening the web UI (Ctrl+C stops) ...")
        serve_command(collection=collection, port=port)
