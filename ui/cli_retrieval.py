"""`sce correct ...`, `sce index reindex`, `sce search` (plain, corrected, A/B) and `sce report`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from indexing.atomic import check_output_folder
from sce_correct.errors import InputError
from ui.cli_index import (
    DEFAULT_COLLECTION,
    ActorsOption,
    AddressOption,
    CollectionOption,
    DbOption,
    EngineOption,
    FactoryOption,
    MemoryBudgetOption,
    QuietOption,
    auto_factory,
    configure_logging,
    engine_options,
    index_app,
    reporting_errors,
)

correct_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          help="Fit, list and delete concept corrections.")

KernelOption = Annotated[str, typer.Option(help="cosine, or gaussian (random Fourier features).")]


def _open(collection: Path, db: str | None):
    from indexing.collection import Collection

    opened = Collection.open(collection, db)
    if opened.encoder_name is None:
        opened.close()
        raise InputError(f"collection {opened.root} is empty; build it first with `sce index build`")
    return opened


def _print_score(score) -> None:
    typer.echo(f"  SCE score (image diversity E(S)) {score.image_diversity:10.3f}")
    typer.echo(f"  text diversity E(R)              {score.text_diversity:10.3f}")
    typer.echo(f"  image share tr S                 {score.image_share:10.3f}")
    typer.echo(f"  text share tr R                  {score.text_share:10.3f}")
    typer.echo(f"  Vendi score                      {score.vendi:10.3f}")
    typer.echo(f"  RKE                              {score.rke:10.3f}")
    typer.echo(f"  pairs                            {score.n:10d}   kernel {score.kernel}")


# ------------------------------------------------------------------------------- corrections
@correct_app.command("fit")
def fit_command(
    name: Annotated[str, typer.Option(help="Name to store the correction under.")],
    concept: Annotated[Optional[Path], typer.Option(help="Concept CSV: prompt,image (or source,target for t2t).")] = None,
    source_texts: Annotated[Optional[Path], typer.Option(help="t2t: text file, one source text a line.")] = None,
    target_texts: Annotated[Optional[Path], typer.Option(help="t2t: text file, one target text a line.")] = None,
    direction: Annotated[str, typer.Option(help="t2i, i2t or t2t.")] = "t2i",
    kernel: KernelOption = "cosine",
    mode: Annotated[str, typer.Option(help="nullify (remove the concept) or focus (keep only it).")] = "nullify",
    components: Annotated[Optional[int], typer.Option(min=1, help="Concept directions to project.")] = None,
    energy: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Or: share of tr R to project (default 0.99).")] = None,
    strength: Annotated[float, typer.Option(help="Paired correction strength s (1 nullifies, < 0 focuses).")] = 1.0,
    ridge: Annotated[float, typer.Option(min=0.0, help="Ridge added to the source covariance.")] = 1e-4,
    center: Annotated[bool, typer.Option("--center/--no-center", help="Fit on mean-centred features: remove what varies "
                                         "with the prompts, keep what all concept images share.")] = True,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a correction of the same name.")] = False,
    reuse: Annotated[bool, typer.Option("--reuse/--no-reuse", help="Take the stored embedding of concept images already "
                                        "in the collection (same file content); --no-reuse encodes every image.")] = True,
    method: Annotated[str, typer.Option(help="schur (Schur-complement projection) or heads (mean-ablate the ViT "
                                        "heads that carry the concept; needs a ViT encoder such as emoji-vit).")] = "schur",
    heads: Annotated[Optional[int], typer.Option(min=1, help="--method heads: how many heads to ablate.")] = None,
    share: Annotated[Optional[float], typer.Option(help="--method heads: or the fewest heads holding this share of "
                                                   "the concept variance (default 0.5).")] = None,
    reference_images: Annotated[int, typer.Option(min=2, help="--method heads: collection images sampled for the "
                                                  "heads' mean terms.")] = 500,
    from_metadata: Annotated[Optional[str], typer.Option(help="Fit on the collection's own caption/image pairs of the "
                                                         "items that set this metadata field (e.g. skin_tone), "
                                                         "centred within groups; instead of --concept.")] = None,
    group_by: Annotated[Optional[str], typer.Option(help="--from-metadata: the field whose items form a group "
                                                    "(default: the caption without the value).")] = None,
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    quiet: QuietOption = False,
) -> None:
    """Fit a concept correction from a preliminary concept set and store it.

    --method schur (default): a Schur-complement correction. Concept images already in the
    collection (same sha256) take their stored embeddings; only the others are encoded.
    --method heads: mean-ablate the image tower's heads that carry the concept (apply it by
    re-indexing: `sce index reindex --correction NAME`).
    """
    configure_logging(quiet)
    with reporting_errors():
        from retrieval.concepts import load_concept_set, read_text_lines, text_pairs
        from retrieval.corrections import fit_concept_correction

        if from_metadata is not None:
            if heads is not None or share is not None or reference_images != 500 or strength != 1.0 \
                    or not center or not reuse:
                raise InputError("--from-metadata fits a centred projection of the collection's stored pairs: "
                                 "--heads, --share, --reference-images, --strength, --no-center and --no-reuse "
                                 "do not apply")
            _fit_from_metadata(name=name, field=from_metadata, group_by=group_by, concept=concept,
                               texts=bool(source_texts or target_texts), method=method, direction=direction,
                               kernel=kernel, mode=mode, components=components, energy=energy, ridge=ridge,
                               replace=replace, collection=collection, db=db)
            return
        if group_by is not None:
            raise InputError("--group-by groups the pairs of --from-metadata FIELD")
        if concept is not None and (source_texts or target_texts):
            raise InputError("give --concept or --source-texts/--target-texts, not both")
        if concept is not None:
            concept_set = load_concept_set(concept)
        elif source_texts and target_texts:
            concept_set = text_pairs(read_text_lines(source_texts), read_text_lines(target_texts),
                                     name=Path(source_texts).stem, source=Path(source_texts))
        else:
            raise InputError("give --concept FILE, or --source-texts and --target-texts for t2t")
        _check_method(method, direction=direction, kernel=kernel, mode=mode, components=components, energy=energy,
                      heads=heads, share=share, strength=strength, ridge=ridge, center=center, reuse=reuse,
                      reference_images=reference_images)
        with _open(collection, db) as opened:
            if method == "heads":
                from retrieval.head_correction import fit_head_correction

                result = fit_head_correction(opened, opened.load_encoder(), concept_set, name=name, n_heads=heads,
                                             share=share, reference_images=reference_images, replace=replace)
            else:
                result = fit_concept_correction(
                    opened, opened.load_encoder(), concept_set, name=name, direction=direction, kernel=kernel,
                    mode=mode, n_components=components, energy=energy, strength=strength, ridge=ridge,
                    center=center, replace=replace, reuse_stored=reuse, progress=not quiet)
        info = result.info
        if method == "heads":
            p = info.parameters
            typer.echo(f"stored correction {info.name!r}: t2i, mean-ablated heads, {len(concept_set)} pairs "
                       f"from {concept_set.source}")
            typer.echo(f"  heads: {', '.join(p['heads'])} holding {p['explained_share']:.1%} of the concept "
                       f"variance; means over {p['reference_images']} collection images")
            typer.echo("SCE report of the preliminary set:")
            _print_score(result.report)
            typer.echo(f"it changes image embeddings: re-index to search with it: "
                       f"`sce index reindex --correction {info.name}`, then `sce search --ab {info.name} \"...\"`")
            return
        typer.echo(f"stored correction {info.name!r}: {info.direction}, {info.kernel}, {mode}, "
                   f"{len(concept_set)} pairs from {concept_set.source}")
        if concept_set.images is not None and direction != "t2t":
            typer.echo(f"  concept images: {result.images_reused} stored embeddings reused, "
                       f"{result.images_encoded} encoded")
        if result.n_components is not None:
            typer.echo(f"  projection: {result.n_components} concept direction(s) holding "
                       f"{result.explained_share:.1%} of what the prompts explain")
        typer.echo("SCE report of the preliminary set:")
        _print_score(result.report)
        _echo_next_steps(info)


def _echo_next_steps(info) -> None:
    """How to use a correction just stored (one that has a query-side form)."""
    typer.echo(f"applies to the {info.target_kind} index; search it now with "
               f"`sce search --ab {info.name} \"...\"`, or re-index: `sce index reindex --correction {info.name}`")


def _fit_from_metadata(*, name, field, group_by, concept, texts, method, direction, kernel, mode, components, energy,
                       ridge, replace, collection, db) -> None:
    from retrieval.metadata_concepts import fit_metadata_correction

    if concept is not None or texts:
        raise InputError("--from-metadata takes the pairs from the collection: drop --concept / --source-texts")
    if method != "schur" or kernel != "cosine" or energy is not None:
        raise InputError("--from-metadata fits a cosine Schur projection sized by --components "
                         "(--method heads, --kernel and --energy do not apply)")
    with _open(collection, db) as opened:
        result = fit_metadata_correction(opened, name=name, field=field, group_by=group_by, direction=direction,
                                         mode=mode, n_components=components, ridge=ridge, replace=replace)
    info, p = result.info, result.info.parameters
    typer.echo(f"stored correction {info.name!r}: {info.direction}, cosine, {mode}, {p['n_pairs']} items of the "
               f"collection setting {field!r} ({len(p['values'])} values) in {p['groups']} groups "
               f"(by {p['group_by']})")
    typer.echo(f"  projection: {result.n_components} concept direction(s) holding "
               f"{result.explained_share:.1%} of what the pairs explain")
    typer.echo("SCE report of the pairs:")
    _print_score(result.report)
    _echo_next_steps(info)


def _check_method(method: str, *, direction: str, kernel: str, mode: str, components, energy, heads, share,
                  strength: float, ridge: float, center: bool, reuse: bool, reference_images: int) -> None:
    """Options that belong to the other method are a mistake worth a line, not silently ignored."""
    if method not in ("schur", "heads"):
        raise InputError(f"--method must be schur or heads, got {method!r}")
    if method == "schur":
        if heads is not None or share is not None or reference_images != 500:
            raise InputError("--heads, --share and --reference-images choose heads to ablate: they need --method heads")
        return
    if strength != 1.0 or ridge != 1e-4 or not center or not reuse:
        raise InputError("--strength, --ridge, --no-center and --no-reuse are Schur options; --method heads takes "
                         "--heads or --share")
    if direction != "t2i":
        raise InputError("a head correction changes the image embeddings: it is a t2i correction (drop --direction)")
    if kernel != "cosine" or mode != "nullify" or components is not None or energy is not None:
        raise InputError("--kernel, --mode, --components and --energy are Schur options; --method heads takes "
                         "--heads or --share")
    if heads is not None and share is not None:
        raise InputError("give --heads or --share, not both")
    if share is not None and not 0 < share <= 1:
        raise InputError(f"--share must be in (0, 1], got {share}")


@correct_app.command("list")
def list_command(collection: CollectionOption = DEFAULT_COLLECTION, db: DbOption = None) -> None:
    """List the collection's corrections."""
    configure_logging(True)
    with reporting_errors():
        from indexing.correction_store import list_corrections

        with _open(collection, db) as opened:
            rows = list_corrections(opened)
        if not rows:
            typer.echo("no corrections yet (fit one with `sce correct fit`)")
        for c in rows:
            p = c.parameters
            typer.echo(f"{c.name:24} {c.direction:4} {c.kernel:9} {p.get('mode', '-'):8} "
                       f"{'heads=' + ','.join(p['heads']) if p.get('method') == 'heads' else 'k=' + str(p.get('n_components'))}"
                       f"  on {c.target_kind} index  fitted on {c.fitted_on}")


