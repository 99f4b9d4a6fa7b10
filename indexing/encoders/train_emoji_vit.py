"""Train the ``emoji-vit`` image tower (an open_clip ViT) and measure how well it aligns.

    python -m indexing.encoders.train_emoji_vit            # rebuild the shipped weights (the defaults are
                                                           # the record's config: tests pin them together)
    python -m indexing.encoders.train_emoji_vit --no-save  # train + report only

No pretrained ViT can be had offline, so a small one is trained from scratch on the CPU. The
data, the held-out names and the evaluation are the default head's (imported from
:mod:`indexing.encoders.train_default_head`): Google, Apple and Facebook emoji styles, the same
seeded 20 % of names held out, the Twitter style never trained on, caption -> image retrieval
in the full gallery of one style.

The loss mixes two targets per image:

- distillation: ``1 - cos`` to the default encoder's 384-d embedding of the same image (the
  teacher; its embeddings are cached by image sha256 under ``<cache>/train_emoji_vit/``);
- LiT-style: the default head's symmetric InfoNCE against the frozen all-MiniLM-L6-v2 caption
  embeddings, with whole emoji families per batch (every tone and style of a name), so the
  other tones are always in-batch negatives;
- optionally (``--teacher-contrast-weight``), relational distillation: InfoNCE of each image's
  embedding against the batch's teacher embeddings, its own teacher embedding the positive (on
  a dev split, 0.5 beat plain cosine distillation after 30 epochs: see the record's ``tuning``).

With ``--views N``, a seeded pool of N extra images made from the training images (blends, crops
and halves of two names: :mod:`indexing.encoders.distill_views`) with their teacher embeddings
joins every step (``--views-per-batch``), with the two distillation terms only: the student
sees the teacher's function on many more inputs than the captioned ones.

Augmentation: a small random zoom (scale in [1 - s, 1 + s]) and shift, filled with the white
background, on the preprocessed tensors. No flips: emoji have a direction (arrows, "facing
right", left/right hands) that captions name; no colour jitter: colours and skin tones are
what captions name. Zoom/shift is what separates the art styles (each draws at its own size
and position in the 64 px square), and leaves the teacher's target valid.

Everything is seeded; the tower runs on ``--threads`` CPU threads. The result is written to
``indexing/encoders/emoji_vit.safetensors`` (float16; the model config is
``emoji_vit.json``) and ``emoji_vit_record.json`` (the record); the figures in the record
are measured on the float16 weights as shipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexing.atomic import file_sha256, write_atomically

from . import train_default_head as tdh
from .distill_views import DistillViews, cached_views
from .emoji_vit import CONFIG_PATH, WEIGHTS_PATH, EmojiVitEncoder, build_visual, read_config
from .towers import TEXT_DIM, cache_root

logger = logging.getLogger("indexing.encoders.train_emoji_vit")

TEACHER_KEY = "default-encoder-head"


@dataclass
class VitTrainConfig:
    """The training settings; the defaults are the shipped weights' (``emoji_vit_record.json``)."""

    epochs: int = 60
    batch_size: int = 96
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.08
    distill_weight: float = 1.0
    caption_weight: float = 0.25
    teacher_contrast_weight: float = 0.5  # in-batch InfoNCE of student vs teacher embeddings
    init_temperature: float = 0.05
    aug_scale: float = 0.12
    aug_shift: float = 0.08
    views: int = 30_000  # extra distillation views made from the training images (distill_views)
    views_per_batch: int = 96
    seed: int = 0


# ------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------
def teacher_embeddings(corpus: tdh.Corpus, rows: list[int], encoder, feature_cache: Path,
                       cache_dir: Path) -> np.ndarray:
    """The default encoder's unit image embeddings of the given rows of ``corpus``, cached by
    image sha256 (the key names the head file's sha256, so a rebuilt head is a new cache).
    Only these rows go through EfficientNet (its features land in the default head's cache)."""
    corpus = tdh.Corpus(corpus.style, corpus.root, [corpus.rows[i] for i in rows])
    head_sha = file_sha256(encoder.head_path)[:16]
    cache = tdh.KeyedArrayCache(cache_dir / f"teacher-{TEACHER_KEY}-{head_sha}.npz", TEXT_DIM)
    shas = [file_sha256(p) for p in corpus.paths]

    def compute(keys):
        feats = tdh.image_features(corpus, encoder, feature_cache)  # the default head's own cache
        first = {}
        for i, sha in enumerate(shas):
            first.setdefault(sha, i)
        return encoder.head.apply(feats[[first[k] for k in keys]])

    return cache.get(shas, compute)


