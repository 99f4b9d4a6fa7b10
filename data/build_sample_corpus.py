#!/usr/bin/env python3
"""Build the emoji sample corpus from the npm package ``emoji-datasource-<style>``.

Standalone (standard library + Pillow + numpy; no project imports)::

    python data/build_sample_corpus.py                      # google style -> data/sample
    python data/build_sample_corpus.py --style apple --out /tmp/emoji-apple

What it does:

1. ``npm pack emoji-datasource-<style>@<version>`` into a temporary directory (the npm
   registry is the only network access), or uses ``--tarball`` if given;
2. reads ``package/emoji.json`` and every 64 px image ``package/img/<style>/64/<image>``
   listed there, including the skin-tone variants (``skin_variations``), keeping only those
   with ``has_img_<style>`` true and whose file is in the package;
3. composites each image on white (RGBA -> RGB) and saves it as an optimised PNG under
   ``<out>/images/<unified, lower case>.png``;
4. writes ``<out>/captions.csv`` (one row per image, sorted by ``sort_order`` then variant)
   and ``<out>/LICENSE-NOTICE.txt``.

The output is deterministic for a given package version and Pillow version, and it is
written to a temporary sibling directory first, then renamed into place, so an interrupted
run never leaves a half-written corpus behind.

The Twitter style is reserved for independent evaluation: never train on it.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

STYLES = ("google", "apple", "facebook", "twitter")
DEFAULT_VERSION = "16.0.0"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "sample"
APACHE_LICENSE_FILE = HERE / "licenses" / "Apache-2.0.txt"

# Fitzpatrick modifiers -> CLDR tone names.
TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}

# What the package README says about each image set, restated (see also the README excerpt
# copied into the notice).
STYLE_LICENSES = {
    "google": (
        "Google images: Noto Emoji (https://github.com/googlefonts/noto-emoji), "
        "Copyright Google Inc., licensed under the Apache License, Version 2.0. "
        "The full license text is reproduced at the end of this file."
    ),
    "apple": (
        "Apple images: Copyright (c) Apple Inc. The package states that they are NOT "
        "licensed for commercial usage. Do not redistribute them with this project."
    ),
    "facebook": (
        "Facebook images: Copyright (c) Facebook, Inc. The package states that they have "
        "no clear licensing. Do not redistribute them with this project."
    ),
    "twitter": (
        "Twitter images: Twemoji (https://github.com/jdecked/twemoji), licensed under "
        "Creative Commons Attribution 4.0 (CC-BY 4.0, "
        "https://creativecommons.org/licenses/by/4.0/). Graphics by Twitter, Inc. and "
        "other contributors. RESERVED FOR INDEPENDENT EVALUATION: never train on them."
    ),
}

README_STYLE_WORD = {"google": "Google", "apple": "Apple", "facebook": "Facebook", "twitter": "Twitter"}

COLUMNS = [
    "file",          # relative to the corpus directory
    "caption",       # lower-case name (+ ", <tone> skin tone" for each tone)
    "object",        # caption without the tone part: all tones of one emoji share it
    "category",
    "subcategory",
    "skin_tone",     # "" | "medium" | "light, dark" (two-tone variants, one per person)
    "unified",       # code points of this image, upper case, '-' separated
    "short_name",
    "gender",        # man | woman | person | mixed | ""
    "name",          # the package's raw name, lower case (caption may differ, see notes)
    "short_names",   # '|' separated
    "variant",       # the skin_variations key ("1F3FD", "1F3FB-1F3FF") or ""
    "base_unified",  # unified of the emoji this variant belongs to (= unified for bases)
    "sort_order",
    "added_in",
    "tone_diff",     # variants only: mean |variant - base| over RGB pixels, 0..255
    "sha256",        # of the written PNG file (equal pixels -> equal hash)
]

MAN_WORDS = {"man", "men", "boy", "boys", "merman", "prince", "father", "gentleman"}
WOMAN_WORDS = {"woman", "women", "girl", "girls", "mermaid", "princess", "mother", "mrs"}
PERSON_WORDS = {"person", "people", "adult", "adults", "child", "children", "merperson", "mx"}
MALE_SIGN, FEMALE_SIGN = "2642", "2640"
ADULT = "1F9D1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Fetching the package
# --------------------------------------------------------------------------------------

def npm_pack(package: str, dest: Path) -> Path:
    """Run ``npm pack <package>`` in ``dest`` and return the tarball path."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not on PATH; install Node.js/npm or pass --tarball FILE.tgz")
    log(f"npm pack {package} ...")
    proc = subprocess.run(
        [npm, "pack", package, "--json", "--silent"],
        cwd=dest, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"npm pack {package} failed:\n{proc.stderr.strip()}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        tarballs = sorted(dest.glob("*.tgz"))
        if len(tarballs) != 1:
            raise SystemExit(f"cannot find the tarball written by npm pack in {dest}")
        filename = tarballs[0].name
    # npm may put scoped-name slashes into dashes; the file sits in dest either way.
    path = dest / Path(filename).name
    if not path.is_file():
        raise SystemExit(f"npm pack reported {filename}, but {path} does not exist")
    return path


def extract(tarball: Path, dest: Path, style: str) -> Path:
    """Extract the files we need (metadata + 64 px images of ``style``); return package dir."""
    wanted_prefix = f"package/img/{style}/64/"
    wanted_files = {"package/emoji.json", "package/LICENSE", "package/README.md",
                    "package/package.json"}
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and (m.name in wanted_files or m.name.startswith(wanted_prefix))]
        tar.extractall(dest, members=members, filter="data")
    pkg = dest / "package"
    if not (pkg / "emoji.json").is_file():
        raise SystemExit(f"{tarball} has no package/emoji.json")
    return pkg


