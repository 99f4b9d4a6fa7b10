"""Train the projection head of the default encoder and measure how well it aligns.

    python -m indexing.encoders.train_default_head            # rebuild the shipped head
    python -m indexing.encoders.train_default_head --no-save  # train + report only

LiT-style: both towers stay frozen (EfficientNet-Lite0 for images, all-MiniLM-L6-v2 for
texts); only a small MLP from the standardised image features (1280-d pooled CNN
features + a 65-d colour histogram, see ``towers.py``) into the 384-d text space is learned, with a symmetric InfoNCE loss against the caption embeddings.
Images with identical captions (the same emoji in several art styles) are positives of
each other. Batches are made of whole emoji families (every skin tone and style of a
name), so the other tones of the same emoji are always in-batch negatives: that is what
makes a caption's skin tone visible in the image embedding.

Data: the sample corpus ``data/sample`` (Google style) and the Apple and Facebook styles
of the same npm package, built on demand with ``data/build_sample_corpus.py`` into the
cache directory (never into the repo). The Twitter style is never trained on; it is only
evaluated, as an art style the head has never seen. 20% of the emoji names (the
``object`` column, i.e. all skin tones of a name) are held out of training, chosen by the
seed, and retrieval is reported separately for seen and held-out names.

Tower features are cached under ``<cache>/train_default_head/`` keyed by the sha256 of
each image file, so re-runs take a minute; a first run encodes ~15k images (~10 min on 2
CPU cores). Everything is seeded; the result is written to
``indexing/encoders/default_head.npz`` (float16) and ``default_head.json`` (the record).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexing.atomic import file_sha256, write_atomically

from .head import ProjectionHead
from .towers import IMAGE_FEATURE_DIM, cache_root

logger = logging.getLogger("indexing.encoders.train_default_head")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TRAIN_STYLES = ("google", "apple", "facebook")
FORBIDDEN_TRAIN_STYLES = ("twitter",)
FEATURE_KEY = "efficientnet-lite0-imagenet-224-avgpool+colour4-white-v1"
TEXT_KEY = "all-minilm-l6-v2-meanpool-l2-v1"


# ------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------
@dataclass
class Corpus:
    style: str
    root: Path
    rows: list[dict]

    @property
    def paths(self) -> list[Path]:
        return [self.root / r["file"] for r in self.rows]

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]

    @property
    def objects(self) -> list[str]:
        return [r["object"] for r in self.rows]


def read_corpus(style: str, root: Path) -> Corpus:
    with open(root / "captions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"{root}/captions.csv has no rows")
    return Corpus(style, root, rows)


def ensure_style(style: str, cache: Path, sample_dir: Path) -> Corpus:
    """The corpus of one art style: ``data/sample`` for google, else built into the cache."""
    if style == "google" and (sample_dir / "captions.csv").is_file():
        return read_corpus(style, sample_dir)
    out = cache / "emoji-corpora" / style
    if not (out / "captions.csv").is_file():
        script = REPO / "data" / "build_sample_corpus.py"
        logger.info("building the %s emoji corpus into %s", style, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(script), "--style", style, "--out", str(out)], check=True)
    return read_corpus(style, out)


def split_names(names: list[str], holdout: float, seed: int) -> set[str]:
    """The held-out names: a seeded ``holdout`` share of the sorted unique names."""
    unique = sorted(set(names))
    rng = np.random.default_rng(seed)
    n_held = int(round(holdout * len(unique)))
    return {unique[i] for i in rng.permutation(len(unique))[:n_held]}


def parse_styles(train: str, evaluate: str) -> tuple[list[str], list[str]]:
    """The comma-separated style lists of the command line; the Twitter style is refused
    for training (it is reserved for independent evaluation)."""
    train_styles = [s.strip() for s in train.split(",") if s.strip()]
    eval_styles = [s.strip() for s in evaluate.split(",") if s.strip()]
    bad = sorted(set(train_styles) & set(FORBIDDEN_TRAIN_STYLES))
    if bad:
        raise SystemExit(f"refusing to train on {bad}: reserved for independent evaluation")
    return train_styles, eval_styles


def load_corpora(train_styles: list[str], eval_styles: list[str], sample_dir: Path, holdout: float,
                 seed: int) -> tuple[dict[str, Corpus], set[str]]:
    """Every style's corpus (built on demand) and the held-out names (from the Google
    corpus when it is loaded, else from the first training style)."""
    corpora = {s: ensure_style(s, cache_root(), sample_dir) for s in dict.fromkeys(train_styles + eval_styles)}
    held = split_names(corpora[train_styles[0]].objects if "google" not in corpora
                       else corpora["google"].objects, holdout, seed)
    return corpora, held


@dataclass
class TrainingPairs:
    """The training samples: seen names only, every training style in order.

    ``rows[style]`` are the corpus rows used from that style; ``caption_ids`` index
    ``captions`` (the sorted distinct captions of all training styles, held-out ones
    included, as in-batch negatives never sampled); ``families`` number the names."""

    rows: dict[str, list[int]]
    caption_ids: np.ndarray
    families: np.ndarray
    captions: list[str]


def training_pairs(corpora: dict[str, Corpus], train_styles: list[str], held: set[str]) -> TrainingPairs:
    all_caps = sorted({cap for s in train_styles for cap in corpora[s].captions})
    cap_index = {c: i for i, c in enumerate(all_caps)}
    obj_index: dict[str, int] = {}
    rows, cids, fams = {}, [], []
    for s in train_styles:
        c = corpora[s]
        keep = [i for i, o in enumerate(c.objects) if o not in held]
        rows[s] = keep
        cids += [cap_index[c.captions[i]] for i in keep]
        fams += [obj_index.setdefault(c.objects[i], len(obj_index)) for i in keep]
    return TrainingPairs(rows, np.asarray(cids), np.asarray(fams), all_caps)


# ------------------------------------------------------------------------------------
# cached tower outputs
# ------------------------------------------------------------------------------------
class KeyedArrayCache:
    """A float32 array per key (hex string), stored in one .npz, written atomically."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = path, dim
        self.index: dict[str, int] = {}
        self.values = np.zeros((0, dim), np.float32)
        if path.is_file():
            with np.load(path, allow_pickle=False) as data:
                keys, values = data["keys"], data["values"]
            if values.shape[1:] == (dim,):
                self.index = {str(k): i for i, k in enumerate(keys)}
                self.values = values.astype(np.float32)

    def get(self, keys: list[str], compute) -> np.ndarray:
        missing = sorted({k for k in keys if k not in self.index})
        if missing:
            new = np.asarray(compute(missing), np.float32)
            base = len(self.values)
            self.values = np.concatenate([self.values, new])
            for i, k in enumerate(missing):
                self.index[k] = base + i
            self._save()
        return self.values[[self.index[k] for k in keys]]

    def _save(self) -> None:
        keys = np.asarray(sorted(self.index, key=self.index.get))

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as fh:  # a file object: savez would append ".npz" to a name
                np.savez(fh, keys=keys, values=self.values)

        write_atomically(self.path, write)


