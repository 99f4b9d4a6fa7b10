"""Build the shipped TEXTSPAN text banks (data/text_banks/*.txt) from the corpus metadata.

``python data/build_text_banks.py`` rewrites ``data/text_banks/general.txt``: one text a
line, made from the sample corpus's metadata (data/sample/captions.csv: its object names,
categories, subcategories and skin tones) and a small written vocabulary (colours, skin tones,
shapes, categories, objects, people), each put in a few fixed templates. No model writes
them. The result is deterministic: the sampling of object names is seeded and the lines are
sorted, so a rerun produces the same bytes.
"""
from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPTIONS = HERE / "sample" / "captions.csv"
OUT = HERE / "text_banks" / "general.txt"
SEED = 14
OBJECT_SAMPLE = 600  # object names drawn from the corpus (of ~3.8k rows)

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
           "grey", "gold", "silver", "beige", "turquoise"]
SKIN_TONES = ["light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone",
              "dark skin tone", "pale skin", "dark skin", "yellow skin"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "diamond", "round shape", "long thin shape",
          "arrow", "cross", "spiral", "flat shape"]
CATEGORIES = ["face", "animal", "plant", "food", "drink", "vehicle", "building", "flag", "symbol", "sign",
              "tool", "clothing", "sport", "weather", "hand gesture", "number", "letter", "clock", "music"]
OBJECTS = ["cat", "dog", "bird", "fish", "tree", "flower", "fruit", "car", "train", "plane", "house",
           "ball", "book", "phone", "cup", "hat", "shoe", "moon", "sun", "fire", "water", "heart",
           "eye", "hand", "mouth", "smile", "tear"]
PEOPLE = ["man", "woman", "person", "child", "baby", "boy", "girl", "old man", "old woman",
          "family", "couple", "people", "worker", "athlete"]
MOODS = ["happy", "sad", "angry", "surprised", "smiling", "crying", "laughing", "sleepy"]


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an angry man", "a red cat")."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _column_values(rows: list[dict], column: str) -> set[str]:
    return {value for row in rows if (value := (row.get(column) or "").strip())}


def build_bank(captions: Path = CAPTIONS, seed: int = SEED) -> list[str]:
    """The sorted, de-duplicated lines of the general bank."""
    with captions.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    objects = sorted(_column_values(rows, "object"))
    rng = random.Random(seed)
    texts: set[str] = set()
    texts.update(f"an emoji of {o}" for o in rng.sample(objects, min(OBJECT_SAMPLE, len(objects))))
    texts.update(f"an emoji in the category {c}" for c in _column_values(rows, "category"))
    texts.update(f"an emoji of {_a(s.replace('-', ' '))}" for s in _column_values(rows, "subcategory"))
    texts.update(f"an emoji with {t} skin tone" for t in _column_values(rows, "skin_tone"))
    texts.update(_a(f"{c} emoji") for c in COLOURS)
    texts.update(f"something {c}" for c in COLOURS)
    texts.update(f"a person with {t}" for t in SKIN_TONES)
    texts.update(_a(s) for s in SHAPES)
    texts.update(f"an emoji of {_a(c)}" for c in CATEGORIES)
    texts.update(_a(f"{c} {o}") for c in COLOURS[:8] for o in OBJECTS)
    texts.update(f"a picture of {_a(o)}" for o in OBJECTS)
    texts.update(_a(p) for p in PEOPLE)
    texts.update(_a(f"{m} {p}") for m in MOODS for p in PEOPLE[:6])
    texts.update(_a(f"{m} face") for m in MOODS)
    return sorted(t.replace("\n", " ").strip() for t in texts if t.strip())


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else OUT
    lines = build_bank()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} texts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
