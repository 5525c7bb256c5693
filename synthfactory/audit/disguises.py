"""Disguised copies of training images made with other libraries than the gate's: a copy
benchmark the audit was not built on (benchmarks/audit_disguised_copies.py).

The gate's own edits (`planted.py`) are numpy/scipy, its warp search (`spaces.py`) torch
`affine_grid`/`grid_sample`, and the learned descriptor trains on Kornia and OpenCV
augmentations. Every edit here is a Pillow or scikit-image call, with other interpolation,
border rules and parameters: compositions of several edits, crops of 80-85 % resized back,
rotations up to 15°, zooms 0.85-1.2 and elastic warps. numpy and scipy only draw parameters and
random fields and convert between uint8 and float.

Images are uint8 [H, W] (a batch [N, H, W] for `disguised_copies`); every kind returns uint8 of
the input's shape. scikit-image is a test/benchmark dependency, imported inside the functions.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

Disguise = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def libraries() -> dict[str, str]:
    """The versions of the libraries that make the disguises."""
    import skimage

    return {"PIL": Image.__version__, "scikit-image": skimage.__version__}


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(x, dtype=np.uint8), mode="L")


def _u8(x: np.ndarray | Image.Image) -> np.ndarray:
    """A PIL image, or a float image on [0, 1] (scikit-image's scale), as uint8."""
    if isinstance(x, Image.Image):
        return np.asarray(x, dtype=np.uint8).copy()
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


def _crop_resize(im: Image.Image, share: float, resample: int, rng: np.random.Generator) -> Image.Image:
    """A square window of `share` of the side at a random place, resized back to full size."""
    w, h = im.size
    cw, ch = round(share * w), round(share * h)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), resample)


def _centre_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    y0, x0 = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
    return x[y0 : y0 + h, x0 : x0 + w]


def _centre_pad(x: np.ndarray, h: int, w: int, mode: str) -> np.ndarray:
    dy, dx = h - x.shape[0], w - x.shape[1]
    return np.pad(x, ((dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2)), mode=mode)


def combo_shift_flip_contrast_gamma_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL affine shift by 2-4 px along each moved axis, one of 8 directions (black fill,
    nearest), then PIL mirror, PIL contrast ×0.8-1.2, scikit-image gamma 0.8-1.25, scikit-image
    Gaussian noise of variance (3/255)² on the [0, 1] scale."""
    from skimage import exposure, util

    s = int(rng.integers(2, 5))
    dy, dx = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)][int(rng.integers(8))]
    im = _pil(x).transform(
        _pil(x).size, Image.Transform.AFFINE, (1, 0, -s * dx, 0, 1, -s * dy), Image.Resampling.NEAREST
    )
    im = ImageEnhance.Contrast(ImageOps.mirror(im)).enhance(float(rng.uniform(0.8, 1.2)))
    y = exposure.adjust_gamma(_u8(im).astype(np.float64) / 255.0, float(rng.uniform(0.8, 1.25)))
    return _u8(util.random_noise(y, mode="gaussian", rng=rng, var=(3 / 255) ** 2))


def edge_shift_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scikit-image `warp` by a 6 px translation in a random direction (sub-pixel, bilinear,
    edge fill), then PIL Gaussian blur of radius 0.8."""
    from skimage import transform

    a = rng.uniform(0, 2 * np.pi)
    shift = transform.AffineTransform(translation=(6 * np.cos(a), 6 * np.sin(a)))
    y = transform.warp(x.astype(np.float64) / 255.0, shift.inverse, order=1, mode="edge")
    return _u8(_pil(_u8(y)).filter(ImageFilter.GaussianBlur(radius=0.8)))


