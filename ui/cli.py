"""The `sce` command line: parses arguments, calls retrieval/indexing, prints results."""
from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Concept-corrected image retrieval.")


@app.callback()
def global_options(
    debug: Annotated[bool, typer.Option("--debug", help="On any error show the full traceback; log at DEBUG level.")] = False,
) -> None:
    """Concept-corrected image retrieval."""
    from ui.cli_index import set_debug

    set_debug(debug)

# --- sub-command registration (each module keeps its heavy imports inside its commands) ---
from ui.app import serve_command  # noqa: E402  (gradio is imported inside the command)
from ui.cli_decompose import decompose_app  # noqa: E402
from ui.cli_demo import demo_command  # noqa: E402
from ui.cli_index import index_app  # noqa: E402
from ui.cli_retrieval import correct_app, evaluate_command, report_command, search_command  # noqa: E402

app.add_typer(index_app, name="index")
app.add_typer(correct_app, name="correct")
app.add_typer(decompose_app, name="decompose")
app.command("search")(search_command)
app.command("report")(report_command)
app.command("evaluate")(evaluate_command)
app.command("serve")(serve_command)
app.command("demo")(demo_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
