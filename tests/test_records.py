"""The typed run records (synthfactory/records.py): a round trip keeps every key, a broken file
fails naming the file and the field, and the committed reports under privacy_audits/ read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthfactory.records import (
    AuditRecord,
    EvaluationRecord,
    PrivacyRecord,
    RecordError,
    ReleaseRecord,
    RunRecords,
)

REPO = Path(__file__).resolve().parents[1]
AUDITS = REPO / "privacy_audits"

PRIVACY = {
    "schema": "synthfactory.privacy/v1",
    "private": True,
    "mechanism": "DP-SGD (Opacus 1.5): per-example clipping, Gaussian noise, Poisson sampling",
    "n_train": 40,
    "expected_batch_size": 8,
    "sample_rate": 0.2,
    "steps_planned": 4,
    "steps_taken": 4,
    "data_manifest_sha256": "ab" * 32,
    "recipe_sha256": "cd" * 32,
    "accountant": "prv",
    "target_epsilon": 8,
    "delta": 1e-5,
    "epsilon": 7.5,
    "epsilon_other_accountant": {"rdp": 7.9},
    "noise_multiplier": 1.25,
    "max_grad_norm": 1,
    "accountant_history": [[1.25, 0.2, 4]],
    "covered_by_epsilon": ["the weights"],
    "not_covered_by_epsilon": ["the audit"],
    "train_seconds": 3.5,
    "timesteps": {"train": "uniform"},
    "an_extra_key": [1, {"nested": None}],
}

AUDIT = {
    "schema": "synthfactory.audit/v2",
    "synthfactory_version": "0.1.0",
    "run_id": "tiny-20260101-000000-abcd",
    "recipe_name": "tiny",
    "recipe_sha256": "cd" * 32,
    "modality": "ct",
    "samples_sha256": "ef" * 32,
    "privacy": {"private": True, "epsilon": 7.5, "delta": 1e-5},
    "data": {"class_names": ["a", "b"], "image_size": [16, 16]},
    "calibration": {"false_alarm_target_percent": 1, "heldout_near_duplicates": 0},
    "spaces": {"pixel_l2": {"threshold": 2.5}},
    "threshold": {"space": "pixel_l2", "value": 2.5},
    "data_copying": None,
    "membership_inference": {"auc": 0.5},
    "canary_audit": None,
    "action": "drop",
    "decision": "release",
    "summary": {"n_samples": 2, "n_flagged": 1, "n_dropped": 1, "n_released": 1},
    "samples": [{"index": 0, "flagged": False}, {"index": 1, "flagged": True}],
    "seconds": 1.0,
    "an_extra_key": {"x": 1},
}

RELEASE = {
    "schema": "synthfactory.release/v1",
    "synthfactory_version": "0.1.0",
    "run_id": "tiny-20260101-000000-abcd",
    "private": False,
    "recipe_sha256": "cd" * 32,
    "privacy": {"private": False, "epsilon": None},
    "covered_by_epsilon": [],
    "not_covered_by_epsilon": ["the audit"],
    "columns": ["image", "label"],
    "audit": {"schema": "synthfactory.audit/v2", "decision": "release", "n_released": 1},
    "class_names": ["a", "b"],
    "class_counts": {"a": 1, "b": 0},
    "formats": ["hf", "png"],
    "n_released": 1,
    "warning": "NOT PRIVATE",
}

EVALUATION = {
    "schema": "synthfactory.evaluation/v1",
    "synthfactory_version": "0.1.0",
    "run_id": "tiny-20260101-000000-abcd",
    "recipe_name": "tiny",
    "epsilon": None,
    "delta": None,
    "private": False,
    "tstr": {"accuracy": 0.5, "chance_accuracy": 0.5},
    "trtr": {"accuracy": 1.0},
    "tstr_over_trtr_accuracy": 0.5,
    "tstr_over_trtr_above_chance": None,
    "fidelity": {"frechet_distance": 3, "frechet_distance_real_train_vs_heldout": 1.5},
    "diversity": {"x": float("nan")},
    "rules": ["one"],
}

CASES = [
    (PrivacyRecord, PRIVACY),
    (AuditRecord, AUDIT),
    (ReleaseRecord, RELEASE),
    (EvaluationRecord, EVALUATION),
]


def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


@pytest.mark.parametrize(("model", "data"), CASES, ids=[c[0].__name__ for c in CASES])
def test_round_trip_keeps_every_key_value_and_order(model, data, tmp_path: Path) -> None:
    record = model.read(_write(tmp_path / "in.json", data))
    record.write(tmp_path / "out.json")
    text = (tmp_path / "out.json").read_text()
    assert text == (tmp_path / "in.json").read_text()  # same keys, order, values (8 stays 8)
    assert record.schema_version == data["schema"]
    again = model.model_validate(data).to_dict()
    assert list(again) == list(data)


def test_attributes_and_extra_keys() -> None:
    privacy = PrivacyRecord.model_validate(PRIVACY)
    assert privacy.epsilon == 7.5 and privacy.steps_taken == 4 and privacy.private is True
    assert privacy.target_epsilon == 8 and isinstance(privacy.target_epsilon, int)
    assert privacy.accountant_history == [[1.25, 0.2, 4]]
    assert privacy.an_extra_key == [1, {"nested": None}]
    assert privacy.warning is None and "warning" not in privacy.to_dict()  # no key added
    assert privacy.pick(["epsilon", "warning", "delta"]) == {"epsilon": 7.5, "delta": 1e-5}
    audit = AuditRecord.model_validate(AUDIT)
    assert audit.decision == "release" and audit.summary["n_flagged"] == 1


def test_older_files_without_schema_read_as_the_first_version(tmp_path: Path) -> None:
    old = {k: v for k, v in PRIVACY.items() if k != "schema"}
    record = PrivacyRecord.read(_write(tmp_path / "privacy.json", old))
    assert record.schema_version == "synthfactory.privacy/v1"
    assert record.to_dict() == old  # written back as it was
    rel = ReleaseRecord.read(
        _write(tmp_path / "release.json", {k: v for k, v in RELEASE.items() if k != "schema"})
    )
    assert rel.schema_version == "synthfactory.release/v1"


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (PrivacyRecord, PRIVACY, "epsilon_other_accountant"),
        (PrivacyRecord, PRIVACY, "steps_taken"),
        (AuditRecord, AUDIT, "decision"),
        (ReleaseRecord, RELEASE, "n_released"),
        (EvaluationRecord, EVALUATION, "tstr"),
    ],
)
def test_a_missing_or_wrong_field_names_the_file_and_the_field(model, data, field, tmp_path: Path) -> None:
    broken = dict(data)
    if field == "epsilon_other_accountant":  # optional: a wrong type fails too
        broken[field] = "not a mapping"
    else:
        del broken[field]
    path = _write(tmp_path / "record.json", broken)
    with pytest.raises(RecordError) as e:
        model.read(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_a_missing_or_malformed_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="privacy.json"):
        PrivacyRecord.read(tmp_path / "privacy.json")
    (tmp_path / "audit.json").write_text('{"schema": ')
    with pytest.raises(RecordError, match="audit.json.*not valid JSON"):
        AuditRecord.read(tmp_path / "audit.json")
    (tmp_path / "evaluation.json").write_text("[1, 2]")
    with pytest.raises(RecordError, match="evaluation.json.*JSON object"):
        EvaluationRecord.read(tmp_path / "evaluation.json")


def _committed(pattern: str) -> list[Path]:
    return sorted(AUDITS.glob(pattern))


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (AuditRecord, "*/*/audit.json"),
        (EvaluationRecord, "*/*/evaluation.json"),
        (ReleaseRecord, "*/*/release/release.json"),
    ],
)
def test_committed_reports_read_and_round_trip(model, pattern: str) -> None:
    files = _committed(pattern)
    assert files, f"no committed {pattern} under privacy_audits/"
    for path in files:
        record = model.read(path)
        assert record.to_dict() == json.loads(path.read_text()), path
        assert list(record.to_dict()) == list(json.loads(path.read_text())), path


def test_run_records_read_back_what_is_there(tmp_path: Path) -> None:
    from synthfactory.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    empty = RunRecords.read(run_dir)
    assert empty.info == {} and empty.privacy is None and empty.audit is None and empty.stages == {}
    run_dir.root.mkdir()
    _write(run_dir.privacy, {**PRIVACY, "private": False})
    _write(run_dir.evaluation, EVALUATION)
    run_dir.audit_json.parent.mkdir()
    _write(run_dir.audit_json, AUDIT)
    folder = run_dir.release_dir(False)
    folder.mkdir()
    _write(folder / "release.json", RELEASE)
    run = RunRecords.read(run_dir)
    assert run.privacy.private is False and run.release.n_released == 1
    assert run.audit.mia_auc == 0.5 and run.audit.canary_epsilon_lower_bound is None
    assert run.evaluation.tstr_over_trtr_accuracy == 0.5