def jpeg_q30(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL JPEG round trip at quality 30 (no random parameter)."""
    return _u8(_jpeg(_pil(x), 30))


def _pil_rotate(x: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    return _u8(_pil(x).rotate(_sign(rng) * angle, resample=Image.Resampling.BILINEAR))


def rot5_pil(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL `rotate` by ±5° (random sign) about the centre, bilinear, black corners."""
    return _pil_rotate(x, 5.0, rng)


def rot10_pil(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL `rotate` by ±10° (random sign) about the centre, bilinear, black corners."""
    return _pil_rotate(x, 10.0, rng)


def rot15_pil(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL `rotate` by ±15° (random sign) about the centre, bilinear, black corners."""
    return _pil_rotate(x, 15.0, rng)


def rot15_skimage(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scikit-image `rotate` by ±12-15° (random sign), bicubic (order 3), border 'reflect' or
    'constant' (black) at random."""
    from skimage import transform

    mode = "reflect" if rng.random() < 0.5 else "constant"
    angle = _sign(rng) * rng.uniform(12.0, 15.0)
    return _u8(transform.rotate(x.astype(np.float64) / 255.0, angle, order=3, mode=mode))


def zoom_in_pil(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zoom ×1.1: PIL bicubic `resize` to round(1.1 H), centre crop back to H (no random
    parameter)."""
    h, w = x.shape
    return _centre_crop(_u8(_pil(x).resize((round(1.1 * w), round(1.1 * h)), Image.Resampling.BICUBIC)), h, w)


def zoom_out_pil(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zoom ×0.9: PIL bicubic `resize` down to round(0.9 H), pasted centred on a black H×H canvas
    (no random parameter)."""
    h, w = x.shape
    small = _pil(x).resize((round(0.9 * w), round(0.9 * h)), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
    return _u8(canvas)


def zoom_120_skimage(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scikit-image `rescale` by 1.15-1.2 (bilinear), centre crop back to H×W."""
    from skimage import transform

    y = transform.rescale(x.astype(np.float64) / 255.0, rng.uniform(1.15, 1.2), order=1)
    return _centre_crop(_u8(y), *x.shape)


def zoom_085_skimage(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scikit-image `rescale` by 0.85-0.88 (bilinear, anti-aliased), padded back to H×W, centred,
    with the edge values."""
    from skimage import transform

    y = transform.rescale(x.astype(np.float64) / 255.0, rng.uniform(0.85, 0.88), order=1, anti_aliasing=True)
    return _centre_pad(_u8(y), *x.shape, mode="edge")


def rot6_zoom106_shift2(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One scikit-image similarity `warp` (bilinear, black fill): rotation ±6° and zoom ×1.06
    about the centre, then a 2 px shift in a random direction."""
    from skimage import transform

    h, w = x.shape
    c = np.array([(w - 1) / 2, (h - 1) / 2])  # (x, y)
    a = rng.uniform(0, 2 * np.pi)
    tform = (
        transform.SimilarityTransform(translation=-c)
        + transform.SimilarityTransform(scale=1.06, rotation=np.deg2rad(_sign(rng) * 6.0))
        + transform.SimilarityTransform(translation=c + 2 * np.array([np.cos(a), np.sin(a)]))
    )
    return _u8(transform.warp(x.astype(np.float64) / 255.0, tform.inverse, order=1, mode="constant"))


def crop85_resize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL `crop` of a random window of 85 % of the side, Lanczos `resize` back to H×W."""
    return _u8(_crop_resize(_pil(x), 0.85, Image.Resampling.LANCZOS, rng))


def crop80_resize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL `crop` of a random window of 80 % of the side, bilinear `resize` back to H×W."""
    return _u8(_crop_resize(_pil(x), 0.80, Image.Resampling.BILINEAR, rng))


def elastic_skimage(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An elastic warp: two standard-normal fields smoothed by a Gaussian of σ = H/8 (scipy),
    scaled so the largest displacement is 1.5-2 px, applied with scikit-image `warp` through the
    inverse coordinate map (bilinear, reflected border)."""
    from scipy.ndimage import gaussian_filter
    from skimage import transform

    h, w = x.shape
    field = np.stack([gaussian_filter(rng.standard_normal((h, w)), h / 8) for _ in range(2)])
    field *= rng.uniform(1.5, 2.0) / np.hypot(*field).max()
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = np.stack([rows + field[0], cols + field[1]])
    return _u8(transform.warp(x.astype(np.float64) / 255.0, coords, order=1, mode="reflect"))


def compose_rot_crop_jpeg_gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL `rotate` ±8-12° (bilinear, expand=False, black fill), PIL crop of a random 88 % window
    bicubic-resized back, scikit-image gamma 0.85-1.15, PIL JPEG at quality 50."""
    from skimage import exposure

    angle = _sign(rng) * rng.uniform(8.0, 12.0)
    im = _pil(x).rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=0)
    im = _crop_resize(im, 0.88, Image.Resampling.BICUBIC, rng)
    y = exposure.adjust_gamma(_u8(im).astype(np.float64) / 255.0, rng.uniform(0.85, 1.15))
    return _u8(_jpeg(_pil(_u8(y)), 50))


DISGUISES: dict[str, Disguise] = {
    f.__name__: f
    for f in (
        combo_shift_flip_contrast_gamma_noise,
        edge_shift_blur,
        jpeg_q30,
        rot5_pil,
        rot10_pil,
        rot15_pil,
        rot15_skimage,
        zoom_in_pil,
        zoom_out_pil,
        zoom_120_skimage,
        zoom_085_skimage,
        rot6_zoom106_shift2,
        crop85_resize,
        crop80_resize,
        elastic_skimage,
        compose_rot_crop_jpeg_gamma,
    )
}
KINDS: tuple[str, ...] = tuple(DISGUISES)


def disguised_copies(
    train_u8: np.ndarray, per_kind: int, seed: int, kinds: tuple[str, ...] = KINDS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`per_kind` disguised copies of each kind, each of a different training image (drawn
    without replacement). Returns (copies uint8 [K, H, W], the source's index in `train_u8` per
    copy, the kind per copy); deterministic for a seed."""
    unknown = [k for k in kinds if k not in DISGUISES]
    if unknown:
        raise ValueError(f"unknown disguise kinds {unknown}; known: {', '.join(KINDS)}")
    n = per_kind * len(kinds)
    if n > len(train_u8):
        raise ValueError(f"{n} copies need as many training images, got {len(train_u8)}")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train_u8), size=n, replace=False)
    names = [k for k in kinds for _ in range(per_kind)]
    copies = [DISGUISES[k](train_u8[i], rng) for k, i in zip(names, picks, strict=True)]
    shape = (0, *train_u8.shape[1:])
    return (np.stack(copies) if copies else np.zeros(shape, np.uint8)), picks, names
