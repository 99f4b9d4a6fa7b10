"""`sce decompose heads|ablate`: what a ViT encoder's heads encode, and what removing them costs."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from indexing.atomic import check_output_folder
from ui.cli_index import DEFAULT_COLLECTION, CollectionOption, DbOption, configure_logging, reporting_errors

decompose_app = typer.Typer(no_args_is_help=True, add_completion=False,
                            help="Per-head decomposition of a ViT encoder on a collection's images.")

EncoderOption = Annotated[str, typer.Option(help="Encoder spec with an open_clip ViT image tower.")]
ImagesOption = Annotated[int, typer.Option(help="Images sampled from the collection (seeded; all if fewer).")]
SeedOption = Annotated[int, typer.Option(help="Seed of the image sample.")]
OutOption = Annotated[Optional[Path], typer.Option(help="Output folder. Default: COLLECTION/decompose.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Less logging.")]


def _output_folder(out: Path | None, collection: Path) -> Path:
    """``--out``, refused before any work when it cannot be a folder, or COLLECTION/decompose
    (checked with the collection itself: "collection F is a file, not a folder")."""
    if out is not None:
        check_output_folder(out, "--out")
    return out if out is not None else collection / "decompose"


def _load_vit_encoder(spec: str):
    """The encoder named by ``spec``, refused (one line) unless it has a decomposable ViT tower."""
    import indexing
    from retrieval.heads import vit_of

    encoder = indexing.load_encoder(spec)
    vit_of(encoder)
    return encoder


def _decompose_sample(encoder, collection: Path, db: str | None, images: int, seed: int, captioned: bool):
    """(sample, decomposition) of a seeded sample of the collection's images."""
    from indexing.collection import Collection
    from retrieval.heads import decompose_images, sample_items

    opened = Collection.open(collection, db)
    try:
        sample = sample_items(opened, images, seed, captioned=captioned)
    finally:
        opened.close()
    return sample, decompose_images(encoder, sample.paths)


@decompose_app.command("heads")
def heads_command(
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    encoder: EncoderOption = "emoji-vit",
    bank: Annotated[Optional[Path], typer.Option(help="Text bank, one text a line. Default: the shipped "
                                                 "general bank (text_banks/general.txt).")] = None,
    components: Annotated[int, typer.Option(help="TEXTSPAN texts per head.")] = 5,
    images: ImagesOption = 500,
    seed: SeedOption = 0,
    top: Annotated[int, typer.Option(help="Top images kept per head.")] = 5,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Name each (layer, head) with TEXTSPAN texts from a bank; write heads.json and heads.png."""
    from sce_correct.errors import InputError

    with reporting_errors():
        configure_logging(quiet)
        from indexing.collection import Collection
        from retrieval.heads import check_sample_size, collection_head_report, write_heads_figure, write_json

        check_sample_size(images)
        if components < 1:
            raise InputError(f"--components must be at least 1, got {components}")
        if top < 1:
            raise InputError(f"--top must be at least 1, got {top}")
        folder = _output_folder(out, collection)
        loaded = _load_vit_encoder(encoder)  # a CNN encoder is refused before anything is read
        opened = Collection.open(collection, db)
        try:  # the same code path as the web UI's Heads tab
            report = collection_head_report(loaded, opened, bank=bank, images=images, seed=seed,
                                            components=components, top_images=top)
        finally:
            opened.close()
        report["encoder"] = encoder  # the spec as given
        paths = {t["item_id"]: t["uri"] for entry in report["entries"] for t in entry["top_images"]}
        json_path = write_json(folder / "heads.json", report)
        png_path = write_heads_figure(report, paths, folder / "heads.png")
        typer.echo(f"{report['layers']} layers x {report['heads']} heads, {report['images']} images, "
                   f"bank {Path(report['bank']).name} ({report['bank_texts']} texts); "
                   f"top images by {report['top_images_by']}")
        for entry in report["entries"]:
            picks = "; ".join(f"{c['text']} {c['variance']:.4g}" for c in entry["components"])
            ids = " ".join(str(t["item_id"]) for t in entry["top_images"])
            typer.echo(f"L{entry['layer']} H{entry['head']} (total variance {entry['total_variance']:.4g}): "
                       f"{picks} | top images {ids}")
        typer.echo(f"wrote {json_path} and {png_path}")


@decompose_app.command("ablate")
def ablate_command(
    collection: CollectionOption = DEFAULT_COLLECTION,
    db: DbOption = None,
    encoder: EncoderOption = "emoji-vit",
    images: ImagesOption = 500,
    seed: SeedOption = 0,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Caption->image R@10 as layers are mean-ablated from the first, and each head's drop alone."""
    with reporting_errors():
        configure_logging(quiet)
        from retrieval.heads import ablation_report, check_sample_size, write_json

        check_sample_size(images)  # before the encoder loads
        folder = _output_folder(out, collection)
        loaded = _load_vit_encoder(encoder)
        sample, decomposition = _decompose_sample(loaded, collection, db, images, seed, captioned=True)
        report = ablation_report(decomposition, loaded.encode_texts(sample.captions))
        report.update(encoder=encoder, seed=seed)
        json_path = write_json(folder / "ablate.json", report)
        k = report["k"]
        typer.echo(f"caption->image R@{k} over {report['images']} captioned images "
                   f"(chance {report['chance']:.3f}): {report['recall']:.3f} with nothing ablated")
        typer.echo(f"{'layers ablated':>15}  R@{k}")
        for row in report["cumulative_layers"]:
            typer.echo(f"{row['layers_ablated']:>15}  {row['recall']:.3f}")
        typer.echo(f"{'+ stem':>15}  {report['all_terms_recall']:.3f}")
        typer.echo(f"{'layer':>6} {'head':>5}  R@{k} drop")
        for row in report["single_heads"]:
            typer.echo(f"{row['layer']:>6} {row['head']:>5}  {row['drop']:+.3f}")
        typer.echo(f"wrote {json_path}")