@correct_app.command("show")
def show_command(name: str, collection: CollectionOption = DEFAULT_COLLECTION, db: DbOption = None) -> None:
    """Show one correction's parameters and the SCE report of its preliminary set."""
    configure_logging(True)
    with reporting_errors():
        from indexing.correction_store import correction_info

        with _open(collection, db) as opened:
            info = correction_info(opened, name)
        params = {k: v for k, v in info.parameters.items() if k != "concept_vector"}
        typer.echo(json.dumps({"name": info.name, "direction": info.direction, "kernel": info.kernel,
                               "encoder": info.encoder, "dim": info.dim, "target_index": info.target_kind,
                               "parameters": params, "fitted_on": info.fitted_on, "report": info.report,
                               "file": str(info.file)}, indent=2))


@correct_app.command("delete")
def delete_command(name: str, collection: CollectionOption = DEFAULT_COLLECTION, db: DbOption = None) -> None:
    """Delete a correction (its index versions stay until rebuilt)."""
    configure_logging(True)
    with reporting_errors():
        from indexing.correction_store import delete_correction

        with _open(collection, db) as opened:
            delete_correction(opened, name)
        typer.echo(f"deleted correction {name!r}")


@index_app.command("reindex")
def reindex_command(
    correction: Annotated[str, typer.Option(help="Name of a fitted correction.")],
    variant: Annotated[str, typer.Option(help="auto, projection, paired (each item's own caption) or heads "
                                         "(head corrections: re-encodes the image files).")] = "auto",
    factory: FactoryOption = None,
    memory_budget: MemoryBudgetOption = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Vectors read and written at a time.")] = 65536,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=1, help="Make the work durable every N vectors, so a killed job resumes there (default 200,000).")] = None,
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    quiet: QuietOption = False,
    engine: EngineOption = "local",
    address: AddressOption = None,
    actors: ActorsOption = None,
) -> None:
    """Build a corrected index version from the stored embeddings (no image decoding; a head
    correction's re-index reads the image files again).

    Resumable after a kill; the new version is swapped in atomically when complete, and
    searches keep using the previous one meanwhile.
    """
    configure_logging(quiet)
    with reporting_errors():
        options = engine_options(engine, address, actors)
        if engine == "ray":
            from retrieval.ray_reindex import reindex_on_ray as run
        else:
            from retrieval.reindex import reindex as run
        with _open(collection, db) as opened:
            version = run(opened, correction, variant=variant, factory=auto_factory(factory, memory_budget),
                          chunk_size=chunk_size, checkpoint_every=checkpoint_every, progress=not quiet, **options)
        typer.echo(f"index {version.name}: {version.count} vectors, correction {correction!r}, "
                   f"{version.parameters.get('variant')}, {version.file}")