def image_features(corpus: Corpus, encoder, cache_dir: Path) -> np.ndarray:
    cache = KeyedArrayCache(cache_dir / f"image-features-{FEATURE_KEY}.npz", IMAGE_FEATURE_DIM)
    shas = [file_sha256(p) for p in corpus.paths]
    by_sha = dict(zip(shas, corpus.paths))

    def compute(keys):
        logger.info("%s: encoding %d images with EfficientNet-Lite0", corpus.style, len(keys))
        return encoder.encode_image_features([by_sha[k] for k in keys], batch_size=32,
                                            num_workers=2, progress=sys.stderr.isatty())

    return cache.get(shas, compute)


def text_embeddings(texts: list[str], encoder, cache_dir: Path) -> np.ndarray:
    cache = KeyedArrayCache(cache_dir / f"text-embeddings-{TEXT_KEY}.npz", 384)
    keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
    by_key = dict(zip(keys, texts))
    return cache.get(keys, lambda ks: encoder.encode_texts([by_key[k] for k in ks]))


# ------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    hidden: int = 1024
    skip: bool = False
    epochs: int = 60
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.05
    input_noise: float = 0.5
    input_dropout: float = 0.2
    dropout: float = 0.1
    init_temperature: float = 0.05
    seed: int = 0


