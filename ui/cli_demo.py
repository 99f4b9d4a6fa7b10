"""`sce demo`: build the sample collection and corrections when missing, then show what they do."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ui.cli_index import configure_logging, reporting_errors

logger = logging.getLogger(__name__)

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
DEMO_DIR = Path("demo-collection")

#: (correction name, concept file, direction) fitted for the demo.
DEMO_CORRECTIONS = (
    ("no-skin-tone", "skin_tone_large.csv", "nullify"),  # all in the sample corpus: stored embeddings reused
    ("no-gender", "gender.csv", "nullify"),
    ("no-colour", "colour.csv", "nullify"),
)


def ensure_demo_collection(root: Path, data_dir: Path = REPO_DATA, *, progress: bool = True):
    """Build the sample collection and fit the demo corrections, each only when missing or stale."""
    from indexing.collection import Collection
    from indexing.correction_store import list_corrections
    from indexing.pipeline import build_collection
    from retrieval.concepts import load_concept_set
    from retrieval.corrections import fit_concept_correction

    captions = data_dir / "sample" / "captions.csv"
    if not captions.is_file():
        raise ValueError(f"the sample corpus is missing ({captions}); rebuild it with data/build_sample_corpus.py")
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
                typer.echo(f"fitting correction {name} from data/concepts/{concept_file} ...")
                fit_concept_correction(coll, encoder, load_concept_set(data_dir / "concepts" / concept_file),
                                       name=name, mode=mode, replace=name in have)
    return root


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
        from retrieval.compare import compare
        from retrieval.report import report_for_collection, write_report
        from retrieval.search import Retriever
        from ui.cli_retrieval import _print_score

        ensure_demo_collection(collection, progress=not quiet)
        with Collection.open(collection) as coll:
            encoder = coll.load_encoder()
            report = report_for_collection(coll, encoder, where={"category": "people & body"})
            paths = write_report(report, report_dir)
            typer.echo(f"\nSCE report of the sample corpus ({report.source}):")
            _print_score(report.score)
            typer.echo(f"  wrote {paths['json']}, {paths['spectra']}, {paths['modes']}")
            retriever = Retriever(coll, encoder)
            for query in ("waving hand", "thumbs up", "person running"):
                cmp = compare(retriever, retriever.embed_text(query), query, "no-skin-tone", k=8,
                              attribute="skin_tone")
                typer.echo(f"\n'{query}': top 8 showing a skin tone (not the default yellow) {cmp.attribute_share_original:.0%} -> "
                           f"{cmp.attribute_share_corrected:.0%} with no-skin-tone (overlap@8 {cmp.overlap_at_k:.2f})")
                for a, b in zip(cmp.original, cmp.corrected):
                    typer.echo(f"  {(a.caption or '')[:44]:<44} | {(b.caption or '')[:44]}")
    if serve:
        from ui.app import serve_command

        typer.echo("\nopening the web UI (Ctrl+C stops) ...")
        serve_command(collection=collection, port=port)