# ------------------------------------------------------------------------------------ search
def _columns(left: list[str], right: list[str], width: int) -> None:
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        typer.echo(f"{a[:width]:<{width}}  |  {b[:width]}")


def _hit_line(hit) -> str:
    return f"{hit.rank:>3} {hit.score:6.3f} {hit.caption or hit.uri}"


def _read_query_vectors(path: Path):
    """The (n, d) float rows of a .npy file of shape (d,) or (n, d); anything else is one line naming it."""
    import numpy as np

    if path.is_dir():
        raise InputError(f"--vector {path} is a folder, not a .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"--vector {path}: no such file") from None
    except (ValueError, EOFError, OSError) as error:
        if isinstance(error, ValueError) and "pickled" in str(error):  # numpy's reading of a file without the .npy magic
            raise InputError(f"--vector {path}: not a .npy file (saved by numpy.save)") from None
        raise InputError(f"--vector {path}: not a readable .npy array ({' '.join(str(error).split())})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.ndim not in (1, 2):
        shape = getattr(array, "shape", "?")
        raise InputError(f"--vector {path}: expected a float array of shape (d,) or (n, d), got "
                         f"{getattr(array, 'dtype', type(array).__name__)} of shape {shape}")
    rows = np.atleast_2d(array).astype(np.float64)
    if not rows.size:
        raise InputError(f"--vector {path}: no query vectors (shape {array.shape})")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise InputError(f"--vector {path}: row {int(bad[0])} holds NaN or infinite values")
    zero = np.flatnonzero(~rows.any(axis=1))
    if len(zero):  # it scores every item 0: the "hits" would be the first ids, in no order
        raise InputError(f"--vector {path}: row {int(zero[0])} is all zeros (no direction to search)")
    return rows


def _hit_dict(hit) -> dict:
    return {"rank": hit.rank, "id": hit.item_id, "uri": hit.uri, "score": hit.score, "caption": hit.caption,
            "metadata": hit.metadata}


def search_command(
    query: Annotated[Optional[str], typer.Argument(help="Text to search for.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Search with an image instead of text.")] = None,
    vector: Annotated[Optional[Path], typer.Option(
        help="Search with query vectors: a .npy of shape (d,) or (n, d) in the collection's embedding space; "
             "needs no encoder. With --json: one JSON object per row (hits, ms).")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results.")] = 10,
    correction: Annotated[Optional[str], typer.Option(help="Search with this correction applied.")] = None,
    ab: Annotated[Optional[str], typer.Option(help="Compare original and corrected results side by side.")] = None,
    strategy: Annotated[str, typer.Option(help="auto, query (correct the query), reindexed, or negative (q - a * concept).")] = "auto",
    negative_weight: Annotated[float, typer.Option(help="a in q - a * concept for the negative strategy.")] = 1.0,
    attribute: Annotated[Optional[str], typer.Option(help="Metadata field marking the concept, e.g. skin_tone (A/B).")] = None,
    kind: Annotated[str, typer.Option(help="Index to search: image or caption.")] = "image",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    nprobe: Annotated[Optional[int], typer.Option(min=1, help="Lists an IVF index visits per query, for every "
                                                  "strategy and both sides of --ab (other index types ignore it).")] = None,
) -> None:
    """Search the collection: plain, with a correction, or original vs corrected (--ab NAME)."""
    configure_logging(quiet=True)
    with reporting_errors():
        from retrieval.compare import compare
        from retrieval.search import Retriever

        if sum(given is not None for given in (query, image, vector)) != 1:
            raise InputError("give a text query or --image PATH or --vector Q.npy (one of them)")
        if ab and correction and ab != correction:
            raise InputError("--ab already names the correction; drop --correction")
        # options of a corrected search are a mistake worth a line without one, not silently ignored
        if strategy != "auto" and not (ab or correction):
            raise InputError(f"--strategy {strategy} chooses how a correction is applied: give --correction NAME "
                             "or --ab NAME")
        if negative_weight != 1.0 and strategy != "negative":
            raise InputError("--negative-weight is the a of --strategy negative (q - a * concept)")
        if attribute is not None and not ab:
            raise InputError("--attribute measures the results of an A/B comparison: it needs --ab NAME")
        rows = _read_query_vectors(vector) if vector is not None else None
        with _open(collection, db) as opened:
            if attribute is not None and len(opened.items_store.ids({attribute: ""})) == opened.items_store.count():
                raise InputError(f"--attribute {attribute}: no item of {opened.root} sets this metadata field")
            retriever = Retriever(opened, nprobe=nprobe)  # the encoder is loaded only for a text or image query
            if rows is not None:
                _search_vectors(retriever, rows, k=k, kind=kind, correction=correction or None, ab=ab,
                                strategy=strategy, negative_weight=negative_weight, attribute=attribute,
                                as_json=as_json)
                return
            vec = retriever.embed_text(query) if query is not None else retriever.embed_image(image)
            label = query if query is not None else str(image)
            _search_vectors(retriever, vec[None, :], k=k, kind=kind, correction=correction or None, ab=ab,
                            strategy=strategy, negative_weight=negative_weight, attribute=attribute,
                            as_json=as_json, labels=[label])


def _print_hits(hits) -> None:
    if not hits:
        typer.echo("no results")
        return
    typer.echo(f"{'rank':>4}  {'score':>6}  {'id':>6}  uri  caption")
    for hit in hits:
        typer.echo(f"{hit.rank:>4}  {hit.score:6.3f}  {hit.item_id:>6}  {hit.uri}  {hit.caption or ''}")


def _print_ab(cmp, label: str, ab: str) -> None:
    k = cmp.k
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 5) // 2)
    typer.echo(f"query: {label}   correction: {ab} ({cmp.strategy})   overlap@{k}: {cmp.overlap_at_k:.2f}")
    _columns(["original"] + [_hit_line(h) for h in cmp.original],
             [f"corrected ({ab})"] + [_hit_line(h) for h in cmp.corrected], width)
    if cmp.concept_strength_original is not None:
        typer.echo(f"concept strength of the results: {cmp.concept_strength_original:.3f} -> "
                   f"{cmp.concept_strength_corrected:.3f}")
    if cmp.attribute_share_original is not None:
        typer.echo(f"share of results with {cmp.attribute}: {cmp.attribute_share_original:.2f} -> "
                   f"{cmp.attribute_share_corrected:.2f}")


def _search_vectors(retriever, rows, *, k: int, kind: str, correction: str | None, ab: str | None, strategy: str,
                    negative_weight: float, attribute: str | None, as_json: bool,
                    labels: list[str] | None = None) -> None:
    """One search (or A/B comparison) per query row, printed as a table or one JSON line each.

    ``labels``: what the rows are (a text query, an image path); without them a row is named
    by its number in the .npy. ``ms`` times the search and catalog join alone: the first row
    is searched once before timing, so that loading the index file (and the correction) is
    not counted; a search then runs faiss and joins the hits to the catalog.
    """
    import time

    from retrieval.compare import compare

    def run(row, number=0):
        if ab:
            return compare(retriever, row, f"vector {number}", ab, k=k, kind=kind, strategy=strategy, attribute=attribute,
                           negative_weight=negative_weight)
        return retriever.search(row, k, kind=kind, correction=correction, strategy=strategy,
                                negative_weight=negative_weight)

    run(rows[0])  # loads what the searches read (index file, correction); not timed
    for number, row in enumerate(rows):
        started = time.perf_counter()
        result = run(row, number)
        ms = (time.perf_counter() - started) * 1000.0
        name = labels[number] if labels else number
        if ab:
            if as_json:
                typer.echo(json.dumps({**result.to_dict(), "original": [_hit_dict(h) for h in result.original],
                                       "corrected": [_hit_dict(h) for h in result.corrected], "query": name,
                                       "ms": ms}, default=str))
            else:
                _print_ab(result, str(name) if labels else f"vector {number} ({ms:.1f} ms)", ab)
            continue
        if as_json:
            typer.echo(json.dumps({"query": name, "kind": result.kind, "correction": result.correction,
                                   "strategy": result.strategy, "hits": [_hit_dict(h) for h in result.hits],
                                   "ms": ms}, default=str))
        else:
            if not labels:
                typer.echo(f"query {number} ({ms:.1f} ms, {result.strategy})")
            _print_hits(result.hits)


# ------------------------------------------------------------------------------------ report
PairByOption = Annotated[str, typer.Option(
    "--pair-by", help="How a prompts .txt pairs with --images: 'number' (file names start with the prompt's line "
                      "number counted from 0: 0.png is the first line) or 'order' (the lines against the image files "
                      "sorted by name; the counts must match).")]


def report_command(
    prompts: Annotated[Optional[Path], typer.Option(help="CSV/JSONL/parquet of image,prompt pairs, or a prompts .txt (with --images).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder (for a .txt: see --pair-by).")] = None,
    pair_by: PairByOption = "number",
    where: Annotated[Optional[list[str]], typer.Option(help="Without --prompts: report on the collection's captioned items whose metadata match key=value (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=2, help="At most this many items (a seeded sample).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json, spectra.png and modes.png.")] = Path("sce-report"),
    kernel: Annotated[str, typer.Option(help="cosine, gaussian or gaussian-exact.")] = "cosine",
    sigma: Annotated[Optional[float], typer.Option(help="Gaussian bandwidth (default: median distance).")] = None,
    ridge: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    modes: Annotated[int, typer.Option(min=1, help="Modes to show.")] = 6,
    top: Annotated[int, typer.Option(min=1, help="Images per mode.")] = 8,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder for --prompts (default: 'default').")] = None,
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    quiet: QuietOption = False,
) -> None:
    """The SCE report of a paired prompt/image set: scores, spectra, original vs Schur modes."""
    configure_logging(quiet)
    with reporting_errors():
        import indexing
        from indexing.items import parse_where
        from retrieval.pairs import load_pairs
        from retrieval.report import report_for_collection, report_for_pairs, write_report

        check_output_folder(out, "--out")  # before the report is computed
        kw = dict(kernel=kernel, sigma=sigma, ridge=ridge, n_modes=modes, top=top)
        if prompts is not None:
            pairs = load_pairs(prompts, images, pair_by=pair_by)
            if limit is not None and len(pairs) > limit:
                raise InputError(f"{len(pairs)} pairs but --limit {limit}; --limit applies to collection reports")
            report = report_for_pairs(indexing.load_encoder(encoder or "default"), pairs, progress=not quiet, **kw)
        else:
            if images is not None:
                raise InputError(f"--images {images} needs --prompts (the prompts its images pair with); "
                                 "without --prompts the report is of the collection")
            clauses = parse_where(where)  # a bad clause fails before anything is loaded
            with _open(collection, db) as opened:
                report = report_for_collection(opened, opened.load_encoder(), where=clauses, limit=limit, **kw)
        paths = write_report(report, out)
        if prompts is not None:
            typer.echo(f"{len(pairs)} pairs {pairs.pairing}")
        typer.echo(f"SCE report of {report.source}:")
        _print_score(report.score)
        typer.echo(f"wrote {paths['json']}, {paths['spectra']}, {paths['modes']}")


# ---------------------------------------------------------------------------------- evaluate
def evaluate_command(
    prompts: Annotated[Path, typer.Option(help="CSV/JSONL/parquet of image,prompt pairs, or a prompts .txt (with --images).")],
    images: Annotated[Optional[Path], typer.Option(help="Generated images (for a .txt: see --pair-by).")] = None,
    pair_by: PairByOption = "number",
    reference: Annotated[Optional[Path], typer.Option(help="Reference images: Frechet distance, KID, CMMD; same-named files also PSNR/SSIM.")] = None,
    edits: Annotated[Optional[Path], typer.Option(help="CSV of source_image,edited_image,source_caption,edited_caption: directional similarity.")] = None,
    encoder: Annotated[str, typer.Option(help="Encoder spec for every embedding.")] = "default",
    kernel: Annotated[str, typer.Option(help="Kernel of the SCE report: cosine, gaussian or gaussian-exact.")] = "cosine",
    out: Annotated[Path, typer.Option(help="Folder for evaluation.json and evaluation.html.")] = Path("sce-evaluation"),
    quiet: QuietOption = False,
) -> None:
    """Evaluate text-to-image outputs: CLIPScore, FD, KID, CMMD, IS-style, Vendi, RKE, SCE, PSNR/SSIM."""
    configure_logging(quiet)
    with reporting_errors():
        import indexing
        from retrieval.evaluate import evaluate, write_evaluation
        from retrieval.pairs import load_pairs

        check_output_folder(out, "--out")  # before anything is computed or printed
        pairs = load_pairs(prompts, images, pair_by=pair_by)
        report = evaluate(indexing.load_encoder(encoder), pairs, reference=reference, edits=edits, kernel=kernel,
                          progress=not quiet)
        width = max(len(k) for k, _ in report.summary_rows())
        typer.echo(f"{len(pairs)} pairs {pairs.pairing}")
        typer.echo(f"evaluation of {pairs.source} with encoder {report.encoder}:")
        for key, value in report.summary_rows():
            typer.echo(f"  {key:<{width}}  {value}")
        for note in report.notes:
            typer.echo(f"  note: {note}")
        paths = write_evaluation(report, out)
        typer.echo(f"wrote {paths['json']} and {paths['html']}")