def npm_integrity(path: Path) -> str:
    """The tarball's Subresource Integrity string as npm prints it (sha512-<base64>)."""
    h = hashlib.sha512(path.read_bytes())
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

def tone_names(variant_key: str) -> list[str]:
    """'1F3FB-1F3FF' -> ['light', 'dark']; a repeated tone ('1F3FB-1F3FB') is named once."""
    names: list[str] = []
    for cp in variant_key.split("-"):
        tone = TONES[cp.upper()]
        if tone not in names:
            names.append(tone)
    return names


def name_gender(name: str) -> str:
    words = set(re.findall(r"[a-z]+", name.lower()))
    man, woman, person = bool(words & MAN_WORDS), bool(words & WOMAN_WORDS), bool(words & PERSON_WORDS)
    if man and woman:
        return "mixed"
    if man:
        return "man"
    if woman:
        return "woman"
    if person:
        return "person"
    return ""


def emoji_gender(entry: dict, all_unified: set[str]) -> str:
    """Gender of the depicted person(s): from the ZWJ gender signs where present, else the name.

    A base emoji that has male/female sign sequences (e.g. RUNNER -> MAN RUNNING) is the
    gender-neutral "person" even when its old Unicode name says otherwise (MAN WITH TURBAN).
    """
    if entry.get("category") != "People & Body":
        return ""
    unified = entry["unified"].upper()
    cps = unified.split("-")
    if MALE_SIGN in cps and FEMALE_SIGN not in cps:
        return "man"
    if FEMALE_SIGN in cps and MALE_SIGN not in cps:
        return "woman"
    if (f"{unified}-200D-{MALE_SIGN}-FE0F" in all_unified
            or f"{unified}-200D-{FEMALE_SIGN}-FE0F" in all_unified):
        return "person"
    gender = name_gender(entry["name"])
    if not gender and cps[0] == ADULT:  # FARMER = ADULT + ZWJ + EAR OF RICE
        gender = "person"
    return gender


def base_captions(entries: list[dict]) -> dict[str, str]:
    """unified -> caption (lower-case name). Names shared by several emoji are made unique
    with the emoji's short name where that tells them apart (MAN IN TUXEDO is both 1F935,
    short name person_in_tuxedo, and 1F935-200D-2642-FE0F, man_in_tuxedo)."""
    counts: dict[str, int] = {}
    for e in entries:
        key = e["name"].lower()
        counts[key] = counts.get(key, 0) + 1
    out: dict[str, str] = {}
    taken = {k for k, c in counts.items() if c == 1}
    for e in entries:
        name = e["name"].lower()
        if counts[name] > 1:
            alt = e["short_name"].replace("_", " ").lower()
            if alt != name and alt not in taken and alt not in counts:
                name = alt
            taken.add(name)
        out[e["unified"]] = name
    return out


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------