def family_batches(families: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle families (all samples sharing a name) and pack whole families into batches."""
    order = rng.permutation(families.max() + 1)
    members: dict[int, list[int]] = {}
    for i, f in enumerate(families):
        members.setdefault(int(f), []).append(i)
    batches, current = [], []
    for f in order:
        m = members.get(int(f))
        if not m:
            continue
        if current and len(current) + len(m) > batch_size:
            batches.append(np.asarray(current))
            current = []
        current.extend(m)
    if current:
        batches.append(np.asarray(current))
    return batches


def caption_contrastive_loss(img, cid, t_all, log_scale):
    """Symmetric InfoNCE between unit image embeddings ``img`` (B, d) and the distinct
    captions of the batch (rows ``cid`` of ``t_all``); images sharing a caption are all
    positives of that caption."""
    import torch
    from torch import nn

    uniq, inv = torch.unique(cid, return_inverse=True)
    logits = log_scale.exp().clamp(max=100.0) * img @ t_all[uniq].T  # (B, m)
    loss_i2t = nn.functional.cross_entropy(logits, inv)
    pos = (inv[None, :] == torch.arange(len(uniq))[:, None]).float()  # (m, B)
    logp = nn.functional.log_softmax(logits.T, dim=1)
    loss_t2i = -((logp * pos).sum(1) / pos.sum(1)).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def train_head(x: np.ndarray, text: np.ndarray, caption_ids: np.ndarray, families: np.ndarray,
               cfg: TrainConfig) -> tuple[ProjectionHead, list[float]]:
    """Fit the head: image features ``x`` (n, 1345), their caption ids into ``text`` (m, 384)."""
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mean = x.mean(0)
    std = x.std(0) + 1e-3
    z_all = torch.from_numpy(((x - mean) / std).astype(np.float32))
    t_all = torch.from_numpy(text.astype(np.float32))
    cid = torch.from_numpy(caption_ids.astype(np.int64))

    d_in, d_out = x.shape[1], text.shape[1]
    fc0 = nn.Linear(d_in, cfg.hidden)
    fc1 = nn.Linear(cfg.hidden, d_out)
    skip = nn.Linear(d_in, d_out, bias=False) if cfg.skip else None
    log_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / cfg.init_temperature))))
    modules = [fc0, fc1] + ([skip] if skip is not None else [])
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": cfg.weight_decay},
                             {"params": [log_scale], "weight_decay": 0.0}], lr=cfg.lr)
    schedule = [family_batches(families, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total = sum(len(b) for b in schedule)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    drop = nn.Dropout(cfg.dropout)
    losses = []

    def forward(z, train):
        if train:
            z = z + cfg.input_noise * torch.randn_like(z)
            z = nn.functional.dropout(z, cfg.input_dropout)
        h = nn.functional.gelu(fc0(z))
        if train:
            h = drop(h)
        y = fc1(h)
        if skip is not None:
            y = y + skip(z)
        return nn.functional.normalize(y, dim=-1)

    for epoch, batches in enumerate(schedule):
        epoch_loss = []
        for idx in batches:
            idx_t = torch.from_numpy(idx)
            img = forward(z_all[idx_t], True)
            loss = caption_contrastive_loss(img, cid[idx_t], t_all, log_scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
        if epoch % 10 == 0 or epoch == cfg.epochs - 1:
            logger.info("epoch %3d  loss %.4f  temperature %.4f", epoch, losses[-1],
                        1.0 / log_scale.detach().exp().item())

    def np_(t):
        return t.detach().numpy().astype(np.float32)

    head = ProjectionHead(in_mean=mean.astype(np.float32), in_std=std.astype(np.float32),
                          weights=[np_(fc0.weight).T.copy(), np_(fc1.weight).T.copy()],
                          biases=[np_(fc0.bias), np_(fc1.bias)],
                          skip=np_(skip.weight).T.copy() if skip is not None else None,
                          activation="gelu")
    return head.validate(), losses


# ------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------
def recall_at(query: np.ndarray, gallery: np.ndarray, target: np.ndarray, ks=(1, 10)) -> dict:
    """Share of queries whose target gallery row is within the top k (cosine)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    own = sims[np.arange(len(q)), target]
    rank = (sims > own[:, None]).sum(1)  # 0 = first
    return {f"R@{k}": float((rank < k).mean()) for k in ks} | {"median_rank": float(np.median(rank) + 1)}


def tone_check(image_emb: np.ndarray, text_emb: np.ndarray, corpus: Corpus, mask: np.ndarray) -> dict:
    """For each caption naming a skin tone: is its own image ranked first among the
    tone variants of the same emoji (same name, same style)? Chance is 1/#variants."""
    rows = corpus.rows
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["skin_tone"]:
            groups.setdefault(r["object"], []).append(i)
    hits, chance, dark_hits, dark_chance = [], [], [], []
    for obj, idx in groups.items():
        if len(idx) < 2 or not mask[idx[0]]:
            continue
        sims = text_emb[idx] @ image_emb[idx].T  # caption i vs variant images j
        best = sims.argmax(1)
        for a, i in enumerate(idx):
            ok = float(best[a] == a)
            hits.append(ok)
            chance.append(1.0 / len(idx))
            if rows[i]["skin_tone"] == "dark":
                dark_hits.append(ok)
                dark_chance.append(1.0 / len(idx))
    if not hits:
        return {"n": 0}
    return {"n": len(hits), "top1_among_tones": float(np.mean(hits)), "chance": float(np.mean(chance)),
            "dark_top1_among_tones": float(np.mean(dark_hits)) if dark_hits else None,
            "dark_chance": float(np.mean(dark_chance)) if dark_chance else None, "n_dark": len(dark_hits)}


def evaluate(head: ProjectionHead, feats: np.ndarray, text: np.ndarray, corpus: Corpus,
             held: set[str]) -> dict:
    """:func:`evaluate_embeddings` of the head's image embeddings."""
    return evaluate_embeddings(head.apply(feats), text, corpus, held)


def evaluate_embeddings(img: np.ndarray, text: np.ndarray, corpus: Corpus, held: set[str]) -> dict:
    """Caption -> image retrieval within one style's full gallery, by seen/held-out name.

    ``img`` and ``text``: unit-norm embeddings of the corpus rows' images and captions."""
    target = np.arange(len(corpus.rows))
    is_held = np.asarray([o in held for o in corpus.objects])
    out = {"n_images": len(corpus.rows)}
    for part, mask in (("seen", ~is_held), ("held_out", is_held)):
        if mask.any():
            out[part] = {"n_queries": int(mask.sum()), **recall_at(text[mask], img, target[mask])}
            out[part]["tone"] = tone_check(img, text, corpus, mask)
    return out


# ------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------
def log_results(results: dict) -> None:
    for s, r in results.items():
        for part in ("seen", "held_out"):
            if part in r:
                p = r[part]
                logger.info("%-9s %-8s names: R@1 %.3f  R@10 %.3f  (n=%d)  tone top-1 %.3f (chance %.3f), "
                            "dark %.3f", s, part, p["R@1"], p["R@10"], p["n_queries"],
                            p["tone"].get("top1_among_tones", float("nan")), p["tone"].get("chance", float("nan")),
                            p["tone"].get("dark_top1_among_tones") or float("nan"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=Path, default=REPO / "data" / "sample",
                    help="the Google-style sample corpus (default: data/sample)")
    ap.add_argument("--train-styles", default=",".join(TRAIN_STYLES),
                    help="comma-separated art styles to train on (default %(default)s)")
    ap.add_argument("--eval-styles", default="google,twitter", help="styles to report (default %(default)s)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where tower features are cached (default: <cache root>/train_default_head); the "
                         "other art styles are built into <cache root>/emoji-corpora/<style>; the cache root "
                         "is $SCE_CACHE_DIR or ~/.cache/sce-retrieval")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of names held out (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    ap.add_argument("--input-noise", type=float, default=TrainConfig.input_noise)
    ap.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--out", type=Path, default=HERE / "default_head.npz")
    ap.add_argument("--no-save", action="store_true", help="train and report, write nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    train_styles, eval_styles = parse_styles(args.train_styles, args.eval_styles)
    cache = args.cache_dir or (cache_root() / "train_default_head")
    started = time.time()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from .default_encoder import DefaultEncoder

    encoder = DefaultEncoder(device="cpu")
    corpora, held = load_corpora(train_styles, eval_styles, args.sample, args.holdout, args.seed)
    feats = {s: image_features(c, encoder, cache) for s, c in corpora.items()}
    texts = {s: text_embeddings(c.captions, encoder, cache) for s, c in corpora.items()}

    # training pairs: seen names only, all training styles
    pairs = training_pairs(corpora, train_styles, held)
    x = np.concatenate([feats[s][pairs.rows[s]] for s in train_styles])
    cids, fams = pairs.caption_ids, pairs.families
    text_table = text_embeddings(pairs.captions, encoder, cache)
    cfg = TrainConfig(hidden=args.hidden, epochs=args.epochs, input_noise=args.input_noise,
                      weight_decay=args.weight_decay, lr=args.lr, seed=args.seed)
    logger.info("training on %d pairs (%d captions, %d names held out) from %s",
                len(x), len(set(cids.tolist())), len(held), train_styles)
    t0 = time.time()
    head, losses = train_head(x, text_table, cids, fams, cfg)
    train_seconds = time.time() - t0

    results = {s: evaluate(head, feats[s], texts[s], corpora[s], held) for s in eval_styles}
    log_results(results)
    record = {
        "what": "LiT-style projection head of the default encoder: [EfficientNet-Lite0 pooled features (1280) "
                "+ colour histogram (65)], standardised -> MLP (GELU) -> all-MiniLM-L6-v2 space (384), unit norm",
        "command": "python -m indexing.encoders.train_default_head " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_styles": train_styles,
        "eval_styles": eval_styles,
        "held_out_names": {"share": args.holdout, "seed": args.seed, "count": len(held),
                           "of": len(set(corpora["google"].objects)) if "google" in corpora else None},
        "n_train_pairs": int(len(x)),
        "config": cfg.__dict__,
        "final_loss": losses[-1],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "metric": "caption -> image retrieval in the full gallery of one style (each caption has exactly one "
                  "image there); R@k = share of captions whose image is in the top k. tone: for captions "
                  "naming a skin tone, share whose own image ranks first among the tone variants of the "
                  "same emoji (chance = 1/#variants)",
        "tuning": "hyper-parameters and the colour histogram were chosen on a development split (a further "
                  "20% of the seen names, seed 1), training on google+apple and validating on those names in "
                  "google and facebook; the held-out names and the twitter style were not used for any choice",
        "results": results,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    if not args.no_save:
        head.meta = {"trained_by": "indexing.encoders.train_default_head", "seed": args.seed,
                     "train_styles": train_styles}
        head.save(args.out)
        record_path = args.out.with_suffix(".json")
        record_path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        logger.info("wrote %s (%d bytes) and %s", args.out, args.out.stat().st_size, record_path)
    return record


if __name__ == "__main__":
    main()
