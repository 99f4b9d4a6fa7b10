"""The `sce` command line: parses arguments, calls retrieval/indexing, prints results."""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Concept-corrected image retrieval.")

# --- sub-command registration (each module keeps its heavy imports inside its commands) ---
# (helpers add their `app.add_typer(...)` / `app.command(...)` lines here)
from ui.cli_index import index_app, search_command  # noqa: E402

app.add_typer(index_app, name="index")
app.command("search")(search_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
