"""The sample corpus and the concept sets, shipped with the package as `sce_data`.

Not library code: pyproject.toml maps this folder to the package name `sce_data` so that a
wheel (and an editable install) carries the files; `indexing.shipped_data` finds them.
"""
