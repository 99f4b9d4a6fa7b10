#!/usr/bin/env python3
"""Build the preliminary concept sets ``data/concepts/<name>.csv`` from the sample corpus.

Standard library only. Reads ``data/sample/captions.csv`` (written by
``build_sample_corpus.py``) and writes three CSV files with the columns ``prompt,image``,
where ``image`` is relative to the CSV's own directory (``../sample/images/...``):

- ``skin_tone.csv``: prompts ``<tone> skin tone``; the five single-tone variants of
  N_SKIN_OBJECTS different emoji, spread over the People & Body subcategories;
- ``gender.csv``: prompts ``a man`` / ``a woman`` / ``a person``; the man, woman and
  gender-neutral versions of the same emoji (default skin tone only);
- ``colour.csv``: prompts ``red``, ``blue``, ...; emoji whose name contains the colour word
  and whose picture shows that colour (no skin tones).

The prompts of a set differ only in the concept. The output is deterministic.

    python data/build_concept_sets.py [--corpus data/sample] [--out data/concepts]
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent

TONE_ORDER = ["light", "medium-light", "medium", "medium-dark", "dark"]
N_SKIN_OBJECTS = 40
# Mean |variant - base| (0..255) below which a tone barely shows (tiny faces: golfers,
# supervillains, horse racing; the Google snowboarder's tones are even pixel-identical).
MIN_TONE_DIFF = 1.5

GENDER_PROMPTS = {"man": "a man", "woman": "a woman", "person": "a person"}
GENDER_ORDER = ["man", "woman", "person"]
MAN, WOMAN, ADULT = "1F468", "1F469", "1F9D1"
MALE_SEQ, FEMALE_SEQ = "-200D-2642-FE0F", "-200D-2640-FE0F"
# Triples that are not built from a ZWJ gender sign or MAN/WOMAN/ADULT + ZWJ + X.
EXTRA_GENDER_TRIPLES = [
    # (man, woman, person) unified code points
    ("1F468", "1F469", "1F9D1"),             # man, woman, adult
    ("1F474", "1F475", "1F9D3"),             # older man, older woman, older adult
    ("1F934", "1F478", "1FAC5"),             # prince, princess, person with crown
    ("1F385", "1F936", "1F9D1-200D-1F384"),  # father christmas, mother christmas, mx claus
]
PLURAL_WORDS = {"men", "women", "people", "wrestlers", "couple", "family"}

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white"]
COLOUR_CATEGORIES_EXCLUDED = {"people & body"}  # red hair, white cane, "white" pointing index
# Unicode names use BLACK/WHITE for filled/outlined glyphs, not for the colour of the
# picture; black and white are only taken from these subcategories ...
BLACK_WHITE_SUBCATEGORIES = {"geometric", "heart", "animal-mammal", "animal-bird", "flag"}
# ... and names whose picture is not (mainly) of the named colour are left out.
COLOUR_EXCLUDED_NAMES = {
    "heavy black heart",          # the red heart
    "black square button",        # black and white pair of squares
    "white square button",
    "mahjong tile red dragon",    # a white tile
    "green salad",                # white bowl, red tomatoes
    "up-pointing small red triangle",    # button glyphs
    "down-pointing small red triangle",
}


def read_corpus(corpus: Path) -> list[dict]:
    with open(corpus / "captions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["sort_order"] = int(r["sort_order"])
    return rows


def image_ref(row: dict, corpus: Path, out: Path) -> str:
    return Path(os.path.relpath(corpus / row["file"], out)).as_posix()


def family_key(unified: str) -> str:
    """Key shared by the gender and facing-direction versions of one emoji."""
    u = unified.replace(MALE_SEQ, "").replace(FEMALE_SEQ, "").replace("-200D-27A1-FE0F", "")
    head, _, rest = u.partition("-200D-")
    if rest and head in (MAN, WOMAN, ADULT):
        u = "P-200D-" + rest
    return u


# --------------------------------------------------------------------------------------

def skin_tone_set(rows: list[dict], n_objects: int | None = N_SKIN_OBJECTS,
                  one_per_family: bool = True) -> list[tuple[str, dict]]:
    by_object: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["variant"] and r["skin_tone"] in TONE_ORDER:  # single-tone variants only
            by_object[r["base_unified"]][r["skin_tone"]] = r
    candidates = []
    for base, tones in by_object.items():
        if set(tones) != set(TONE_ORDER):
            continue
        if len({t["sha256"] for t in tones.values()}) < 5:
            continue
        if min(float(t["tone_diff"] or 0) for t in tones.values()) < MIN_TONE_DIFF:
            continue
        first = tones["light"]
        candidates.append((first["sort_order"], base, first["subcategory"], tones))
    candidates.sort(key=lambda c: (c[0], c[1]))

    # Round robin over subcategories (in corpus order), one emoji per family (so not
    # man running + woman running + runner) until every family is used once.
    queues: dict[str, list] = {}
    for c in candidates:
        queues.setdefault(c[2], []).append(c)
    chosen, families = [], set()
    limit = n_objects if n_objects is not None else len(candidates)
    while len(chosen) < limit and any(queues.values()):
        for sub in list(queues):
            q = queues[sub]
            while one_per_family and q and family_key(q[0][1]) in families:
                q.pop(0)
            if q and len(chosen) < limit:
                c = q.pop(0)
                chosen.append(c)
                families.add(family_key(c[1]))
    chosen.sort(key=lambda c: (c[0], c[1]))
    out = []
    for _, _, _, tones in chosen:
        for tone in TONE_ORDER:
            out.append((f"{tone} skin tone", tones[tone]))
    return out


def gender_set(rows: list[dict]) -> list[tuple[str, dict]]:
    base = {r["unified"]: r for r in rows if not r["variant"] and r["category"] == "people & body"}
    triples: list[tuple[str, str, str]] = []
    for u in base:
        # person X / man X / woman X via the ZWJ gender signs (RUNNER, MAN RUNNING, ...)
        man, woman = u + MALE_SEQ, u + FEMALE_SEQ
        if man in base and woman in base:
            triples.append((man, woman, u))
        # facing-right versions put the sign before the arrow
        if u.endswith("-200D-27A1-FE0F"):
            stem = u[: -len("-200D-27A1-FE0F")]
            man, woman = stem + MALE_SEQ + "-200D-27A1-FE0F", stem + FEMALE_SEQ + "-200D-27A1-FE0F"
            if man in base and woman in base:
                triples.append((man, woman, u))
        # ADULT + ZWJ + X / MAN + ZWJ + X / WOMAN + ZWJ + X (FARMER, MAN FARMER, ...)
        head, _, rest = u.partition("-200D-")
        if head == ADULT and rest:
            man, woman = f"{MAN}-200D-{rest}", f"{WOMAN}-200D-{rest}"
            if man in base and woman in base:
                triples.append((man, woman, u))
    triples += [t for t in EXTRA_GENDER_TRIPLES if all(x in base for x in t)]

    keep = []
    for t in set(triples):
        group = [base[x] for x in t]
        if any(g["subcategory"] == "family" for g in group):
            continue
        words = set(re.findall(r"[a-z]+", " ".join(g["caption"] for g in group)))
        if words & PLURAL_WORDS:
            continue
        if len({g["sha256"] for g in group}) < 3:
            continue
        keep.append(group)
    keep.sort(key=lambda g: (g[2]["sort_order"], g[2]["unified"]))
    out = []
    for group in keep:
        for gender, r in zip(GENDER_ORDER, group):
            out.append((GENDER_PROMPTS[gender], r))
    return out


def colour_set(rows: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for colour in COLOURS:
        hits = []
        for r in rows:
            if r["variant"] or r["category"] in COLOUR_CATEGORIES_EXCLUDED:
                continue
            if colour not in re.findall(r"[a-z]+", r["caption"]):
                continue
            if r["caption"] in COLOUR_EXCLUDED_NAMES:
                continue
            if colour in ("black", "white") and r["subcategory"] not in BLACK_WHITE_SUBCATEGORIES:
                continue
            if any(c in re.findall(r"[a-z]+", r["caption"]) for c in COLOURS if c != colour):
                continue  # two colour words: ambiguous
            hits.append(r)
        hits.sort(key=lambda r: (r["sort_order"], r["unified"]))
        out += [(colour, r) for r in hits]
    return out


def write_set(path: Path, pairs: list[tuple[str, dict]], corpus: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["prompt", "image"])
        for prompt, row in pairs:
            w.writerow([prompt, image_ref(row, corpus, path.parent)])
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=HERE / "sample")
    ap.add_argument("--out", type=Path, default=HERE / "concepts")
    args = ap.parse_args(argv)
    corpus, out = args.corpus.resolve(), args.out.resolve()
    rows = read_corpus(corpus)
    out.mkdir(parents=True, exist_ok=True)
    sets = {
        "skin_tone": skin_tone_set(rows),
        # Every qualifying emoji in all five tones: a larger preliminary set removes the
        # tone more thoroughly (see the README's measurements).
        "skin_tone_large": skin_tone_set(rows, n_objects=None, one_per_family=False),
        "gender": gender_set(rows),
        "colour": colour_set(rows),
    }
    for name, pairs in sets.items():
        write_set(out / f"{name}.csv", pairs, corpus)
        prompts = sorted({p for p, _ in pairs})
        print(f"{name}.csv: {len(pairs)} rows, {len(prompts)} prompts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
