"""The run records other stages read back, one typed model each: privacy.json (`PrivacyRecord`),
audit/audit.json (`AuditRecord`), release/release.json (`ReleaseRecord`) and evaluation.json
(`EvaluationRecord`).

Each model declares the fields another module reads; every other key its writer puts there is
kept as it is (`extra="allow"`), so a record read and written again is the same file: the same
keys, in the same order, with the same values. Each file names its layout in a `schema` key
(`schema_version` on the model); files written before privacy.json and release.json had one
read as the first version. `read` validates a file; `write` writes it atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .rundir import RunDir, write_json_atomic

# int stays int and float stays float (a plain `float` field would write 8 back as 8.0)
Number = int | float

PRIVACY_SCHEMA = "synthfactory.privacy/v1"
AUDIT_SCHEMA = "synthfactory.audit/v2"
RELEASE_SCHEMA = "synthfactory.release/v1"
EVALUATION_SCHEMA = "synthfactory.evaluation/v1"


class RecordError(ValueError):
    """A record file that is not valid JSON or lacks a field (the message names both)."""


class Record(BaseModel):
    """A JSON record of a run directory: declared fields typed, every other key kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    kind: ClassVar[str] = "record"
    _keys: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler):
        record = handler(data)
        if isinstance(data, dict):
            record._keys = list(data)
        return record

    @classmethod
    def read(cls, path: Path):
        """The record in `path`, validated. FileNotFoundError if there is none; RecordError if it
        is not JSON or lacks a field, naming the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {cls.kind} record (file not found)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(f"{path}: not a {cls.kind} record: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise RecordError(f"{path}: not a {cls.kind} record: a JSON object expected")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
            )
            raise RecordError(f"{path}: not a valid {cls.kind} record: {problems}") from e

    def to_dict(self) -> dict:
        """The record as written: the keys it was built from, in their order, then any set later."""
        data = self.model_dump(by_alias=True, exclude_unset=True)
        first = [k for k in self._keys if k in data]
        return {**{k: data[k] for k in first}, **{k: v for k, v in data.items() if k not in first}}

    def pick(self, keys) -> dict:
        """The record's values of those `keys` it holds (as written), in the order given."""
        data = self.to_dict()
        return {k: data[k] for k in keys if k in data}

    def write(self, path: Path) -> None:
        """Write the record atomically (temp file + rename), indented as every run record is."""
        write_json_atomic(Path(path), self.to_dict())


class PrivacyRecord(Record):
    """privacy.json: ε spent, how the model was trained, what ε covers (train stage)."""

    kind: ClassVar[str] = "privacy"

    schema_version: str = Field(PRIVACY_SCHEMA, alias="schema")
    """The record's layout ("synthfactory.privacy/v1"; older files without the key read as it)."""
    private: bool
    """Whether the run carries the DP guarantee (DP-SGD with an unseeded, secret noise)."""
    mechanism: str = ""
    """How the model was trained: DP-SGD (and with what), or NOT PRIVATE plain SGD."""
    n_train: int | None = None
    """How many private training images."""
    expected_batch_size: int | None = None
    """The expected (Poisson) batch size of a step."""
    steps_taken: int
    """Optimizer steps taken (what the accountant counted for this run)."""
    data_manifest_sha256: str
    """Hash of the private data manifest the model was trained on."""
    recipe_sha256: str
    """Hash of the validated recipe the run was trained from."""
    epsilon: Number | None = None
    """ε spent by the accountant (None without DP-SGD)."""
    delta: Number | None = None
    """δ of the guarantee (None without DP-SGD)."""
    target_epsilon: Number | None = None
    """The recipe's ε budget (DP-SGD only)."""
    accountant: str | None = None
    """The accountant ε is reported by: "rdp" or "prv" (DP-SGD only)."""
    epsilon_other_accountant: dict[str, Number] = {}
    """ε by the other accountant, by its name (DP-SGD only)."""
    noise_multiplier: Number | None = None
    """σ of the Gaussian noise, as the accountant recorded it (DP-SGD only)."""
    sample_rate: Number | None = None
    """q, the Poisson sampling rate."""
    max_grad_norm: Number | None = None
    """C, the per-example clipping norm (DP-SGD only)."""
    accountant_history: list[list[Number]] = []
    """The whole accountant history, (σ, q, steps) entries, prior runs' first (DP-SGD only)."""
    covered_by_epsilon: list[str] = []
    """What ε covers (empty for a run without the guarantee)."""
    not_covered_by_epsilon: list[str] = []
    """What ε does not cover."""
    public_inputs: list[str] = []
    """What the run treated as public (architecture, public pre-training, ...)."""
    warning: str | None = None
    """The NOT PRIVATE warning of a run without the guarantee (absent otherwise)."""
    composed_with: dict[str, Any] | None = None
    """The DP run whose weights pre-training loaded, and its accountant history, if any."""
    warm_start: dict[str, Any] | None = None
    """The warm start's DP query, if the recipe has one."""
    train_seconds: Number = 0.0
    """Seconds spent training (over every resume)."""


