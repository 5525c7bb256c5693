"""Release: write the samples that passed the memorization audit, and nothing else.

The release reads the sample store (samples/store/) and audit/audit.json from the run directory, refuses if
the audit blocked the release or does not match the samples on disk, and writes each requested
format through a writer `(ReleasedSet, folder) -> None` in WRITERS (Hub push, DICOM and NIfTI plug
in here). The release folder is built aside and moved into place in one rename.

What a released image carries is a function of the DP generator and public seeds only: the
image, its label, the run id, its sample seed and its index in the sample store. No per-sample
audit figure (nearest-neighbour distance, similarity score) leaves: each is a function of the
private images outside ε; they stay in the run directory (audit/). A run without the DP
guarantee (no DP-SGD, or seeded DP noise) is released under release-NOT-PRIVATE/.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from . import __version__
from .data.folder import SYNTHETIC_MARKER
from .ledger import ARTIFACT_FILE, LedgerRefused, read_artifact, write_artifact
from .records import RELEASE_SCHEMA, AuditRecord, PrivacyRecord, ReleaseRecord
from .rundir import RunDir, atomic_directory
from .sample import Samples, StoreImages


class ReleaseRefused(RuntimeError):
    """The audit blocked the release, or the run directory is inconsistent."""


@dataclass
class ReleasedSet:
    """Only audited, passed samples, with the provenance every released image carries."""

    store: StoreImages | np.ndarray  # every sample, read when asked for; released: store[sample_index]
    labels: np.ndarray  # int64 [K]
    seeds: np.ndarray  # int64 [K]
    sample_index: np.ndarray  # int64 [K], index into the sample store
    class_names: list[str]
    private: bool = False  # the DP guarantee holds (privacy.json)
    run_id: str = ""
    recipe_name: str = ""
    recipe_sha256: str = ""
    modality: str = "mri"
    source: str = ""
    ct_window: tuple[float, float] | None = None
    epsilon: float | None = None
    delta: float | None = None
    nifti_spacing_mm: float | None = None  # the recipe's outputs.nifti_spacing_mm, never measured

    def image(self, k: int) -> np.ndarray:
        """Released image k (read from the store when asked for)."""
        return np.asarray(self.store[self.sample_index[k]])

    def all_images(self) -> np.ndarray:
        """Every released image in memory, uint8 [K, H, W] (the evaluation trains on them)."""
        out = np.empty((len(self.sample_index), *self.store.shape[1:]), dtype=np.uint8)
        for k in range(len(out)):
            out[k] = self.image(k)
        return out


def audited_set(run_dir: RunDir, allow_blocked: bool = False) -> tuple[ReleasedSet, AuditRecord]:
    """The releasable samples and the audit they passed. Raises ReleaseRefused. With
    `allow_blocked` (a forced publish only), a blocked audit still yields the samples it did not
    flag: never a flagged or unaudited one."""
    if not run_dir.audit_json.exists():
        raise ReleaseRefused(f"{run_dir.root}: no audit/audit.json; run the audit stage first")
    audit = AuditRecord.read(run_dir.audit_json)
    samples = Samples.load(run_dir.samples)
    if audit.decision == "block" and not allow_blocked:
        raise ReleaseRefused(
            f"the memorization audit blocked the release: {audit.summary['n_flagged']} of "
            f"{audit.summary['n_samples']} samples look copied (see {run_dir.audit_json})"
        )
    if audit.samples_sha256 != samples.sha256() or audit.run_id != run_dir.run_id:
        raise ReleaseRefused("the samples changed after the audit; run the audit again before releasing")
    passed = np.array([s["index"] for s in audit.samples or [] if not s["flagged"]], dtype=np.int64)
    raw = yaml.safe_load(run_dir.recipe.read_text()) or {}
    data = raw.get("data", {})
    window = data.get("ct_window") or {}
    released = ReleasedSet(
        store=StoreImages(run_dir.samples) if run_dir.samples.is_dir() else samples.images,
        labels=samples.labels[passed],
        seeds=samples.seeds[passed],
        sample_index=passed,
        class_names=list(audit.data["class_names"]),
        private=PrivacyRecord.read(run_dir.privacy).private,
        run_id=audit.run_id,
        recipe_name=audit.recipe_name,
        recipe_sha256=audit.recipe_sha256,
        modality=audit.modality,
        source=data.get("source", ""),
        ct_window=(float(window["center"]), float(window["width"])) if window else None,
        epsilon=audit.privacy.get("epsilon"),
        delta=audit.privacy.get("delta"),
        nifti_spacing_mm=(raw.get("outputs") or {}).get("nifti_spacing_mm"),
    )
    return released, audit


def hf_features(class_names: list[str]):
    """The released columns: the image and what the DP generator and public seeds determine."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "run_id": datasets.Value("string"),
            "sample_seed": datasets.Value("int64"),
            "sample_index": datasets.Value("int64"),
        }
    )


