"""A learned copy descriptor for the gate's `copy_embedding` space: a small CNN that maps a
grayscale image to a unit vector, trained contrastively (SimCLR's NT-Xent) so that an image and
a disguised copy of it (resized, cropped, padded, rotated with any fill, warped, blurred,
JPEG-compressed, re-contrasted, noised) land close, and other images, adjacent slices of the same
scan included, land apart. The space's score is the cosine similarity to the nearest training
image's embedding (closer = higher).

Trained only on public images (`benchmarks/train_copy_descriptor.py`; the data, augmentations,
steps and hashes are in `weights/copy_descriptor.json`), never on a run's private images, so its
weights carry nothing of any private set: a recipe can use it without spending ε, and it is the
same network for every run (its SHA-256 is in each audit record). In the spirit of SSCD (Pizzi et
al. 2022) and Dar et al.'s contrastive copy detector for medical images; small enough for a
CPU (~0.4 M parameters, 32×32 input).

Images come in as float arrays [N, 1, H, W] or [N, H, W] on the [-1, 1] scale, any H×W: each is
resized to 32×32 (bilinear, antialiased) and standardised per image (zero mean, unit variance),
so the embedding ignores global brightness and contrast.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 32
WEIGHTS = "copy_descriptor.safetensors"
CARD = "copy_descriptor.json"


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True)]


class CopyDescriptor(nn.Module):
    """Conv stack 32→16→8→4 px (widths w, 2w, 4w, 4w), flattened (the layout of the image
    matters: an adjacent slice has the same parts in other places), then a linear map to `dim`
    and L2 normalisation. `head` is SimCLR's projection, used in training only."""

    def __init__(self, width: int = 24, dim: int = 128) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(1, w, 1), *_block(w, w, 1),
            *_block(w, 2 * w, 2), *_block(2 * w, 2 * w, 1),
            *_block(2 * w, 4 * w, 2), *_block(4 * w, 4 * w, 1),
            *_block(4 * w, 4 * w, 2),
        )  # fmt: skip
        self.embed = nn.Linear(4 * w * (INPUT_SIZE // 8) ** 2, dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.features(prepare(x)).flatten(1)), dim=1)


def prepare(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] (or [N, H, W]) on any scale → 32×32, standardised per image."""
    if x.ndim == 3:
        x = x[:, None]
    x = x.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mean) / std


def _package_file(name: str):
    return resources.files("synthfactory.audit").joinpath("weights", name)


@lru_cache(maxsize=1)
def load_descriptor() -> tuple[CopyDescriptor, dict]:
    """The shipped descriptor (eval mode) and its card (training data, augmentations, hashes)."""
    from safetensors.torch import load

    card = json.loads(_package_file(CARD).read_text())
    data = _package_file(WEIGHTS).read_bytes()  # read once: hashed, then loaded
    sha = hashlib.sha256(data).hexdigest()
    if sha != card["weights_sha256"]:
        raise RuntimeError(f"{WEIGHTS}: SHA-256 {sha} differs from its card's {card['weights_sha256']}")
    model = CopyDescriptor(**card["architecture"])
    model.load_state_dict({k: v.float() for k, v in load(data).items()})
    return model.eval(), card


FLAT_STD = 1e-3  # on the [-1, 1] scale: below a quarter of one grey level, the image has no content


@torch.no_grad()
def embed(images: np.ndarray | torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Unit embeddings [N, dim] (float32) of images on the [-1, 1] scale; a flat image (no
    content to standardise: blank, or one grey level) gets the zero vector, so it is similar to
    nothing, as NCC scores it 0."""
    model, card = load_descriptor()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if isinstance(images, np.ndarray) else images
    if not len(x):
        return torch.zeros(0, card["architecture"]["dim"])
    e = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    flat = x.float().flatten(1).std(dim=1) < FLAT_STD
    e[flat] = 0.0
    return e
