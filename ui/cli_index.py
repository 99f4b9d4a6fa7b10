"""`sce index build|add|delete|info|gc`: parse, call indexing, print (`sce search` is in ui.cli_retrieval).

Heavy modules (torch, faiss, the encoders) are imported inside the commands so that
`sce --help` stays fast.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from indexing.readers import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

index_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Build and maintain a collection: SQL catalog, stored embeddings, FAISS index.",
)

DEFAULT_COLLECTION = Path("sce-collection")

CollectionOption = Annotated[
    Path,
    typer.Option(
        "--collection", "-c",
        help="Collection directory: catalog.sqlite, embeddings/ and indexes/ live here.",
    ),
]
DbOption = Annotated[
    Optional[str],
    typer.Option(help="Catalog as an SQLAlchemy URL or a path. Default: COLLECTION/catalog.sqlite."),
]
FactoryOption = Annotated[
    Optional[str],
    typer.Option(
        help="FAISS index_factory string, e.g. 'IVF1024,Flat' (IVF lists go on disk, nprobe is tuned), "
        "or 'auto': chosen from the collection's size and --memory-budget (Flat below 100k vectors). "
        "Default: auto for a new index, else the current index's."
    ),
]
MemoryBudgetOption = Annotated[
    Optional[str],
    typer.Option(help="What --factory auto may let the index hold in memory, e.g. 4GB "
                      "(default: half the available RAM).")
]


def auto_factory(factory: str | None, memory_budget: str | None) -> str | None:
    """The factory spec of --factory and --memory-budget (which applies to auto only)."""
    if memory_budget is None:
        return factory
    from indexing.index_factory import AUTO, memory_budget_spec
    from sce_correct.errors import InputError

    if factory not in (None, AUTO):
        raise InputError(f"--memory-budget applies to --factory auto, not --factory {factory!r}")
    return memory_budget_spec(memory_budget)


ImageRootOption = Annotated[
    Optional[Path],
    typer.Option(help="Folder that relative paths in a CSV/JSONL/parquet list refer to "
                      "Default: the list's own folder."),
]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per encoder batch.")]
WorkersOption = Annotated[int, typer.Option(min=0, help="Threads decoding images (0: none).")]
ShardSizeOption = Annotated[
    int, typer.Option(min=1, help="Images committed at a time (the most a kill can lose).")
]
MaxPixelsOption = Annotated[
    int, typer.Option(min=1, help="Larger images are rejected as decompression bombs.")
]
RetryOption = Annotated[
    bool, typer.Option("--retry-failed", help="Try again files rejected by an earlier run.")
]
Float16Option = Annotated[
    bool, typer.Option("--float16", help="Store embeddings as float16 (half the disk).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
EngineOption = Annotated[str, typer.Option(
    help="local: this process; ray: the same stages on Ray Data actors (pip install 'sce-retrieval[ray]').")]
AddressOption = Annotated[Optional[str], typer.Option(
    help="With --engine ray: join the Ray cluster at this address (e.g. HOST:6379). Default: start a local one.")]
ActorsOption = Annotated[Optional[int], typer.Option(
    min=1, help="With --engine ray: encoder actors, each loading the encoder once. Default: one per CPU.")]


def engine_options(engine: str, address: str | None, actors: int | None) -> dict:
    """The engine keyword arguments of a build or re-index (refused: Ray options without Ray)."""
    from sce_correct.errors import InputError

    if engine not in ("local", "ray"):
        raise InputError(f"--engine must be local or ray; got {engine!r}")
    if engine != "ray":
        if address is not None or actors is not None:
            raise InputError("--address and --actors need --engine ray")
        return {}
    return {"address": address, "actors": actors}


# Exit statuses: 1 for a user's mistake (an SceError) or an OS error about their files, 130 for
# Ctrl-C, and EX_SOFTWARE (sysexits.h: "internal software error") for a bug; 2 is click's usage error.
USER_ERROR_EXIT = 1
BUG_EXIT = 70
_debug = False
_level_before_debug: int | None = None


def set_debug(enabled: bool) -> None:
    """`sce --debug`: show the traceback of every error and log at DEBUG (off: as before)."""
    global _debug, _level_before_debug
    root = logging.getLogger()
    if enabled and not _debug:
        _level_before_debug = root.level
    elif not enabled and _debug and _level_before_debug is not None:
        root.setLevel(_level_before_debug)  # one process, several commands (tests, the web UI)
    _debug = bool(enabled)
    if _debug:
        configure_logging(quiet=False)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _os_error_message(error: OSError) -> str:
    """'No such file or directory: /x' rather than "[Errno 2] No such file or directory: '/x'"."""
    if error.strerror and error.filename is not None:
        target = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
        return f"{error.strerror}: {target}"
    return str(error) or type(error).__name__


@contextlib.contextmanager
def reporting_errors() -> Iterator[None]:
    """The command line's one error boundary; every command runs inside it.

    A user's mistake (:class:`sce_correct.errors.SceError`) or an OS error about their files
    prints ``error: <message>`` on one line and exits 1. Any other exception is a bug: one
    line saying so, naming the exception, exit status 70; ``sce --debug`` shows the traceback
    (of any error) as well.
    """
    from sce_correct.errors import SceError

    try:
        yield
    except (typer.Exit, typer.Abort, click.ClickException):  # click reports its own usage errors
        raise
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        raise typer.Exit(130) from None
    except (SceError, OSError) as error:
        if _debug:
            typer.echo(traceback.format_exc(), err=True)
        message = str(error) if isinstance(error, SceError) else _os_error_message(error)
        typer.secho(f"error: {_one_line(message or type(error).__name__)}", err=True, fg="red")
        raise typer.Exit(USER_ERROR_EXIT) from None
    except Exception as error:  # not a user's mistake: a bug, and said to be one
        if _debug:
            typer.echo(traceback.format_exc(), err=True)
            hint = "the traceback is above"
        else:
            hint = "run `sce --debug ...` to see the traceback"
        typer.secho(f"error: internal error (a bug in sce): {type(error).__name__}: {_one_line(str(error))} "
                    f"({hint})", err=True, fg="red")
        raise typer.Exit(BUG_EXIT) from None


def configure_logging(quiet: bool) -> None:
    level = logging.DEBUG if _debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    if _debug:  # basicConfig does nothing once the root logger has a handler
        logging.getLogger().setLevel(logging.DEBUG)
    # faiss reports which CPU build it loaded at INFO; not news to a user.
    logging.getLogger("faiss").setLevel(logging.WARNING)


def _print_report(report) -> None:  # noqa: ANN001 - indexing.pipeline.BuildReport
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(report.rejected.items()))
    typer.echo(
        f"indexed {report.added} new images from {report.source} in {report.seconds:.1f}s "
        f"({report.already_known} already known, {report.repeated_uris} listed twice)"
    )
    if rejected:
        typer.echo(f"rejected: {rejected}  (see `sce index info --failures 20`)")
    _print_version(report.index_version)


def _print_version(version) -> None:  # noqa: ANN001 - indexing.index_versions.IndexVersionInfo or None
    """The one line naming a published index version."""
    if version is not None:
        typer.echo(f"index {version.name}: {version.count} vectors, {version.factory}, {version.file}")


@index_app.command("build")
def build_command(
    source: Annotated[Path, typer.Argument(help="A folder (recursive), or a CSV/JSONL/parquet list of image paths.")],
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    encoder: Annotated[str, typer.Option(help="Encoder spec: 'default' or 'open_clip:<model>:<pretrained>'.")] = "default",
    index_dir: Annotated[Optional[Path], typer.Option(help="Where index files go. Default: COLLECTION/indexes.")] = None,
    factory: FactoryOption = None,
    memory_budget: MemoryBudgetOption = None,
    image_root: ImageRootOption = None,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = 2,
    shard_size: ShardSizeOption = 1024,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    retry_failed: RetryOption = False,
    float16: Float16Option = False,
    quiet: QuietOption = False,
    engine: EngineOption = "local",
    address: AddressOption = None,
    actors: ActorsOption = None,
) -> None:
    """Create a collection from SOURCE, or resume an interrupted build of it."""
    configure_logging(quiet)
    with reporting_errors():
        from indexing.pipeline import build_collection

        factory = auto_factory(factory, memory_budget)
        report = build_collection(
            source, collection, db=db, encoder=encoder, index_dir=index_dir, factory=factory,
            image_root=image_root, batch_size=batch_size, workers=workers,
            shard_size=shard_size, max_pixels=max_pixels, retry_failed=retry_failed,
            embedding_dtype="float16" if float16 else "float32", progress=not quiet,
            engine=engine, **engine_options(engine, address, actors),
        )
        _print_report(report)


@index_app.command("add")
def add_command(
    source: Annotated[Path, typer.Argument(help="A folder, or a CSV/JSONL/parquet list of image paths.")],
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    encoder: Annotated[Optional[str], typer.Option(help="Must match the collection's encoder. Default: the collection's.")] = None,
    factory: FactoryOption = None,
    memory_budget: MemoryBudgetOption = None,
    image_root: ImageRootOption = None,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = 2,
    shard_size: ShardSizeOption = 1024,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    retry_failed: RetryOption = False,
    float16: Float16Option = False,
    quiet: QuietOption = False,
    engine: EngineOption = "local",
    address: AddressOption = None,
    actors: ActorsOption = None,
) -> None:
    """Add the new images of SOURCE to an existing collection (duplicates by content are skipped)."""
    configure_logging(quiet)
    with reporting_errors():
        from indexing.pipeline import add_to_collection

        factory = auto_factory(factory, memory_budget)
        report = add_to_collection(
            source, collection, db=db, encoder=encoder, factory=factory,
            image_root=image_root, batch_size=batch_size, workers=workers,
            shard_size=shard_size, max_pixels=max_pixels, retry_failed=retry_failed,
            embedding_dtype="float16" if float16 else "float32", progress=not quiet,
            engine=engine, **engine_options(engine, address, actors),
        )
        _print_report(report)


@index_app.command("delete")
def delete_command(
    item_ids: Annotated[Optional[list[int]], typer.Option("--id", help="Item id (repeatable).")] = None,
    paths: Annotated[Optional[list[str]], typer.Option("--path", help="Image path or URI (repeatable).")] = None,
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
) -> None:
    """Delete items from the catalog, the stored embeddings and every index version.

    Exits with status 1 when any id or path was not in the collection.
    """
    configure_logging(quiet=True)
    if not item_ids and not paths:
        typer.secho("error: give at least one --id or --path", err=True, fg="red")
        raise typer.Exit(2)
    with reporting_errors():
        from indexing.collection import Collection
        from indexing.readers import file_uri

        uris = [file_uri(path) if "://" not in path else path for path in paths or []]
        with Collection.open(collection, db) as opened:
            result = opened.delete(ids=item_ids or [], uris=uris)
        typer.echo(f"deleted {len(result.deleted)} items" + (
            f": {', '.join(map(str, result.deleted))}" if result.deleted else ""))
        if result.not_found:
            typer.secho(
                f"not in the collection: {', '.join(map(str, result.not_found))}", err=True, fg="red"
            )
            raise typer.Exit(1)


@index_app.command("info")
def info_command(
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    failures: Annotated[int, typer.Option(min=0, help="Also list this many rejected files.")] = 0,
) -> None:
    """Show the collection: encoder, counts, rejected files and index versions."""
    configure_logging(quiet=True)
    with reporting_errors():
        from indexing.collection import Collection

        with Collection.open(collection, db) as opened:
            info = opened.info()
            rejected = opened.failures(limit=failures) if failures else []
        typer.echo(f"collection  {info.root}")
        typer.echo(f"catalog     {info.catalog_url}")
        typer.echo(f"encoder     {info.encoder} (dim {info.dim})")
        typer.echo(f"weights     {info.encoder_weights or 'unknown (not recorded)'}")
        typer.echo(f"items       {info.items}")
        for kind, count in sorted(info.embeddings.items()):
            typer.echo(f"embeddings  {kind}: {count}")
        if info.failures:
            summary = ", ".join(f"{reason} {count}" for reason, count in sorted(info.failures.items()))
            typer.echo(f"rejected    {sum(info.failures.values())} ({summary})")
        typer.echo("index versions:")
        if not info.versions:
            typer.echo("  (none)")
        for version in info.versions:
            behind = info.embeddings.get(version.kind, 0) - version.count
            note = f"  ({behind} stored vectors not in it)" if behind and version.state == "ready" else ""
            typer.echo(
                f"  {version.name}  {version.state:8}  {version.kind}  "
                f"correction={version.correction or '-'}  {version.factory}  "
                f"{version.count} vectors{_search_settings(version.parameters)}{note}"
            )
        for failure in rejected:
            typer.echo(f"  rejected {failure.reason:18} {failure.uri}  {failure.detail}")


def _search_settings(parameters: dict) -> str:
    """An IVF version's tuned nprobe (the default of `sce search`) and where its lists are."""
    if "nprobe" not in parameters:
        return ""
    text = f"  nprobe={parameters['nprobe']}"
    if "tuned_recall_at_10" in parameters:
        text += f" (recall@10={parameters['tuned_recall_at_10']:.3f} when built)"
    return text + ("  lists on disk" if parameters.get("ondisk") else "")