def load_pixels(corpus: tdh.Corpus, rows: list[int], student: EmojiVitEncoder):
    """The student's preprocessed input of the given rows, ``(n, 3, H, W)`` float32."""
    return student.preprocess_batch([corpus.paths[i] for i in rows])


def augment(x, generator, scale: float, shift: float):
    """Random zoom/shift of a normalised batch; outside pixels take the border colour
    (the white background)."""
    import torch
    from torch import nn

    n = x.shape[0]
    s = 1.0 + scale * (2.0 * torch.rand(n, generator=generator) - 1.0)
    t = shift * (2.0 * torch.rand(n, 2, generator=generator) - 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, :, 2] = t
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------
def teacher_contrastive_loss(img, teach, temperature: float):
    """Relational distillation: InfoNCE of each unit student embedding ``img`` (B, d) against
    the batch's teacher embeddings ``teach`` (B, d), its own being the positive. Batches hold
    whole families, so an emoji's tone variants are its hard negatives."""
    import torch
    from torch import nn

    logits = img @ teach.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]))


def train_visual(visual, pixels, teacher: np.ndarray, text: np.ndarray, caption_ids: np.ndarray,
                 families: np.ndarray, cfg: VitTrainConfig, checkpoint=None,
                 view_pixels=None, view_teacher: np.ndarray | None = None) -> list[float]:
    """Fit ``visual`` (in place) on ``pixels`` (n, 3, H, W), their teacher embeddings
    (n, 384; a NaN row: no teacher for that image, caption loss only) and caption ids into
    ``text`` (m, 384). With ``view_pixels`` (v, 3, H, W) and their ``view_teacher`` (v, 384),
    every step adds ``cfg.views_per_batch`` of them (cycled in a seeded order) to the batch,
    with the distillation terms only (they have no caption). Returns the mean loss per epoch."""
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    t_all = torch.from_numpy(text.astype(np.float32))
    has_teacher = torch.from_numpy(np.isfinite(teacher).all(1))
    teach = torch.from_numpy(np.nan_to_num(teacher.astype(np.float32)))
    cid = torch.from_numpy(caption_ids.astype(np.int64))
    n_views = 0 if view_pixels is None else len(view_pixels)
    per_batch = min(cfg.views_per_batch, n_views)
    if n_views:
        view_teach = torch.from_numpy(view_teacher.astype(np.float32))
        view_order, view_at = rng.permutation(n_views), 0
    log_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / cfg.init_temperature))))
    decay = [p for n, p in visual.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in visual.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay + [log_scale], "weight_decay": 0.0}], lr=cfg.lr)
    schedule = [tdh.family_batches(families, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total = sum(len(b) for b in schedule)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup)
    visual.train()
    losses = []
    for epoch, batches in enumerate(schedule):
        t0, epoch_loss, epoch_cos = time.time(), [], []
        for idx in batches:
            idx_t = torch.from_numpy(idx)
            x, targets, has = pixels[idx_t], teach[idx_t], has_teacher[idx_t]
            if per_batch:
                if view_at + per_batch > n_views:
                    view_order, view_at = rng.permutation(n_views), 0
                v_t = torch.from_numpy(view_order[view_at:view_at + per_batch])
                view_at += per_batch
                x = torch.cat([x, view_pixels[v_t].float()])
                targets = torch.cat([targets, view_teach[v_t]])
                has = torch.cat([has, torch.ones(per_batch, dtype=torch.bool)])
            x = augment(x, generator, cfg.aug_scale, cfg.aug_shift)
            img_all = nn.functional.normalize(visual(x), dim=-1)
            img = img_all[:len(idx)]  # the labelled images; the rest are views
            cos = (img_all * targets).sum(1)[has].mean() if bool(has.any()) else img.new_tensor(1.0)
            loss = cfg.distill_weight * (1.0 - cos)
            if cfg.teacher_contrast_weight and int(has.sum()) > 1:
                loss = loss + cfg.teacher_contrast_weight * teacher_contrastive_loss(
                    img_all[has], targets[has], cfg.init_temperature)
            if cfg.caption_weight:
                loss = loss + cfg.caption_weight * tdh.caption_contrastive_loss(img, cid[idx_t], t_all, log_scale)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(visual.parameters(), 1.0)
            opt.step()
            sched.step()
            epoch_loss.append(loss.item())
            if bool(has.any()):
                epoch_cos.append(cos.item())
        losses.append(float(np.mean(epoch_loss)))
        epoch_cos = epoch_cos or [float("nan")]
        logger.info("epoch %3d  loss %.4f  cos to teacher %.3f  temperature %.4f  (%.0f s, %d steps)",
                    epoch, losses[-1], float(np.mean(epoch_cos)), 1.0 / log_scale.detach().exp().item(),
                    time.time() - t0, len(batches))
        if checkpoint is not None:
            checkpoint(visual, epoch)
    visual.eval()
    return losses


def distillation_views(corpora: dict, train_styles: list[str], names_held: set[str], run_held: set[str],
                       n: int, seed: int, teacher_encoder, cache: Path) -> DistillViews:
    """The cached pool of ``n`` views made from every training style's images of the names
    not in ``names_held`` (one pool for a run and its --dev runs), keeping the views whose
    sources are all outside ``run_held`` (the names this run holds out)."""
    paths, objects = [], []
    for s in train_styles:
        c = corpora[s]
        keep = [i for i, o in enumerate(c.objects) if o not in names_held]
        paths += [c.paths[i] for i in keep]
        objects += [c.objects[i] for i in keep]
    family = {o: i for i, o in enumerate(sorted(set(objects)))}
    key = f"{TEACHER_KEY}-{file_sha256(teacher_encoder.head_path)[:16]}"
    views = cached_views(paths, np.asarray([family[o] for o in objects]), n, seed, teacher_encoder, cache, key)
    return views.only_sources(np.asarray([o not in run_held for o in objects]))


def half_state(visual) -> dict:
    """The tower's weights as shipped: float16, contiguous."""
    return {k: v.detach().to("cpu").half().contiguous() for k, v in visual.state_dict().items()}


def save_weights(state: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    def write(temporary: Path) -> None:
        save_file(state, str(temporary), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(temporary, 0o644)

    write_atomically(path, write)


# ------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=Path, default=tdh.REPO / "data" / "sample",
                    help="the Google-style sample corpus (default: data/sample)")
    ap.add_argument("--train-styles", default=",".join(tdh.TRAIN_STYLES),
                    help="comma-separated art styles to train on (default %(default)s)")
    ap.add_argument("--eval-styles", default="google,twitter", help="styles to report (default %(default)s)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache root of the tower features (<dir>/train_default_head, shared with the default "
                         "head) and teacher embeddings (<dir>/train_emoji_vit); default: the cache root, "
                         "$SCE_CACHE_DIR or ~/.cache/sce-retrieval")
    ap.add_argument("--config", type=Path, default=CONFIG_PATH, help="the model config (default: emoji_vit.json)")
    ap.add_argument("--teacher-styles", default=None,
                    help="styles whose images get the distillation target (default: every training style); "
                         "the others only the caption loss")
    ap.add_argument("--teacher-only", action="store_true",
                    help="compute and cache the teacher embeddings (and with --views the distillation views), then stop")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of names held out (default %(default)s)")
    ap.add_argument("--dev", action="store_true",
                    help="development run: also hold out 20%% of the seen names (seed 1) and report them as "
                         "'held_out' (for choosing settings without looking at the real held-out names)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="with --dev: log the dev names' Google R@1/R@10 every N epochs (a learning curve for "
                         "choosing the schedule; refused without --dev, so no choice is made on the held-out names)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--limit", type=int, default=None,
                    help="use only the first N rows of each style (a quick end-to-end check)")
    for name, value in asdict(VitTrainConfig()).items():
        if name != "seed":
            ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    ap.add_argument("--no-save", action="store_true", help="train and report, write nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.eval_every and not args.dev:
        raise SystemExit("--eval-every needs --dev (a curve on the held-out names would invite choosing on them)")
    if args.views < 0 or args.views_per_batch < 1:
        raise SystemExit(f"--views must be >= 0 and --views-per-batch >= 1, got {args.views} and {args.views_per_batch}")
    train_styles, eval_styles = tdh.parse_styles(args.train_styles, args.eval_styles)
    root = args.cache_dir or cache_root()
    feature_cache, cache = root / "train_default_head", root / "train_emoji_vit"
    started = time.time()

    # Sleeping, not spinning, OpenMP workers: on a shared, oversubscribed CPU a spinning
    # thread burns the share its siblings need (2 threads: 2.3x the images/s of 1 here).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts OpenMP
    import torch

    torch.set_num_threads(max(1, args.threads))
    from .default_encoder import DefaultEncoder

    teacher_encoder = DefaultEncoder(device="cpu")
    corpora, held = tdh.load_corpora(train_styles, eval_styles, args.sample, args.holdout, args.seed)
    eval_held, names_held = held, set(held)  # names_held: the real held-out names, never in a view
    if args.dev:
        seen = [o for o in corpora["google" if "google" in corpora else train_styles[0]].objects if o not in held]
        eval_held = tdh.split_names(seen, 0.2, 1)
        held = held | eval_held
    if args.limit:
        corpora = {s: tdh.Corpus(c.style, c.root, c.rows[:args.limit]) for s, c in corpora.items()}
    pairs = tdh.training_pairs(corpora, train_styles, held)
    text_table = tdh.text_embeddings(pairs.captions, teacher_encoder, feature_cache)
    teacher_styles = train_styles if args.teacher_styles is None else \
        [s.strip() for s in args.teacher_styles.split(",") if s.strip()]
    if set(teacher_styles) - set(train_styles):
        raise SystemExit(f"--teacher-styles {sorted(set(teacher_styles) - set(train_styles))} are not trained on")
    teacher = np.concatenate([
        teacher_embeddings(corpora[s], pairs.rows[s], teacher_encoder, feature_cache, cache) if s in teacher_styles
        else np.full((len(pairs.rows[s]), TEXT_DIM), np.nan, np.float32) for s in train_styles])
    if args.teacher_only:
        logger.info("teacher embeddings of %d images cached", int(np.isfinite(teacher).all(1).sum()))
        if args.views:
            distillation_views(corpora, train_styles, names_held, held, args.views, args.seed, teacher_encoder, cache)
        return {}

    config = read_config(args.config)
    student = EmojiVitEncoder(device="cpu", config_path=args.config)
    pixels = torch.cat([load_pixels(corpora[s], pairs.rows[s], student) for s in train_styles])
    cfg = VitTrainConfig(**{k: getattr(args, k) for k in asdict(VitTrainConfig())})
    view_pixels = view_teacher = None
    if cfg.views:
        views = distillation_views(corpora, train_styles, names_held, held, cfg.views, cfg.seed,
                                   teacher_encoder, cache)
        from PIL import Image

        view_pixels = student.preprocess_batch([Image.fromarray(x) for x in views.images]).half()
        view_teacher = views.teacher
        logger.info("%d distillation views (of %d made; the others touch names held out of this run)",
                    len(views.teacher), cfg.views)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        visual = build_visual(config)
    n_params = sum(p.numel() for p in visual.parameters())
    logger.info("training a %.2fM-parameter ViT on %d images (%d captions, %d names held out) from %s, %d threads",
                n_params / 1e6, len(pixels), len(set(pairs.caption_ids.tolist())), len(held), train_styles,
                torch.get_num_threads())
    checkpoint_path = cache / "checkpoint.safetensors"

    curve = []
    if args.eval_every:
        curve_corpus = corpora["google" if "google" in corpora else train_styles[0]]
        curve_pixels = load_pixels(curve_corpus, list(range(len(curve_corpus.rows))), student)
        curve_text = tdh.text_embeddings(curve_corpus.captions, teacher_encoder, feature_cache)
        curve_mask = np.asarray([o in eval_held for o in curve_corpus.objects])

    def dev_point(model, epoch):  # the dev names' R@k now (eval mode, no RNG drawn)
        model.eval()
        with torch.no_grad():
            img = torch.cat([model(curve_pixels[i:i + 256]) for i in range(0, len(curve_pixels), 256)])
        model.train()
        img = torch.nn.functional.normalize(img, dim=-1).numpy()
        r = tdh.recall_at(curve_text[curve_mask], img, np.flatnonzero(curve_mask))
        curve.append({"epoch": epoch + 1, "R@1": round(r["R@1"], 4), "R@10": round(r["R@10"], 4)})
        logger.info("dev curve: epoch %d  R@1 %.3f  R@10 %.3f", epoch + 1, r["R@1"], r["R@10"])

    def checkpoint(model, epoch):  # the latest epoch's weights, should a long run be stopped
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == cfg.epochs):
            dev_point(model, epoch)
        if not args.no_save:
            save_weights(half_state(model), checkpoint_path, {"epoch": epoch})

    t0 = time.time()
    losses = train_visual(visual, pixels, teacher, text_table, pairs.caption_ids, pairs.families, cfg,
                          checkpoint=None if args.no_save and not args.eval_every else checkpoint,
                          view_pixels=view_pixels, view_teacher=view_teacher)
    train_seconds = time.time() - t0

    # measure the weights as shipped: float16, loaded through the encoder
    visual.load_state_dict({k: v.float() for k, v in half_state(visual).items()})
    student._visual = visual.eval().requires_grad_(False)
    results = {}
    for s in eval_styles:
        c = corpora[s]
        img = student.encode_images(c.paths, batch_size=128, num_workers=2)
        texts = tdh.text_embeddings(c.captions, teacher_encoder, feature_cache)
        results[s] = tdh.evaluate_embeddings(img, texts, c, eval_held)
    tdh.log_results(results)
    record = {
        "what": "emoji-vit: an open_clip VisionTransformer (class-token pooling) trained from scratch on emoji, "
                "distilled from the default encoder's image embeddings"
                + (f" (of the training images and of {cfg.views} views made from them)" if cfg.views else "")
                + " and contrastive (LiT-style) against the frozen all-MiniLM-L6-v2 caption embeddings; "
                "unit norm, 384-d",
        "command": "python -m indexing.encoders.train_emoji_vit " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model_config": config,
        "parameters": int(n_params),
        "train_styles": train_styles,
        "eval_styles": eval_styles,
        "held_out_names": {"share": args.holdout, "seed": args.seed, "count": len(eval_held),
                           "dev_split": bool(args.dev),
                           "of": len(set(corpora["google"].objects)) if "google" in corpora else None},
        "n_train_images": int(len(pixels)),
        "teacher_styles": teacher_styles,
        "n_teacher_images": int(np.isfinite(teacher).all(1).sum()),
        "n_distillation_views": 0 if view_teacher is None else int(len(view_teacher)),
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "final_loss": losses[-1],
        **({"dev_curve": curve} if curve else {}),
        "losses": [round(v, 4) for v in losses],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "metric": "as default_head.json: caption -> image retrieval in the full gallery of one style; R@k = share "
                  "of captions whose image is in the top k; tone: share of tone-naming captions whose own image "
                  "ranks first among the tone variants of the same emoji",
        "results": results,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    if not args.no_save:
        save_weights(half_state(visual), args.out, {"trained_by": "indexing.encoders.train_emoji_vit",
                                                   "seed": cfg.seed})
        record_path = args.out.with_name(args.out.stem + "_record.json")
        write_atomically(record_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n",
                                                                 encoding="utf-8"))
        logger.info("wrote %s (%d bytes) and %s", args.out, args.out.stat().st_size, record_path)
    return record


if __name__ == "__main__":
    main()