def released_rows(released: ReleasedSet):
    """One dataset row per released image, made when asked for (nothing is held twice)."""
    for i in range(len(released.labels)):
        yield {
            "image": Image.fromarray(released.image(i), mode="L"),
            "label": int(released.labels[i]),
            "run_id": released.run_id,
            "sample_seed": int(released.seeds[i]),
            "sample_index": int(released.sample_index[i]),
        }


def parse_size(size: str | int) -> int:
    """'200MB', '1GiB' or a number of bytes → bytes, with `datasets`' own parser (the one its
    `max_shard_size` arguments use)."""
    from datasets.utils.py_utils import convert_file_size_to_int

    return convert_file_size_to_int(int(size) if str(size).isdigit() else size)


def write_rows(rows, features, folder: Path, max_shard_size: str = "200MB", batch_rows: int = 500) -> int:
    """A `datasets.DatasetDict` (train split) in `save_to_disk`'s layout under folder/dataset,
    streamed: `rows` go through `datasets`' own ArrowWriter (features encoded as `datasets`
    encodes them, images as PNG) straight into the final Arrow shards of at most
    `max_shard_size` each; at most `batch_rows` rows are held at a time, and no Arrow file is
    read back (a `Dataset.from_generator` cache followed by `save_to_disk` would write every
    byte twice and page the whole cache in). The shards are renamed to
    data-i-of-n.arrow once n is known, and state.json / dataset_info.json are written as
    `save_to_disk` writes them, so `datasets.load_from_disk` reads the folder. Returns the
    number of rows.

    Hand-written because `datasets` has no streaming `save_to_disk`. The layout is checked
    against the installed `datasets`' own `save_to_disk` by
    tests/test_export.py::test_streamed_writer_matches_save_to_disk_layout: passed with 5.2.0
    (pinned; the newest release on 2026-12-02) and 3.6.0 (3.x, the oldest pyproject allows)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    split = folder / "dataset" / "train"
    split.mkdir(parents=True)
    limit = parse_size(max_shard_size)
    shards: list[Path] = []
    writer, shard_bytes, n_rows, total_bytes = None, 0, 0, 0

    def close() -> None:
        nonlocal writer, total_bytes
        if writer is not None:
            total_bytes += writer.finalize()[1]
            writer.close()
            writer = None

    for row in rows:
        encoded = features.encode_example(row)
        size = sum(len(v["bytes"]) for v in encoded.values() if isinstance(v, dict) and v.get("bytes"))
        if writer is None or (shard_bytes and shard_bytes + size > limit):
            close()
            shards.append(split / f"part-{len(shards):05d}.arrow")
            writer = ArrowWriter(features=features, path=str(shards[-1]), writer_batch_size=batch_rows)
            shard_bytes = 0
        writer.write(encoded)
        shard_bytes += size
        n_rows += 1
    if writer is None:  # no rows: one empty shard, as save_to_disk writes for an empty dataset
        shards.append(split / "part-00000.arrow")
        writer = ArrowWriter(features=features, path=str(shards[-1]))
    close()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for path, name in zip(shards, names, strict=True):
        path.rename(split / name)
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": secrets.token_hex(8),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    (split / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    splits = datasets.SplitDict()
    splits.add(datasets.SplitInfo(name="train", num_bytes=total_bytes, num_examples=n_rows))
    datasets.DatasetInfo(features=features, splits=splits, dataset_size=total_bytes).write_to_directory(
        str(split)
    )
    (folder / "dataset" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    return n_rows


def write_hf(released: ReleasedSet, folder: Path) -> None:
    """A `datasets.DatasetDict` with a train split in save_to_disk's layout, streamed (`write_rows`)."""
    write_rows(released_rows(released), hf_features(released.class_names), folder)


