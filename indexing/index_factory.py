"""Which faiss index a version gets: ``--factory auto`` and the memory budget it is chosen under.

:func:`choose_factory` is a pure function of the collection's size, the dimension and a memory
budget. Its rules follow autofaiss's ``get_optimal_index_keys_v2`` / ``get_optimal_nb_clusters``
/ ``get_optimal_quantization`` (criteo/autofaiss, ``autofaiss/external/optimize.py``), cut down
to the indexes this project stores (inner product, inverted lists on disk):

- below :data:`FLAT_BELOW` vectors: ``Flat`` (exact). autofaiss keeps Flat under 1,000 and
  uses HNSW up to 10,000; an exact scan of 100k x 384 floats takes a few ms per query here,
  so exact search is kept up to 100k, where it is both fast and right.
- from there an IVF: ``nlist`` is the power of two nearest ``4 * sqrt(n)`` (autofaiss: "between
  4xsqrt(n) and 16xsqrt(n)", power of two closest to 4 sqrt(n)), at least 256 (the smallest
  autofaiss uses) and at most 65,536 (its choice from 10M vectors on);
- the codes: ``Flat`` while ``n`` is below 1M (autofaiss's ``ivf_flat_threshold``) and the
  index fits the budget, else ``SQ8`` (one byte per dimension) when that fits, else ``PQ{m}``
  with the largest of autofaiss's PQ sizes (256, 128, ..., 4 bytes) that divides the
  dimension and fits. Sizes are estimated as autofaiss does: code bytes + 8 bytes of id per
  vector, plus the coarse centroids (``nlist * dim * 4``).

The budget is what the index may hold in memory (its lists are memory-mapped: the page cache
holds the codes searches visit). Default: half of the available RAM (``MemAvailable``).
The training sample (:func:`train_size`) is ``max(30 * nlist, 65,536)`` vectors, capped at
``n``: faiss warns under 39 points per centroid; autofaiss trains on 30..256 per centroid.

Factory specs ``auto`` and ``auto:<budget>`` (e.g. ``auto:4GB``) are resolved to a concrete
faiss factory string by :func:`resolve_factory` when a version is built; the version records
the concrete string and, in its parameters, what it was chosen from.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from sce_correct.errors import InputError

AUTO = "auto"
FLAT_BELOW = 100_000
IVF_FLAT_BELOW = 1_000_000  # autofaiss's ivf_flat_threshold: quantize from here on
MIN_NLIST, MAX_NLIST = 256, 65_536
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # autofaiss's pq_values, bytes per vector
ID_BYTES = 8  # an int64 id per vector in an inverted list
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
          "TIB": 1 << 40}


def parse_memory(text: str | int) -> int:
    """``"4GB"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes, as bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InputError(f"--memory-budget {text!r} is not a size such as 4GB, 512MB or 1073741824")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"--memory-budget must be positive, got {text!r}")
    return value


def default_memory_budget(meminfo: str | Path = "/proc/meminfo") -> int:
    """Half of the available RAM (``MemAvailable``; 4 GiB when it cannot be read)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def nlist_for(n: int) -> int:
    """The number of inverted lists for ``n`` vectors: the power of two nearest 4 sqrt(n), bounded."""
    nearest = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return int(min(max(nearest, MIN_NLIST), MAX_NLIST))


def train_size(nlist: int, n: int) -> int:
    """How many vectors train an IVF of ``nlist`` lists: max(30 nlist, 65,536), at most ``n``."""
    return int(min(max(30 * nlist, 65_536), n))


def ivf_bytes(n: int, dim: int, nlist: int, code_bytes: int) -> int:
    """Estimated size of an IVF: codes and ids of ``n`` vectors plus the coarse centroids."""
    return n * (code_bytes + ID_BYTES) + nlist * dim * 4


def choose_factory(n: int, dim: int, memory_budget_bytes: int) -> str:
    """The faiss factory string for ``n`` vectors of ``dim`` under the budget (module doc)."""
    if n < 0 or dim <= 0 or memory_budget_bytes <= 0:
        raise ValueError(f"need n >= 0, dim > 0 and a positive budget; got {n}, {dim}, {memory_budget_bytes}")
    if n < FLAT_BELOW:
        return "Flat"
    nlist = nlist_for(n)
    if n < IVF_FLAT_BELOW and ivf_bytes(n, dim, nlist, 4 * dim) <= memory_budget_bytes:
        return f"IVF{nlist},Flat"
    if ivf_bytes(n, dim, nlist, dim) <= memory_budget_bytes:
        return f"IVF{nlist},SQ8"
    fitting = [m for m in PQ_SIZES if m < dim and dim % m == 0
               and ivf_bytes(n, dim, nlist, m) <= memory_budget_bytes]
    if fitting:
        return f"IVF{nlist},PQ{fitting[0]}"
    smallest = min((m for m in PQ_SIZES if m < dim and dim % m == 0), default=None)
    if smallest is None:
        return f"IVF{nlist},SQ4"  # no PQ size divides dim: half a byte per dimension
    return f"IVF{nlist},PQ{smallest}"  # nothing fits: the smallest codes (the budget is exceeded)


def is_auto(factory: str | None) -> bool:
    return factory is not None and (factory == AUTO or factory.startswith(AUTO + ":"))


def budget_of(factory: str) -> int:
    """The budget of an ``auto`` / ``auto:<budget>`` spec, in bytes (default: from RAM)."""
    _, _, budget = factory.partition(":")
    return parse_memory(budget) if budget else default_memory_budget()


def resolve_factory(factory: str | None, n: int, dim: int) -> tuple[str, dict[str, Any] | None]:
    """A concrete faiss factory string for ``factory`` (None means ``auto``), and for an auto
    spec the record of what it was chosen from (None for a string given as is)."""
    factory = factory or AUTO
    if not is_auto(factory):
        return factory, None
    budget = budget_of(factory)
    chosen = choose_factory(int(n), int(dim), budget)
    return chosen, {"requested": factory, "n": int(n), "dim": int(dim), "memory_budget_bytes": budget,
                    "chosen": chosen}


def memory_budget_spec(budget: str | None) -> str:
    """The factory spec of ``--factory auto --memory-budget BUDGET`` (checked here)."""
    if budget is None:
        return AUTO
    parse_memory(budget)
    return f"{AUTO}:{budget.strip()}"


def gpu_count() -> int:
    """How many GPUs faiss can use (0 with faiss-cpu or without a CUDA device)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    if get is None or os.environ.get("SCE_NO_GPU"):
        return 0
    try:
        return int(get())
    except RuntimeError:
        return 0