class AuditRecord(Record):
    """audit/audit.json: the memorization audit (audit stage). The public copy under
    privacy_audits/ is the same record without the per-sample list and the manifest hash."""

    kind: ClassVar[str] = "audit"

    schema_version: str = Field(AUDIT_SCHEMA, alias="schema")
    """The record's layout ("synthfactory.audit/v2")."""
    run_id: str
    """The audited run."""
    recipe_name: str
    """The run's recipe name."""
    recipe_sha256: str
    """Hash of the run's validated recipe."""
    modality: str
    """The images' modality (mri, ct or us)."""
    samples_sha256: str | None = None
    """Hash of the sample store the audit read (the release checks it is unchanged)."""
    privacy: dict[str, Any]
    """The run's ε, δ and whether it is private, as the audit saw them."""
    data: dict[str, Any]
    """The data audited against: class names, image size, counts."""
    calibration: dict[str, Any]
    """How the gate's thresholds were set on held-out images (false-alarm target, duplicates)."""
    spaces: dict[str, Any]
    """Per feature space: threshold and counts."""
    threshold: dict[str, Any] = {}
    """The global pixel-L2 threshold ({"space", "value"})."""
    action: str | None = None
    """What the gate does with a suspected copy ("drop" or "block")."""
    decision: str
    """"release" or "block"."""
    summary: dict[str, Any]
    """Counts: n_samples, n_flagged, n_dropped, n_released, ..."""
    samples: list[dict[str, Any]] | None = None
    """Per sample: index, nearest training image, scores, flagged (run directory only)."""
    data_copying: dict[str, Any] | None = None
    """The data-copying test (C_T), if run."""
    membership_inference: dict[str, Any] | None = None
    """The membership-inference attack (AUC, non-private reference), if run."""
    canary_audit: dict[str, Any] | None = None
    """The canary audit (empirical ε lower bound, accountant ε), if run."""
    limits: list[str] = []
    """What the audit cannot show (its first entry: what it reads)."""

    @property
    def mia_auc(self) -> float | None:
        """The membership-inference attack's AUC, if it ran."""
        return (self.membership_inference or {}).get("auc")

    @property
    def mia_auc_nonprivate(self) -> float | None:
        """The same attack's AUC on the non-private reference model, if it ran."""
        return ((self.membership_inference or {}).get("nonprivate_reference") or {}).get("auc")

    @property
    def canary_epsilon_lower_bound(self) -> float | None:
        """The canary audit's empirical ε lower bound, if it ran."""
        return (self.canary_audit or {}).get("epsilon_lower_bound")

    @property
    def canary_accountant_epsilon(self) -> float | None:
        """The accountant's ε of the canary audit's model, if it ran."""
        return (self.canary_audit or {}).get("accountant_epsilon")


