"""The gate's `aligned_ncc` space (`audit/registration.py`): the copy descriptor's shortlist,
each candidate registered onto the query by OpenCV's ECC. Copies made with other libraries
(Pillow, scikit-image) and edits other than any grid's, flips and compositions included, score
as copies; images that are not copies do not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthfactory.audit.registration import _overlap_ncc, registered_ncc
from synthfactory.audit.spaces import search

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PUBLIC_VAL = SHARED / "mri_brain_public_alzheimer" / "alzheimer_mri_64.npz"


def _disguise(img: np.ndarray, k: int) -> np.ndarray:
    """Five edits made with Pillow or scikit-image, beyond the gate's warp grid: crop of 82 %
    resized back, rotation by 13° with black corners, a similarity warp (rotation 7°, zoom 1.08,
    3 px shift), a flipped zoom by 0.88 padded black, and a composition (rotation, crop, JPEG)."""
    from skimage.transform import SimilarityTransform, warp

    im, h = Image.fromarray(img), img.shape[0]
    kind = k % 5
    if kind == 0:
        c = round(0.82 * h)
        return np.asarray(im.crop((1, h - c - 2, 1 + c, h - 2)).resize((h, h), Image.LANCZOS))
    if kind == 1:
        return np.asarray(im.rotate(13 if k % 2 else -13, resample=Image.BILINEAR))
    if kind == 2:
        c = (h - 1) / 2
        t = SimilarityTransform(translation=(-c, -c))
        t = (
            t
            + SimilarityTransform(scale=1.08, rotation=np.radians(7))
            + SimilarityTransform(translation=(c + 3, c))
        )
        return np.round(warp(img / 255.0, t.inverse, order=1, cval=0.0) * 255).astype(np.uint8)
    if kind == 3:
        s = round(0.88 * h)
        small = np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT).resize((s, s), Image.BICUBIC))
        out = np.zeros_like(img)
        o = (h - s) // 2
        out[o : o + s, o : o + s] = small
        return out
    im = im.rotate(-9, resample=Image.BILINEAR)
    c = round(0.9 * h)
    im = im.crop((h - c, 0, h, c)).resize((h, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=60)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


@pytest.mark.skipif(not PUBLIC_VAL.is_file(), reason="shared data absent")
def test_registered_copies_stand_further_above_other_images_than_the_descriptor_alone() -> None:
    """Public MRI slices (the Alzheimer validation split, which the descriptor never trained on):
    50 disguised copies of 320 "training" slices against 320 slices that are not copies (many of
    them neighbours of a training slice: their median NCC to it is 0.97). Through the gate's own
    `search`, aligned_ncc separates copies from the others better than the descriptor's cosine
    that shortlists for it (ROC AUC, and the share of copies above the others' 95th percentile),
    and names each copy's source. Measured: AUC 0.97 against 0.93, 76 % against 64 %; NCC 0.005."""
    from sklearn.metrics import roc_auc_score

    with np.load(PUBLIC_VAL) as z:
        u8 = np.stack(
            [np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR)) for x in z["val_images"]]
        )
    order = np.random.default_rng(2).permutation(len(u8))
    train_u8, others_u8 = u8[order[:320]], u8[order[320:640]]
    picks = np.random.default_rng(1).choice(len(train_u8), 50, replace=False)
    copies = np.stack([_disguise(train_u8[i], k) for k, i in enumerate(picks)])
    train, q, others = (x.astype(np.float32)[:, None] / 127.5 - 1 for x in (train_u8, copies, others_u8))
    auc, above = {}, {}
    for space in ("copy_embedding", "aligned_ncc"):
        idx, s_copy = search(space, q, train)
        _, s_other = search(space, others, train)
        auc[space] = roc_auc_score(
            np.r_[np.ones(len(s_copy)), np.zeros(len(s_other))], np.r_[s_copy, s_other]
        )
        above[space] = float((s_copy > np.percentile(s_other, 95)).mean())
        if space == "aligned_ncc":
            assert (idx == picks).mean() >= 0.9, (idx == picks).mean()
    assert auc["aligned_ncc"] >= 0.96 and auc["aligned_ncc"] > auc["copy_embedding"] + 0.02, auc
    assert above["aligned_ncc"] >= 0.7 and above["aligned_ncc"] > above["copy_embedding"], above


def test_the_registration_recovers_rotation_zoom_and_flip() -> None:
    """A smooth image and its PIL copy rotated by 12°, zoomed by 1.1 and flipped: unregistered,
    the correlation is low; registered, above 0.98. A warp that shrinks the image to a third is
    refused, not scored."""
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.normal(size=(32, 32)), 2.0)
    u8 = np.round(np.clip(127.5 + 60 * x / x.std(), 0, 255)).astype(np.uint8)
    im = Image.fromarray(u8).rotate(12, resample=Image.BICUBIC)
    im = im.resize((35, 35), Image.BICUBIC).crop((1, 1, 33, 33)).transpose(Image.FLIP_LEFT_RIGHT)
    ref, query = (np.asarray(a, dtype=np.float32) / 127.5 - 1 for a in (u8, im))
    identity = np.eye(2, 3, dtype=np.float32)
    assert _overlap_ncc(query, ref, identity) < 0.5
    assert registered_ncc(query, ref) > 0.98
    assert _overlap_ncc(ref, ref, np.float32([[0.3, 0, 0], [0, 0.3, 0]])) == -1.0
