"""The `sce` command line: parses arguments, calls retrieval/indexing, prints results."""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Concept-corrected image retrieval.")

# --- sub-command registration (each module keeps its heavy imports inside its commands) ---
# (helpers add their `app.add_typer(...)` / `app.command(...)` lines here)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