class ReleaseRecord(Record):
    """release/release.json: what was released and why (release stage)."""

    kind: ClassVar[str] = "release"

    schema_version: str = Field(RELEASE_SCHEMA, alias="schema")
    """The record's layout ("synthfactory.release/v1"; older files without the key read as it)."""
    run_id: str
    """The released run."""
    private: bool
    """Whether the run carries the DP guarantee."""
    privacy: dict[str, Any]
    """ε, δ and whether private, as the audit recorded them."""
    audit: dict[str, Any]
    """The audit's schema, decision and counts."""
    class_names: list[str]
    """The class names, in label order."""
    formats: list[str]
    """The formats written (hf, png, dicom, ...)."""
    n_released: int
    """How many samples were released."""
    warning: str | None = None
    """The NOT PRIVATE warning of a run without the guarantee (absent otherwise)."""


class EvaluationRecord(Record):
    """evaluation.json: TSTR/TRTR, fidelity and diversity of the released samples (evaluate stage)."""

    kind: ClassVar[str] = "evaluation"

    schema_version: str = Field(EVALUATION_SCHEMA, alias="schema")
    """The record's layout ("synthfactory.evaluation/v1")."""
    run_id: str
    """The evaluated run."""
    epsilon: Number | None = None
    """The run's ε (None without DP-SGD)."""
    delta: Number | None = None
    """The run's δ (None without DP-SGD)."""
    private: bool | None = None
    """Whether the run carries the DP guarantee."""
    tstr: dict[str, Any]
    """Train on synthetic, test on real: accuracy, chance accuracy, ... (the mean over the
    classifier seeds; each seed's figures under `per_seed`)."""
    trtr: dict[str, Any]
    """Train on real, test on real: accuracy, ... (as `tstr`)."""
    tstr_over_trtr_accuracy: Number
    """TSTR accuracy over TRTR accuracy."""
    tstr_over_trtr_above_chance: Number | None = None
    """The same ratio above chance (None where TRTR is at chance)."""
    above_chance_per_seed: list[Number | None] | None = None
    """Above chance of each classifier seed alone (TSTR and TRTR trained with that seed)."""
    intervals: dict[str, Any] | None = None
    """Bootstrap 95 % intervals of TSTR, TRTR and above chance over the held-out split (None when
    `evaluation.bootstrap_resamples` is 0)."""
    fidelity: dict[str, Any]
    """Fréchet distances: synthetic vs real, real train vs held-out."""


@dataclass(frozen=True)
class RunRecords:
    """A run read back from its run directory, never recomputed: run.json and each record that is
    there (None where its stage has not written it). `run.summary` (what the CLI prints at the
    end) and `provenance.lineage` (`synthfactory inspect`) are both views of this."""

    info: dict = field(default_factory=dict)
    """run.json ({} before the run exists)."""
    privacy: PrivacyRecord | None = None
    """privacy.json (train stage)."""
    audit: AuditRecord | None = None
    """audit/audit.json (audit stage)."""
    release: ReleaseRecord | None = None
    """release.json in the run's release folder (release stage)."""
    evaluation: EvaluationRecord | None = None
    """evaluation.json (evaluate stage)."""

    @property
    def stages(self) -> dict:
        """The stages done, by name, with what each recorded (run.json)."""
        return self.info.get("stages", {})

    @classmethod
    def read(cls, run_dir: RunDir) -> RunRecords:
        privacy = PrivacyRecord.read(run_dir.privacy) if run_dir.privacy.exists() else None
        release = run_dir.release_dir(bool(privacy and privacy.private)) / "release.json"
        return cls(
            info=run_dir.info(),
            privacy=privacy,
            audit=AuditRecord.read(run_dir.audit_json) if run_dir.audit_json.exists() else None,
            release=ReleaseRecord.read(release) if release.exists() else None,
            evaluation=EvaluationRecord.read(run_dir.evaluation) if run_dir.evaluation.exists() else None,
        )


__all__ = [
    "AUDIT_SCHEMA",
    "EVALUATION_SCHEMA",
    "PRIVACY_SCHEMA",
    "RELEASE_SCHEMA",
    "AuditRecord",
    "EvaluationRecord",
    "PrivacyRecord",
    "RecordError",
    "ReleaseRecord",
    "RunRecords",
]
