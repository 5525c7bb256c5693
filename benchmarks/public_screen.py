"""The screen of declared-public data (synthfactory/public.py) on the real public stand-ins: how
many genuine public images it refuses, and how many disguised copies of private images (training
and held-out) it catches, at several margins beyond the most extreme background score.

    python benchmarks/public_screen.py [--sets ct,us,us_psfhs,mri] [--per-kind 20] [--smoke]
        [--margins shipped,0,0.5,0.6]

Per set: the private images of a shipped recipe (training and held-out, as its recipe reads them)
and a public set from ../shared/data read with the same size and preprocessing; copies of
`per-kind` private training images and `per-kind` held-out images, each disguised with PIL (not
the audit's own warps): an exact copy, a 1-pixel translation (black fill), a left-right flip, a
brightness offset of +0.05 on the [-1, 1] scale, +1 grey level, turns by 90° and 180°, an
upside-down flip, an inversion, gamma 0.6, and, beyond what the screen is claimed to catch, JPEG
at quality 75, a 2-pixel translation with a flip, an 8° rotation (black corners) and a 1.15 zoom
(resize and centre crop). `--smoke` uses each
recipe's --smoke subsets (a few hundred images, a small background: the hard case for false
refusals). The margins the product uses (public.SCREEN_MARGINS) were chosen on these figures: per
space, the smallest with no refused genuine image on any set.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from synthfactory.audit import quantize
from synthfactory.data import load_images
from synthfactory.public import screen_flags, screen_scores
from synthfactory.recipe import load_recipe
from synthfactory.sample import uint8_to_model_range

REPO = Path(__file__).resolve().parents[1]
# set: (recipe, public data block overrides)
SETS = {
    "ct": ("ct_organamnist.yaml", None),  # the recipe's own pretrain.data (the val split)
    "us": ("us_fetal_head.yaml", None),  # the recipe's own pretrain.data (fetal brain US)
    "us_psfhs": ("us_fetal_head.yaml", {"source": "npz", "path": "us_intrapartum_public_psfhs/psfhs_64.npz",
                                         "classes": ["unlabelled"], "train_split": "train", "heldout_split": "val"}),
    "mri": ("mri_brain_tumor.yaml", {"source": "npz", "path": "mri_brain_public_alzheimer/alzheimer_mri_64.npz",
                                     "classes": ["Non_Demented", "Very_Mild_Demented", "Mild_Demented", "Moderate_Demented"],
                                     "train_split": "train", "heldout_split": "val"}),
}  # fmt: skip


def _pil(u8: np.ndarray) -> Image.Image:
    return Image.fromarray(u8, mode="L")


def _shift(im: Image.Image, dx: int, dy: int) -> Image.Image:
    return im.transform(im.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=0)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


def _zoom(im: Image.Image, factor: float) -> Image.Image:
    w, h = im.size
    big = im.resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)
    left, top = (big.width - w) // 2, (big.height - h) // 2
    return big.crop((left, top, left + w, top + h))


KINDS = {
    "exact": lambda im: im,
    "shift_1px": lambda im: _shift(im, 1, 0),
    "flip": ImageOps.mirror,
    "brightness_+0.05": lambda im: im.point(lambda v: min(255, v + 6)),  # +0.05 on [-1, 1] = 6.4 levels
    "grey_+1": lambda im: im.point(lambda v: min(255, v + 1)),
    "rotate_90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "rotate_180": lambda im: im.transpose(Image.Transpose.ROTATE_180),
    "flip_vertical": ImageOps.flip,
    "invert": ImageOps.invert,
    "gamma_0.6": lambda im: im.point(lambda v: round(255 * (v / 255) ** 0.6)),
    "jpeg_75 (beyond claim)": lambda im: _jpeg(im, 75),
    "shift_2px_flip (beyond claim)": lambda im: ImageOps.mirror(_shift(im, 2, 1)),
    "rotate_8 (beyond claim)": lambda im: im.rotate(8, resample=Image.Resampling.BILINEAR),
    "zoom_1.15 (beyond claim)": lambda im: _zoom(im, 1.15),
}


def disguised(u8: np.ndarray) -> tuple[np.ndarray, list[str]]:
    out, kinds = [], []
    for kind, edit in KINDS.items():
        for img in u8:
            out.append(np.asarray(edit(_pil(img)), dtype=np.uint8))
            kinds.append(kind)
    return np.stack(out), kinds


def run_set(name: str, data: Path, per_kind: int, smoke: bool, margins: list[float]) -> None:
    recipe_file, public_block = SETS[name]
    recipe = load_recipe(REPO / "recipes" / recipe_file, smoke=smoke)
    t0 = time.perf_counter()
    private = load_images(recipe.data, recipe.modality)
    if public_block is None:
        pub_cfg = recipe.pretrain.data
    else:
        block = {
            **public_block,
            "path": str(data / public_block["path"]),
            "image_size": recipe.data.image_size,
        }
        if smoke:
            block |= {"max_train_images": 200, "max_heldout_images": 20}
        pub_cfg = replace_data(recipe, block)
    public = load_images(pub_cfg, recipe.modality)
    rng = np.random.default_rng(0)
    tr = quantize(private.train_images[rng.choice(len(private.train_labels), per_kind, replace=False)])
    he = quantize(private.heldout_images[rng.choice(len(private.heldout_labels), per_kind, replace=False)])
    planted_tr, kinds = disguised(tr)
    planted_he, _ = disguised(he)
    genuine = quantize(public.train_images)
    queries = uint8_to_model_range(np.concatenate([genuine, planted_tr, planted_he]))
    scores = screen_scores(recipe, queries, private)
    seconds = time.perf_counter() - t0
    n = len(genuine)
    kinds_arr = np.array(kinds)
    print(f"\n## {name}: {recipe.name}{' --smoke' if smoke else ''}: {len(private.train_labels)} training + "
          f"{len(private.heldout_labels)} held-out private images, {n} public images, background "
          f"{len(scores.background['pixel_l2'])}; searches {seconds:.0f} s")  # fmt: skip
    for margin in margins:
        refused, by_rule, thresholds = screen_flags(scores, margin)
        margin = "the shipped per-space margins" if margin is None else margin
        fr = refused[:n]
        t_part, h_part = refused[n : n + len(kinds)], refused[n + len(kinds) :]
        per = ", ".join(
            f"{k} {int(t_part[kinds_arr == k].sum())}+{int(h_part[kinds_arr == k].sum())}/{2 * per_kind}"
            for k in KINDS
        )
        ths = ", ".join(f"{k} {v:.4g}" for k, v in thresholds.items())
        print(
            f"- margin {margin}: genuine public refused {int(fr.sum())}/{n}; copies caught (train+held-out): {per}; thresholds {ths}"
        )


def replace_data(recipe, block: dict):
    """The recipe's data model class built from a block (the same source type)."""
    from pydantic import TypeAdapter

    from synthfactory.recipe import DataConfig

    return TypeAdapter(DataConfig).validate_python(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sets", default="ct,us,us_psfhs,mri")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--margins", default="shipped,0,0.5,0.6", help="'shipped': public.SCREEN_MARGINS")
    args = ap.parse_args()
    margins = [None if m == "shipped" else float(m) for m in args.margins.split(",")]
    for name in args.sets.split(","):
        run_set(name, args.data, args.per_kind, args.smoke, margins)


if __name__ == "__main__":
    main()