@index_app.command("gc")
def gc_command(
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    keep: Annotated[Optional[int], typer.Option(
        min=0, help="Retired versions per kind and correction whose files are kept, the newest "
                    "(default 2).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed.")] = False,
) -> None:
    """Remove the files of retired index versions, keeping the newest KEEP of each kind and
    correction; the current and unfinished versions are never touched."""
    configure_logging(quiet=True)
    with reporting_errors():
        from indexing.collection import Collection

        with Collection.open(collection, db) as opened:
            report = opened.collect_garbage(keep, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        for path in report.removed:
            typer.echo(f"{verb} {path}")
        typer.echo(f"{verb} {len(report.removed)} retired index files ({report.freed_bytes / 1e6:.1f} MB); "
                   f"kept the files of {len(report.kept)} retired versions")


# ------------------------------------------------------------------------- import / export
@index_app.command("import")
def import_command(
    emb_dir: Annotated[Path, typer.Argument(help="Embedding folder in clip-retrieval's layout: img_emb/img_emb_{i}.npy, "
                                                 "metadata/metadata_{i}.parquet, optional text_emb/text_emb_{i}.npy.")],
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    encoder: Annotated[Optional[str], typer.Option(
        help="Spec of the encoder that made the vectors, recorded without loading it (e.g. 'default', "
             "'open_clip:ViT-B-32:laion2b_s34b_b79k', or another tool's model name: then search with --vector). "
             "Default: the collection's.")] = None,
    index_dir: Annotated[Optional[Path], typer.Option(help="Where index files go. Default: COLLECTION/indexes.")] = None,
    factory: FactoryOption = None,
    quiet: QuietOption = False,
) -> None:
    """Import precomputed embeddings (nothing is re-encoded); image paths already in the collection are skipped."""
    configure_logging(quiet)
    with reporting_errors():
        from indexing.collection import Collection
        from indexing.embedding_import import import_embeddings
        from sce_correct.errors import InputError

        opened = Collection.open(collection, db, create=True, index_dir=index_dir)
        try:
            spec = encoder or opened.encoder_name
            if spec is None:
                raise InputError("--encoder: name the encoder that made the embeddings (the collection has none yet)")
            report = import_embeddings(opened, emb_dir, encoder_spec=spec, progress=not quiet, factory=factory)
        except BaseException:
            opened.discard_if_unused()  # a refused import of a new collection leaves nothing behind
            raise
        opened.close()
        typer.echo(f"imported {report.added} items from {report.source} ({report.shards} shards, {report.rows} rows; "
                   f"{report.already_known} already in the collection, {report.repeated_paths} listed twice) "
                   f"in {report.seconds:.1f}s; encoder {report.encoder} (dim {report.dim}); "
                   f"{report.captions_added} caption embeddings")
        for version in (report.index_version, report.caption_index_version):
            _print_version(version)


@index_app.command("export")
def export_command(
    out_dir: Annotated[Path, typer.Argument(help="A new or empty folder: img_emb/ (or text_emb/) and metadata/ go there.")],
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    correction: Annotated[Optional[str], typer.Option(
        help="Export what this correction's index holds (its re-indexed version, else the correction applied "
             "to the stored embeddings). Default: the stored embeddings.")] = None,
    kind: Annotated[str, typer.Option(help="image (img_emb/) or caption (text_emb/).")] = "image",
    shard_size: Annotated[int, typer.Option(min=1, help="Rows per shard.")] = 100_000,
    float16: Annotated[bool, typer.Option("--float16", help="Write float16 vectors (half the size).")] = False,
    quiet: QuietOption = False,
) -> None:
    """Write the collection's embeddings in clip-retrieval's layout (the inverse of `sce index import`)."""
    configure_logging(quiet)
    with reporting_errors():
        from indexing.collection import Collection
        from retrieval.embedding_export import export_embeddings

        with Collection.open(collection, db) as opened:
            report = export_embeddings(opened, out_dir, correction=correction, kind=kind, shard_rows=shard_size,
                                       dtype="float16" if float16 else "float32", progress=not quiet)
        extra = f", {report.captions} caption embeddings in text_emb/" if report.captions else ""
        typer.echo(f"exported {report.rows} {report.kind} vectors ({report.source}, dim {report.dim}, {report.dtype}) "
                   f"in {report.shards} shard(s) to {report.out_dir}{extra}")
