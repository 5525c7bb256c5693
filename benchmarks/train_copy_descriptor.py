"""Train the copy descriptor the gate's `copy_embedding` space uses (synthfactory/audit/descriptor.py),
on public images only, and write it as package data with its card.

    python benchmarks/train_copy_descriptor.py [--data ../shared/data] [--steps 1500] [--batch 128]
        [--out synthfactory/audit/weights] [--seed 0]

Training data (never a run's private images): the public stand-ins `mri_brain_public_alzheimer`
(skull-stripped T1 slices) and `us_intrapartum_public_psfhs` (intrapartum ultrasound frames),
train splits, and the OrganAMNIST *validation* split, which the CT recipe declares public (CT
volumes in neither its train nor its test split). Their validation splits (Alzheimer, PSFHS) are
kept out and score retrieval at the end.

Objective: SimCLR's NT-Xent (temperature 0.1). One view of each image is the image itself or a
light photometric change; the other a strong disguise drawn from a broad family made with
**Kornia and OpenCV only** (the copy benchmark, benchmarks/audit_disguised_copies.py, makes
its disguises with PIL and scikit-image, so it measures edits the descriptor was not trained on):
OpenCV affine warps (rotation ±20°, zoom 0.8-1.25, shift ±12 %, constant, replicated or reflected
borders, four interpolations); Kornia crop-and-resize (36-100 % of the area), affine warps
(±15°, zoom 0.8-1.2, shift ±10 %, shear ±5°; zero, border or reflection padding), elastic
warps (up to ~3 px), flips, brightness/contrast, gamma, Gaussian blur and noise; OpenCV JPEG
(quality 20-95). (torchvision, the obvious third library, has no CPU wheel for the pinned CPU
torch on the package index here: its wheel needs libtorch_cuda.) Hard negatives: half of each batch is pairs of an image and its most
similar *other* public image (NCC of 16×16 thumbnails, exact duplicates excluded), e.g. adjacent
slices of one scan, so that the descriptor learns to tell a copy from a neighbour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import kornia
import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from synthfactory.audit.descriptor import CARD, WEIGHTS, CopyDescriptor, prepare

SOURCES = {  # name: (file under --data, split, side used)
    "alzheimer_mri": ("mri_brain_public_alzheimer/alzheimer_mri_64.npz", "train", 32),
    "psfhs_us": ("us_intrapartum_public_psfhs/psfhs_64.npz", "train", 32),
    "organamnist_val_ct": ("ct_organamnist/organamnist_28_full.npz", "val", 28),
}
VALIDATION = {
    "alzheimer_mri": ("mri_brain_public_alzheimer/alzheimer_mri_64.npz", "val", 32),
    "psfhs_us": ("us_intrapartum_public_psfhs/psfhs_64.npz", "val", 32),
}
INTERP_CV = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST, cv2.INTER_AREA)


def load(data: Path, spec: tuple[str, str, int]) -> np.ndarray:
    rel, split, side = spec
    with np.load(data / rel) as z:
        x = z[f"{split}_images"]
    if x.shape[-1] != side:
        x = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA) for im in x])
    return x.astype(np.uint8)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def neighbours(x: np.ndarray) -> np.ndarray:
    """Index of each image's most similar other image (NCC of 16×16 thumbnails); -1 where that is
    an exact duplicate (NCC > 0.99), which must not be pushed apart."""
    t = torch.from_numpy(
        np.stack([cv2.resize(im, (16, 16), interpolation=cv2.INTER_AREA) for im in x])
    ).float()
    t = t.flatten(1)
    t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp_min(1e-3)
    sim = (t @ t.T) / t.shape[1]
    sim.fill_diagonal_(-2)
    best, idx = sim.max(1)
    idx[best > 0.99] = -1
    return idx.numpy()


def _fill(rng: np.random.Generator, img: np.ndarray) -> int:
    return int(rng.choice([0, 0, int(img.mean()), int(rng.integers(0, 256))]))


def cv_affine(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """OpenCV: rotation ±20°, zoom 0.8-1.25, shift ±12 %, a random border fill and interpolation."""
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), rng.uniform(-20, 20), rng.uniform(0.8, 1.25))
    m[:, 2] += rng.uniform(-0.12, 0.12, 2) * (w, h)
    border = int(rng.choice([cv2.BORDER_CONSTANT, cv2.BORDER_REPLICATE, cv2.BORDER_REFLECT_101]))
    return cv2.warpAffine(img, m, (w, h), flags=int(rng.choice(INTERP_CV)), borderMode=border,
                          borderValue=_fill(rng, img))  # fmt: skip


def cv_jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(20, 96))])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def kornia_family(side: int, padding: str) -> torch.nn.Sequential:
    """Kornia, per image random parameters on a batch in [0, 1]."""
    return torch.nn.Sequential(
        K.RandomResizedCrop((side, side), scale=(0.36, 1.0), ratio=(0.85, 1.18), p=0.3),
        K.RandomAffine(15, (0.1, 0.1), (0.8, 1.2), 5, padding_mode=padding, p=0.4),
        K.RandomElasticTransform((31, 31), (side / 6, side / 6), (0.5, 2.0), padding_mode=padding, p=0.25),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJiggle(brightness=0.25, contrast=0.3, p=0.8),
        K.RandomGamma((0.7, 1.4), p=0.5),
        K.RandomGaussianBlur((5, 5), (0.2, 1.2), p=0.4),
        K.RandomGaussianNoise(std=0.03, p=0.4),
    )


FAMILIES = {}


def strong_views(imgs: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One disguise per image from the training family: OpenCV affine (half the images), Kornia's
    batch augmentations (padding zeros, border or reflection, drawn per batch), OpenCV JPEG."""
    side = imgs.shape[-1]
    x = np.stack([cv_affine(im, rng) if rng.random() < 0.5 else im for im in imgs])
    padding = str(rng.choice(["zeros", "border", "reflection"]))
    family = FAMILIES.setdefault((side, padding), kornia_family(side, padding))
    with torch.no_grad():
        y = family(torch.from_numpy(x).float()[:, None] / 255)[:, 0]
    out = (y.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [cv_jpeg(im, rng) if rng.random() < 0.4 else im for im in out]


def light_view(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image itself, or with a mild brightness/contrast change."""
    if rng.random() < 0.5:
        return img
    return np.clip(img * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10), 0, 255).astype(np.uint8)


def to_batch(views: list[np.ndarray]) -> torch.Tensor:
    """uint8 images of any sides → the descriptor's input ([-1, 1], then `prepare`'s 32×32)."""
    return torch.cat([prepare(torch.from_numpy(v).float()[None, None] / 127.5 - 1) for v in views])


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    n = len(z) // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def retrieval(model: CopyDescriptor, pool: np.ndarray, rng: np.random.Generator, n: int = 300) -> float:
    """Top-1: a strong disguise of a validation image finds that image among all validation images."""
    pick = rng.choice(len(pool), min(n, len(pool)), replace=False)
    with torch.no_grad():
        refs = model(to_batch(list(pool)))
        q = model(to_batch(strong_views(pool[pick], rng)))
    return float(((q @ refs.T).argmax(1).numpy() == pick).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128, help="source images per step (two views each)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "synthfactory/audit/weights"
    )
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pools = {k: load(args.data, s) for k, s in SOURCES.items()}
    near = {k: neighbours(x) for k, x in pools.items()}
    names = list(pools)
    weights = np.array([len(pools[k]) for k in names], float) ** 0.5  # the small US set is not drowned
    weights /= weights.sum()
    model = CopyDescriptor()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start, log = time.perf_counter(), []
    for step in range(args.steps):
        picks = []
        while len(picks) < args.batch:
            k = names[rng.choice(len(names), p=weights)]
            i = int(rng.integers(len(pools[k])))
            picks.append((k, i))
            j = near[k][i]
            if j >= 0 and rng.random() < 0.5 and len(picks) < args.batch:
                picks.append((k, int(j)))  # a hard negative: the most similar other image
        a, b = [], []
        for k in names:  # Kornia works on one image size at a time
            idx = [i for kk, i in picks if kk == k]
            if idx:
                a += [light_view(pools[k][i], rng) for i in idx]
                b += strong_views(pools[k][idx], rng)
        a, b = to_batch(a), to_batch(b)
        za, zb = model(a), model(b)
        z = F.normalize(model.head(torch.cat([za, zb])), dim=1)
        loss = nt_xent(z, args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(log[-1], flush=True)
    model.eval()
    val_rng = np.random.default_rng(12345)
    val = {k: retrieval(model, load(args.data, s), val_rng) for k, s in VALIDATION.items()}
    print("validation top-1 retrieval of disguised copies (training family):", val, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / WEIGHTS))
    card = {
        "what": "copy descriptor of the gate's copy_embedding space (synthfactory/audit/descriptor.py)",
        "architecture": {"width": 24, "dim": 128},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": file_sha256(args.out / WEIGHTS),
        "trained_on": {
            k: {
                "file": s[0],
                "split": s[1],
                "side": s[2],
                "n_images": len(pools[k]),
                "file_sha256": file_sha256(args.data / s[0]),
            }
            for k, s in SOURCES.items()
        },  # fmt: skip
        "private_images_used": "none: public stand-ins and the OrganAMNIST validation split the CT recipe declares public",
        "objective": f"NT-Xent, temperature {args.temperature}; views: light (identity or mild photometric) vs strong disguise; "
        "half of each batch paired with its most similar other public image as a hard negative",
        "augmentations": "strong view: OpenCV warpAffine on half the images (rotation ±20°, zoom 0.8-1.25, shift "
        "±12 %, border constant 0/mean/random, replicate or reflect; linear, cubic, nearest or area); Kornia "
        "RandomResizedCrop (area 36-100 %, p 0.3), RandomAffine (±15°, shift ±10 %, zoom 0.8-1.2, shear ±5°, p 0.4), "
        "RandomElasticTransform (sigma side/6, alpha 0.5-2, p 0.25), horizontal flip (p 0.5), ColorJiggle (brightness "
        "±25 %, contrast ±30 %, p 0.8), RandomGamma 0.7-1.4 (p 0.5), RandomGaussianBlur σ 0.2-1.2 (p 0.4), "
        "RandomGaussianNoise std 0.03 (p 0.4), padding zeros/border/reflection per batch; OpenCV JPEG quality 20-95 "
        "(p 0.4). Light view: the image, or brightness ±10 % and offset ±10 grey levels",
        "libraries": {"torch": torch.__version__, "kornia": kornia.__version__, "opencv": cv2.__version__},
        "steps": args.steps,
        "batch_sources": args.batch,
        "learning_rate": args.lr,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "validation_top1_retrieval": val,
        "loss_log": log,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (args.out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out / WEIGHTS} ({(args.out / WEIGHTS).stat().st_size / 1e6:.2f} MB) and {CARD}")


if __name__ == "__main__":
    main()