def load_on_white(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def save_png(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------

def build(pkg: Path, out_tmp: Path, style: str, package_spec: str, tarball_sha256: str,
          integrity: str) -> dict:
    entries = json.loads((pkg / "emoji.json").read_text(encoding="utf-8"))
    entries.sort(key=lambda e: (e["sort_order"], e["unified"]))
    img_dir = pkg / "img" / style / "64"
    has_key = f"has_img_{style}"

    all_unified = {e["unified"].upper() for e in entries}
    captions = base_captions(entries)
    (out_tmp / "images").mkdir(parents=True)

    rows: list[dict] = []
    stats = {"listed": 0, "no_flag": 0, "missing_file": [], "not_64": [], "renamed": []}
    for e in entries:
        caption = captions[e["unified"]]
        if caption != e["name"].lower():
            stats["renamed"].append((e["unified"], e["name"].lower(), caption))
        gender = emoji_gender(e, all_unified)
        items = [("", e)] + sorted((e.get("skin_variations") or {}).items())
        base_pixels = None
        for variant_key, v in items:
            stats["listed"] += 1
            if not v.get(has_key, False):
                stats["no_flag"] += 1
                continue
            src = img_dir / v["image"]
            if not src.is_file():
                stats["missing_file"].append(v["image"])
                continue
            img = load_on_white(src)
            if img.size != (64, 64):
                stats["not_64"].append((v["image"], img.size))
                img = img.resize((64, 64), Image.Resampling.LANCZOS)
            pixels = np.asarray(img, dtype=np.int16)
            rel = f"images/{v['unified'].lower()}.png"
            dst = out_tmp / rel
            save_png(img, dst)
            if variant_key:
                tones = tone_names(variant_key)
                full_caption = caption + "".join(f", {t} skin tone" for t in tones)
                skin_tone = ", ".join(tones)
                tone_diff = ("" if base_pixels is None
                             else f"{float(np.abs(pixels - base_pixels).mean()):.3f}")
            else:
                full_caption, skin_tone, tone_diff = caption, "", ""
                base_pixels = pixels
            rows.append({
                "file": rel,
                "caption": full_caption,
                "object": caption,
                "category": e["category"].lower(),
                "subcategory": e["subcategory"].lower(),
                "skin_tone": skin_tone,
                "unified": v["unified"].upper(),
                "short_name": e["short_name"],
                "gender": gender,
                "name": e["name"].lower(),
                "short_names": "|".join(e.get("short_names") or [e["short_name"]]),
                "variant": variant_key.upper(),
                "base_unified": e["unified"].upper(),
                "sort_order": e["sort_order"],
                "added_in": v.get("added_in") or e.get("added_in") or "",
                "tone_diff": tone_diff,
                "sha256": sha256_file(dst),
            })

    with open(out_tmp / "captions.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    write_notice(pkg, out_tmp / "LICENSE-NOTICE.txt", style, package_spec, tarball_sha256,
                 integrity, len(rows))
    stats["rows"] = len(rows)
    return stats


def readme_license_lines(pkg: Path, style: str) -> list[str]:
    readme = (pkg / "README.md")
    if not readme.is_file():
        return []
    lines = readme.read_text(encoding="utf-8").splitlines()
    word = README_STYLE_WORD[style]
    keep = [ln for ln in lines if ln.startswith("* ") and word in ln and "images" in ln]
    keep += [ln for ln in lines if ln.startswith("|") and ln.split("|")[1].strip() in (word, "Image Set")]
    return keep


def write_notice(pkg: Path, path: Path, style: str, package_spec: str, tarball_sha256: str,
                 integrity: str, n_images: int) -> None:
    pkg_json = json.loads((pkg / "package.json").read_text(encoding="utf-8"))
    license_text = (pkg / "LICENSE").read_text(encoding="utf-8").strip()
    parts = [
        "Sample corpus: license notice",
        "=============================",
        "",
        f"The {n_images} images in images/ and the names, categories and code points in",
        f"captions.csv come from the npm package {package_spec}",
        f"(\"{pkg_json.get('name')}\" version {pkg_json.get('version')}, "
        f"license {pkg_json.get('license')}, {pkg_json.get('homepage')}),",
        "fetched with `npm pack` from the npm registry by data/build_sample_corpus.py.",
        f"Tarball sha256: {tarball_sha256}",
    ]
    if integrity:
        parts.append(f"npm integrity:  {integrity}")
    parts += [
        "",
        f"Images: img/{style}/64/*.png of that package, composited on a white background",
        "(RGBA -> RGB) and re-encoded as optimised PNG files named <unified code points>.png.",
        "Captions are the package's emoji names in lower case plus the skin tone(s).",
        "",
        "Image license",
        "-------------",
        STYLE_LICENSES[style],
        "",
    ]
    excerpt = readme_license_lines(pkg, style)
    if excerpt:
        parts += ["What the package README says about this image set:", ""]
        parts += ["    " + ln for ln in excerpt]
        parts.append("")
    parts += [
        "Data license (emoji-datasource, by Cal Henderson / iamcal): MIT",
        "----------------------------------------------------------------",
        "",
        license_text,
        "",
    ]
    if style == "google":
        if not APACHE_LICENSE_FILE.is_file():
            raise SystemExit(f"missing {APACHE_LICENSE_FILE} (the Apache-2.0 text for the notice)")
        parts += [
            "Apache License 2.0 (applies to the Noto Emoji images)",
            "-----------------------------------------------------",
            "",
            APACHE_LICENSE_FILE.read_text(encoding="utf-8").strip("\n"),
            "",
        ]
    path.write_text("\n".join(parts), encoding="utf-8")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` into place at ``out`` (replacing an existing ``out``)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style", choices=STYLES, default="google",
                    help="image set: emoji-datasource-<style> (default google). "
                         "twitter is for independent evaluation only, never for training.")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="package version (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default data/sample for google; required otherwise)")
    ap.add_argument("--tarball", type=Path, default=None,
                    help="use this already downloaded .tgz instead of running npm pack")
    args = ap.parse_args(argv)

    if args.out is None:
        if args.style != "google":
            ap.error("--out is required for styles other than google (data/sample is the google corpus)")
        args.out = DEFAULT_OUT
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    package_spec = f"emoji-datasource-{args.style}@{args.version}"

    with tempfile.TemporaryDirectory(prefix="emoji-npm-") as work:
        work_dir = Path(work)
        if args.tarball is not None:
            tarball = args.tarball.resolve()
        else:
            tarball = npm_pack(package_spec, work_dir)
        pkg = extract(tarball, work_dir / "x", args.style)
        pkg_json = json.loads((pkg / "package.json").read_text(encoding="utf-8"))
        expect_name = f"emoji-datasource-{args.style}"
        if pkg_json.get("name") != expect_name or pkg_json.get("version") != args.version:
            raise SystemExit(f"{tarball} is {pkg_json.get('name')}@{pkg_json.get('version')}, "
                             f"expected {package_spec}")
        tar_sha = sha256_file(tarball)
        integrity = npm_integrity(tarball)

        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            log(f"building {package_spec} -> {out}")
            stats = build(pkg, tmp, args.style, package_spec, tar_sha, integrity)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    log(f"listed {stats['listed']} images, wrote {stats['rows']}; "
        f"has_img_{args.style}=false: {stats['no_flag']}; "
        f"listed but missing: {len(stats['missing_file'])}; not 64x64: {len(stats['not_64'])}")
    for item in stats["missing_file"]:
        log(f"  missing file: {item}")
    for item, size in stats["not_64"]:
        log(f"  resized {item} from {size}")
    for unified, old, new in stats["renamed"]:
        log(f"  duplicate name {old!r}: {unified} captioned {new!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