def write_png(released: ReleasedSet, folder: Path) -> None:
    """png/<class>/<sample index>.png, 8-bit grayscale, each with a text chunk naming synthfactory
    and the run (a synthfactory image found without its release's ledger is then recognised)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(SYNTHETIC_MARKER, released.run_id)
    info.add_text("Software", f"synthfactory {__version__} (synthetic image)")
    for name in released.class_names:
        (folder / "png" / name).mkdir(parents=True, exist_ok=True)
    for k, (label, idx) in enumerate(zip(released.labels, released.sample_index, strict=True)):
        Image.fromarray(released.image(k), mode="L").save(
            folder / "png" / released.class_names[label] / f"{idx:06d}.png", pnginfo=info
        )


def write_grid(released: ReleasedSet, path: Path, per_class: int = 10) -> None:
    """A figure of released samples, one row per class (synthetic images only, all audited)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(released.class_names)
    fig, axes = plt.subplots(
        n_rows, per_class, figsize=(0.9 * per_class + 1.6, 0.95 * n_rows + 0.3), dpi=110, squeeze=False
    )
    for r, name in enumerate(released.class_names):
        picks = np.flatnonzero(released.labels == r)[:per_class]
        for c in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(picks):
                ax.imshow(released.image(picks[c]), cmap="gray", vmin=0, vmax=255)
        axes[r, 0].text(-0.15, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle("synthetic samples that passed the memorization audit", fontsize=8)
    fig.subplots_adjust(
        left=1.5 / (0.9 * per_class + 1.6), right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.05
    )
    fig.savefig(path)
    plt.close(fig)


def write_dicom(released: ReleasedSet, folder: Path) -> None:
    """dicom/<class>/<sample index>.dcm: Secondary Capture, marked synthetic (dicom_export)."""
    from .dicom_export import write_dicom_files

    write_dicom_files(released, folder)


def write_nifti(released: ReleasedSet, folder: Path) -> None:
    """nifti/<class>/<sample index>.nii: one 2D NIfTI-1 per slice, marked synthetic (nifti_export)."""
    from .nifti_export import write_nifti_files

    write_nifti_files(released, folder)


WRITERS: dict[str, Callable[[ReleasedSet, Path], None]] = {
    "hf": write_hf,
    "png": write_png,
    "dicom": write_dicom,
    "nifti": write_nifti,
}


def release(run_dir: RunDir, formats: list[str], report_dir: Path | None = None) -> tuple[Path, dict]:
    """Write the audited samples in each format, and a per-class grid of them (also into the
    audit report folder); returns the release folder and release.json. A run without the DP
    guarantee goes to release-NOT-PRIVATE/."""
    released, audit = audited_set(run_dir)
    privacy = PrivacyRecord.read(run_dir.privacy)
    final = run_dir.release_dir(released.private)
    with atomic_directory(final) as tmp:
        tmp.mkdir(parents=True)
        for fmt in formats:
            WRITERS[fmt](released, tmp)
        write_grid(released, tmp / "sample_grid.png")
        if report_dir is not None and report_dir.is_dir():
            shutil.copy(tmp / "sample_grid.png", report_dir / "sample_grid.png")
        counts = audit.summary
        info = {
            "schema": RELEASE_SCHEMA,
            "synthfactory_version": __version__,
            "run_id": run_dir.run_id,
            "private": released.private,
            "recipe_sha256": audit.recipe_sha256,
            "privacy": audit.privacy,
            "covered_by_epsilon": privacy.covered_by_epsilon,
            "not_covered_by_epsilon": privacy.not_covered_by_epsilon,
            "columns": list(hf_features(released.class_names)),
            "audit": {
                "schema": audit.schema_version,
                "decision": audit.decision,
                "spaces": list(audit.spaces),
                "false_alarm_percent": audit.calibration["false_alarm_target_percent"],
                **{k: counts[k] for k in ("n_samples", "n_flagged", "n_dropped", "n_released")},
                "privacy_of_these_figures": "computed from the private images: not covered by ε",
            },
            "class_names": released.class_names,
            "class_counts": {
                n: int((released.labels == i).sum()) for i, n in enumerate(released.class_names)
            },
            "formats": formats,
            "n_released": int(len(released.labels)),
        }
        if not released.private:
            info["warning"] = privacy.warning or "NOT PRIVATE"
        ReleaseRecord.model_validate(info).write(tmp / "release.json")
        write_release_ledger(run_dir, tmp, formats)
    return final, info


FORMAT_FOLDERS = {"hf": "dataset", "png": "png", "dicom": "dicom", "nifti": "nifti"}


def write_release_ledger(run_dir: RunDir, folder: Path, formats: list[str]) -> None:
    """The generator's ledger, public form (mechanisms and data descriptions; no source item, no
    answer hash), in the release folder and in each format's folder, so that any part of the
    release used as a data source brings its lineage (public.py)."""
    carried = read_artifact(run_dir.final_checkpoint / "unet")
    if carried is None:
        raise LedgerRefused(f"{run_dir.final_checkpoint}: the generator carries no {ARTIFACT_FILE}")
    for sub in ["", *(FORMAT_FOLDERS[f] for f in formats if f in FORMAT_FOLDERS)]:
        write_artifact(folder / sub, carried, public=True)
