"""The disguised copies of benchmarks/audit_disguised_copies.py: shapes, determinism, distinct
sources, a sanity check on content, and that they are made without the gate's or the learned
descriptor's libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")

from synthfactory.audit import disguises  # noqa: E402
from synthfactory.audit.disguises import KINDS, disguised_copies  # noqa: E402

SOURCE = Path(disguises.__file__)
FORBIDDEN = ("torch", "torchvision", "cv2", "synthfactory.audit.planted")


def textured(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random images with a bright blob each, uint8 [n, size, size]."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal((n, size, size)), (0, size / 16, size / 16))
    x = (x - x.min()) / (x.max() - x.min()) * 160 + 20
    yy, xx = np.mgrid[:size, :size]
    for img in x:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] += 70
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_every_kind_keeps_shape_and_changes_the_image(size):
    train = textured(2 * len(KINDS) + 5, size)
    copies, picks, kinds = disguised_copies(train, per_kind=2, seed=0)
    assert copies.dtype == np.uint8 and copies.shape == (2 * len(KINDS), size, size)
    assert kinds == [k for k in KINDS for _ in range(2)]
    assert len(set(picks.tolist())) == len(picks) and picks.min() >= 0 and picks.max() < len(train)
    for copy, i, kind in zip(copies, picks, kinds, strict=True):
        assert not np.array_equal(copy, train[i]), kind


def test_deterministic_for_a_seed_and_different_between_seeds():
    train = textured(40, 28)
    for kind in KINDS:
        a = disguised_copies(train, per_kind=3, seed=5, kinds=(kind,))
        b = disguised_copies(train, per_kind=3, seed=5, kinds=(kind,))
        c = disguised_copies(train, per_kind=3, seed=6, kinds=(kind,))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), kind
        assert not np.array_equal(a[0], c[0]), kind


def test_random_parameters_differ_between_seeds_on_one_image():
    """Kinds with random parameters give different copies of the same image for two seeds."""
    img = textured(1, 32)[0]
    fixed = {"jpeg_q30", "zoom_in_pil", "zoom_out_pil"}  # no random parameter
    for kind in set(KINDS) - fixed:
        copies = {disguises.DISGUISES[kind](img, np.random.default_rng(s)).tobytes() for s in range(6)}
        assert len(copies) > 1, kind


def test_too_few_training_images_or_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="copies need"):
        disguised_copies(textured(5, 28), per_kind=1, seed=0)
    with pytest.raises(ValueError, match="unknown"):
        disguised_copies(textured(5, 28), per_kind=1, seed=0, kinds=("rotate",))


def test_a_rotated_copy_still_correlates_with_its_source():
    rng = np.random.default_rng(1)
    src = np.full((32, 32), 30, np.uint8)
    src[6:14, 18:27] = 230  # bright, off-centre
    src = np.clip(src + rng.normal(0, 5, src.shape), 0, 255).astype(np.uint8)
    others = rng.integers(0, 256, (20, 32, 32)).astype(np.uint8)
    copy = disguises.rot10_pil(src, np.random.default_rng(0)).astype(float).ravel()
    to_src = np.corrcoef(copy, src.ravel())[0, 1]
    to_others = [abs(np.corrcoef(copy, o.ravel())[0, 1]) for o in others]
    assert to_src > 0.6 and max(to_others) < 0.3 and to_src > 3 * max(to_others)


def test_no_torch_opencv_torchvision_or_planted_in_the_source():
    tree = ast.parse(SOURCE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports (nothing from synthfactory)"
            imported |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    roots = {m.split(".")[0] for m in imported}
    assert roots <= {"__future__", "io", "collections", "numpy", "PIL", "scipy", "skimage"}, roots


def test_making_every_kind_loads_no_torch_opencv_torchvision_or_planted():
    """The module run on its own (not through the synthfactory package, which imports torch)."""
    code = f"""
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("disguises", {str(SOURCE)!r})
d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(d)
rng = np.random.default_rng(0)
d.disguised_copies(rng.integers(0, 256, (len(d.KINDS), 32, 32)).astype(np.uint8), 1, 0)
d.libraries()
print(",".join(m for m in {FORBIDDEN!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", out.stdout
