"""Evaluate text-to-image outputs (`sce evaluate` in the page, part of the Report tab).

:func:`build_evaluate_section` lays the section out and wires :class:`EvaluateActions` to it
(API endpoint ``/evaluate``). Imported only when the app is built.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import gradio as gr

from sce_correct.errors import InputError, SceError
from ui.app_errors import bind
from ui.app_state import AppState, uploaded_files
from ui.app_uploads import stage_pairs, stage_reference

EVALUATION_HEADERS = ["metric", "value"]


class EvaluateActions:
    """What the Evaluate button does."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def evaluate(self, table: Any, images: Any, reference: Any, progress=gr.Progress()):
        """`sce evaluate` on an uploaded prompts file, its generated images and optional reference images.

        Returns (summary rows [metric, value], notes markdown, [evaluation.html, evaluation.json]).
        """
        from retrieval.evaluate import evaluate, write_evaluation
        from retrieval.pairs import load_pairs

        state = self.state
        tables = uploaded_files(table)
        if not tables:
            raise InputError("upload a prompts file (CSV/JSONL with image and prompt columns, or a text file "
                             "with one prompt a line) and its generated images")
        generated = uploaded_files(images)
        if not generated:
            raise InputError("upload the generated images of the prompts file (matched by file name)")
        references = uploaded_files(reference)
        scratch = state.scratch("evaluate")
        table_name = Path(tables[0]).name
        progress(0.05, desc="checking the uploads")
        try:
            staged, images_dir = stage_pairs(tables[0], generated, scratch / "pairs", max_pixels=state.max_pixels)
            pairs = load_pairs(staged, images_dir if staged.suffix.lower() == ".txt" else None)
            reference_dir = (stage_reference(references, scratch / "reference", max_pixels=state.max_pixels)
                             if references else None)
            progress(0.2, desc=f"encoding {len(pairs)} images and prompts"
                               + (f" and {len(references)} reference images" if references else ""))
            report = evaluate(state.encoder, pairs, reference=reference_dir)
        except ValueError as error:  # InputError too
            # Messages name the server's scratch copies; show the user's own names instead.
            text = str(error)
            for path, name in ((scratch / "pairs" / "images", "the uploaded images"),
                               (scratch / "pairs" / table_name, table_name),
                               (scratch / "reference", "the uploaded reference images")):
                text = text.replace(str(path), name)
            text = text.replace(str(scratch) + os.sep, "")
            if isinstance(error, SceError):
                raise InputError(text) from None
            raise ValueError(text) from error  # not a user's mistake we know: the log keeps its traceback
        if reference_dir is not None:
            report.reference = f"{len(references)} uploaded reference images"
        progress(0.9, desc="writing evaluation.html and evaluation.json")
        paths = write_evaluation(report, scratch / "out")
        rows = [[metric, value] for metric, value in report.summary_rows()]
        notes = [f"**{len(pairs)} pairs** (uploaded {html.escape(table_name, quote=False)}), encoder "
                 f"`{report.encoder}`: numbers are comparable only with runs of the same encoder."]
        if reference_dir is None:
            notes.append("No reference images uploaded: no Frechet distance, KID, CMMD, PSNR or SSIM.")
        notes += [html.escape(note, quote=False) for note in report.notes]
        return rows, "\n".join(f"- {note}" for note in notes), [str(paths["html"]), str(paths["json"])]


def build_evaluate_section(state: AppState) -> None:
    """The Evaluate section's components (inside the Report ``gr.Tab``)."""
    act = bind(EvaluateActions(state), ["evaluate"])
    gr.Markdown("### Evaluate text-to-image outputs\n"
                "CLIPScore, the SCE score, Vendi, RKE and, with reference images, the Frechet distance, KID, CMMD "
                "and PSNR/SSIM (same-named images), all from this collection's encoder. Upload a CSV or JSONL file "
                "with an `image` and a `prompt` column, or a text file with one prompt a line whose images are "
                "named `<line number>.png`; images are matched by file name.")
    with gr.Row():
        table = gr.File(label="Prompts file", file_types=[".csv", ".jsonl", ".txt"], elem_id="evaluate-prompts")
        images = gr.File(label="Generated images", file_count="multiple", file_types=["image"],
                         elem_id="evaluate-images")
        reference = gr.File(label="Reference images (optional, at least 2)", file_count="multiple",
                            file_types=["image"], elem_id="evaluate-reference")
    button = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
    rows = gr.Dataframe(headers=EVALUATION_HEADERS, label="Evaluation", interactive=False, elem_id="evaluate-table")
    notes = gr.Markdown(elem_id="evaluate-notes")
    files = gr.File(label="evaluation.html and evaluation.json", file_count="multiple", interactive=False,
                    elem_id="evaluate-files")
    button.click(act["evaluate"], [table, images, reference], [rows, notes, files], api_name="evaluate",
                 concurrency_id="read")
