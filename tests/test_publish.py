"""Publishing: the dataset card, the refusal rules, a real `push_to_hub` against a stand-in Hub
on loopback, the local round trip, provenance and `synthfactory inspect`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from hub_standin import StandInHub

from synthfactory.audit import run_audit
from synthfactory.export import release
from synthfactory.publish import PublishRefused, check_publishable, dataset_card, publish
from synthfactory.rundir import read_json, write_json_atomic
from synthfactory.sample import Samples

TOKEN = "hf_standin_SECRET_token_0123456789"


@pytest.fixture(scope="module")
def released_once(tiny_run, tmp_path_factory):
    """The tiny run, audited and released (hf + png + dicom) once for this module."""
    import shutil

    from synthfactory.rundir import RunDir

    checked, src = tiny_run
    base = tmp_path_factory.mktemp("released")
    run_dir = RunDir(base / "runs" / src.run_id)
    shutil.copytree(src.root, run_dir.root)
    res = run_audit(checked.recipe, run_dir, checked.images, base / "pa")
    run_dir.mark_done("audit", decision=res.decision, report=str(res.report_dir))
    folder, _ = release(run_dir, ["hf", "png", "dicom"], report_dir=res.report_dir)
    run_dir.mark_done("release", folder=str(folder))
    return checked, run_dir


@pytest.fixture
def released(released_once, tmp_path):
    """A private copy of the released run, free to modify (run.json paths still point at the
    module's audit report, which no test changes)."""
    import shutil

    from synthfactory.rundir import RunDir

    checked, run_dir = released_once
    dest = RunDir(tmp_path / "runs" / run_dir.run_id)
    shutil.copytree(run_dir.root, dest.root)
    return checked, dest


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as hc

    with StandInHub() as h:
        monkeypatch.setattr(hc, "ENDPOINT", h.endpoint)
        monkeypatch.setattr(
            hc, "HUGGINGFACE_CO_URL_TEMPLATE", h.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        # The stand-in speaks the Git LFS upload protocol, not Xet (see hub_standin.py).
        monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", h.endpoint)
        yield h


def test_card_renders_the_runs_own_numbers(released) -> None:
    _, run_dir = released
    privacy, audit = read_json(run_dir.privacy), read_json(run_dir.audit_json)
    card = dataset_card(run_dir, {"no_lesion": 3, "lesion": 5})
    meta = yaml.safe_load(card.split("---\n")[1])
    from huggingface_hub import DatasetCard

    assert DatasetCard(card).data.to_dict() == meta  # huggingface_hub reads back what it wrote
    assert meta["size_categories"] == ["n<1K"] and meta["pretty_name"].startswith("synthfactory ")
    assert meta["task_categories"] == ["image-classification"]
    assert {"synthetic", "medical", "differential-privacy", "mri"} <= set(meta["tags"])
    assert meta["license"] == "other"
    body = card.split("---\n", 2)[2]
    assert f"ε = {privacy['epsilon']:.3f}" in body and f"δ = {privacy['delta']:g}" in body
    assert f"σ = {privacy['noise_multiplier']:.4f}" in body and privacy["accountant"].upper() in body
    assert f"released {audit['summary']['n_released']}" in body
    assert f"{audit['membership_inference']['auc']:.3f}" in body
    assert "not for diagnosis" in body.lower() or "none may be used for diagnosis" in body
    assert privacy["recipe_sha256"] in body and "| lesion | 5 |" in body
    assert not body.startswith("**WARNING")
    # What ε covers, and what it does not, in the card's own words.
    s = audit["summary"]
    assert "**What ε covers.** The generator's weights, and every image it drew" in body
    assert f"all {s['n_samples']} samples" in body
    assert "**What ε does not cover.** Which samples were released" in body
    assert f"withheld {s['n_samples'] - 8} of them (8 released)" in body  # the 3 + 5 pushed
    assert "not covered by ε" in body.split("## Memorization audit")[1].split("\n\n")[1]
    assert "nn_distance" not in body and "audit_verdict" not in body
    assert privacy["data_manifest_sha256"] not in card  # a hash of the exact private set stays inside


def test_cards_name_the_weights_the_checkpoint_samples_with(released) -> None:
    """Both cards follow model_index.json's `use_ema` (what sampling used), not the recipe."""
    import json

    from synthfactory.publish import model_card

    _, run_dir = released
    index_path = run_dir.final_checkpoint / "model_index.json"
    for use_ema, dataset_words, model_words in (
        (True, "EMA weights", "its EMA weights"),
        (False, "last weights", "its last weights"),
    ):
        index = json.loads(index_path.read_text())
        index["use_ema"] = use_ema
        index_path.write_text(json.dumps(index))
        assert dataset_words in dataset_card(run_dir, {"lesion": 1}).split("## Generator")[1]
        assert model_words in model_card(run_dir)


def _keys_and_strings(obj, path=""):
    """Every (dotted key, value) of a JSON object, leaves only."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _keys_and_strings(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _keys_and_strings(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_public_reports_hold_aggregates_only(released) -> None:
    """The report folder and the release (which may be committed or published) keep every
    aggregate statistic but no sample's nearest training image, distance or score, no minimum or
    maximum (one image's score), no local path and no hash of the private data; the run directory
    keeps the per-sample figures."""
    _, run_dir = released
    report = Path(run_dir.info()["stages"]["audit"]["report"])
    public, internal = read_json(report / "audit.json"), read_json(run_dir.audit_json)
    assert "samples" not in public and len(internal["samples"]) == internal["summary"]["n_samples"]
    assert "not covered by ε" in public["privacy_of_this_report"]
    assert "manifest_sha256" in internal["data"] and "manifest_sha256" not in public["data"]
    assert "nn_distance_min" in internal["summary"] and "nn_distance_min" not in public["summary"]
    inner = {"1", "5", "25", "50", "75", "95", "99"}
    for name, sp in public["spaces"].items():
        assert set(sp["heldout_percentiles"]) == set(sp["synthetic_percentiles"]) == inner, name
        assert {"0", "100"} <= set(internal["spaces"][name]["heldout_percentiles"])
    for key, table in public["neighbour_ratios"].items():
        assert not isinstance(table, dict) or set(table) == inner, key
    root = str(run_dir.root.parents[1])
    public_files = [report / "audit.json", run_dir.release_dir(True) / "release.json",
                    run_dir.release_dir(True) / "synthfactory_ledger.json"]  # fmt: skip
    for f in public_files:
        for key, value in _keys_and_strings(read_json(f)):
            assert not (isinstance(value, str) and root in value), (f.name, key)
            assert not ("percentiles." in key and key.endswith((".0", ".100"))), (f.name, key)
            assert not re.search(r"\.(items|nn_distance_min|answer_sha256|manifest_sha256)(\[|$)", key), (
                f.name,
                key,
            )
    for d in read_json(run_dir.release_dir(True) / "synthfactory_ledger.json")["datasets"]:
        assert "n_items" not in d  # distinct items against images would count the duplicates
    md = (report / "audit-summary.md").read_text()
    assert "## What ε covers" in md and "Not covered:" in md and "the generator's weights" in md
    assert root not in md and "What the screen covers" in md
    assert read_json(run_dir.release_dir(True) / "release.json")["covered_by_epsilon"]


def test_a_seeded_run_is_released_and_published_as_not_private(tmp_path, hub) -> None:
    from conftest import tiny_recipe, write_recipe
    from typer.testing import CliRunner

    from synthfactory.cli import app

    recipe = write_recipe(tmp_path, tiny_recipe(privacy__noise_seed=7))
    runner = CliRunner()
    res = runner.invoke(
        app, ["run", str(recipe), "--out", str(tmp_path / "runs"), "--audit-dir", str(tmp_path / "pa"), "-q"]
    )
    assert res.exit_code == 0, res.output
    assert "NOT PRIVATE: privacy.noise_seed" in res.output
    (root,) = (tmp_path / "runs").iterdir()
    assert "NOT-PRIVATE" in root.name and not (root / "release").exists()
    rel = read_json(root / "release-NOT-PRIVATE" / "release.json")
    assert rel["private"] is False and rel["warning"].startswith("NOT PRIVATE: privacy.noise_seed")
    assert "NOT PRIVATE" in (tmp_path / "pa" / "tiny" / root.name / "audit-summary.md").read_text()

    res = runner.invoke(app, ["publish", str(root), "--repo-id", "lab/seeded"])
    assert res.exit_code == 3 and "publish refused" in res.output and "privacy.noise_seed" in res.output
    assert "lab/seeded" not in hub.repos
    res = runner.invoke(app, ["publish", str(root), "--repo-id", "lab/seeded", "--force-not-private"])
    assert res.exit_code == 0, res.output
    card = hub.files("lab/seeded")["README.md"].decode()
    assert _first_line(card).startswith("**WARNING: NOT PRIVATE: privacy.noise_seed")
    assert "**None.** NOT PRIVATE" in card and "**without a privacy guarantee**" in card


def test_network_and_token_failures_end_with_one_line(released, monkeypatch) -> None:
    import socket

    import httpx2
    import huggingface_hub.constants as hc
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from typer.testing import CliRunner

    from synthfactory.cli import app

    _, run_dir = released
    before = sorted(p.name for p in run_dir.root.iterdir())
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(hc, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = CliRunner().invoke(app, ["publish", str(run_dir.root), "--repo-id", "lab/x"])
    assert res.exit_code == 1, res.output
    assert res.output.count("\n") == 1 and "cannot reach the Hub at " + endpoint in res.output
    assert "Traceback" not in res.output and TOKEN not in res.output

    def refuse(*args, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("POST", endpoint + "/api/repos/create"))
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    res = CliRunner().invoke(app, ["publish", str(run_dir.root), "--repo-id", "lab/x"])
    assert res.exit_code == 1 and "refused the token (HTTP 401)" in res.output, res.output
    assert sorted(p.name for p in run_dir.root.iterdir()) == before  # no publish.json


def test_size_category_follows_the_hub_tiers() -> None:
    from synthfactory.publish import size_category

    got = [size_category(n) for n in (0, 999, 1000, 9_999, 10_000, 123_456, 2_000_000, 10**13)]
    assert got == ["n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>1T"]


def test_publish_model_pushes_the_pipeline_and_a_model_card(released, hub, tmp_path) -> None:
    import torch
    from huggingface_hub import ModelCard
    from typer.testing import CliRunner

    from synthfactory.cli import app
    from synthfactory.pipeline import ClassConditionalPipeline

    _, run_dir = released
    res = CliRunner().invoke(app, ["publish", str(run_dir.root), "--repo-id", "lab/gen", "--model"])
    assert res.exit_code == 0, res.output
    assert hub.repos["lab/gen"].repo_type == "model" and hub.repos["lab/gen"].private
    files = hub.files("lab/gen")
    assert {"model_index.json", "README.md", "unet/config.json", "scheduler/scheduler_config.json"} <= set(
        files
    )
    assert not [f for f in files if "synthfactory_origin" in f or f.endswith("synthfactory.json")]
    # each model folder carries the public form of its ledger: the mechanisms, no data identity
    pushed = json.loads(files["unet/synthfactory_ledger.json"])
    internal = read_json(run_dir.final_checkpoint / "unet" / "synthfactory_ledger.json")
    assert pushed["public"] and [m["id"] for m in pushed["mechanisms"]] == [
        m["id"] for m in internal["mechanisms"]
    ]
    assert "items" in internal["datasets"][0] and all("items" not in d for d in pushed["datasets"])
    privacy = read_json(run_dir.privacy)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "diffusers" and "differential-privacy" in card.data.tags
    assert f"ε = {privacy['epsilon']:.3f}" in card.text and f"δ = {privacy['delta']:g}" in card.text
    assert f"σ = {privacy['noise_multiplier']:.4f}" in card.text and "Treated as public" in card.text
    assert privacy["data_manifest_sha256"] not in card.text and "training images:" not in card.text
    # what was pushed loads as the pipeline and draws what the local one draws
    local = tmp_path / "pulled"
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    pulled = ClassConditionalPipeline.from_pretrained(local)
    here = ClassConditionalPipeline.from_pretrained(run_dir.final_checkpoint)
    a, b = (p([0, 1], 2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="uint8").images
            for p in (pulled, here))  # fmt: skip
    np.testing.assert_array_equal(a, b)
    assert read_json(run_dir.root / "publish_model.json")["repo_id"] == "lab/gen"


def test_publish_model_asks_for_a_flag_when_the_audit_withheld_samples(released, hub) -> None:
    """The generator can draw again what the audit withheld (public seeds, the gaps in
    sample_index): publishing it asks for --force-withheld, and its card then says so."""
    from typer.testing import CliRunner

    from synthfactory.cli import app

    _, run_dir = released
    audit = read_json(run_dir.audit_json)
    audit["summary"] = {
        **audit["summary"],
        "n_flagged": 2,
        "n_dropped": 2,
        "n_released": audit["summary"]["n_samples"] - 2,
    }
    write_json_atomic(run_dir.audit_json, audit)
    runner = CliRunner()
    res = runner.invoke(app, ["publish", str(run_dir.root), "--repo-id", "lab/gen", "--model"])
    assert (
        res.exit_code == 3 and "withheld 2 of this run's" in res.output and "--force-withheld" in res.output
    )
    assert "lab/gen" not in hub.repos
    res = runner.invoke(
        app, ["publish", str(run_dir.root), "--repo-id", "lab/gen", "--model", "--force-withheld"]
    )
    assert res.exit_code == 0, res.output
    card = hub.files("lab/gen")["README.md"].decode()
    assert _first_line(card).startswith("**WARNING: The memorization audit withheld 2")
    assert "withheld 2 of its samples" in card and "draws them again" in card
    dataset_text = dataset_card(run_dir, {"lesion": 1})
    assert (
        "It applies to this dataset only" in dataset_text and "can draw again the 2 samples" in dataset_text
    )


def test_publish_model_refuses_a_non_private_run(released, hub) -> None:
    from synthfactory.publish import publish_model

    _, run_dir = released
    privacy = read_json(run_dir.privacy)
    (run_dir.privacy).write_text(json.dumps({**privacy, "private": False, "warning": "NOT PRIVATE: test"}))
    with pytest.raises(PublishRefused, match="NOT PRIVATE"):
        publish_model(run_dir, "lab/np")
    assert "lab/np" not in hub.repos


def test_refusal_rules(released) -> None:
    _, run_dir = released
    assert check_publishable(run_dir) == []
    privacy = read_json(run_dir.privacy)
    write_json_atomic(run_dir.privacy, {**privacy, "private": False, "epsilon": None})
    with pytest.raises(PublishRefused, match="WITHOUT differential privacy"):
        check_publishable(run_dir)
    warnings = check_publishable(run_dir, force_not_private=True)
    assert _first_line(dataset_card(run_dir, {"lesion": 1}, warnings)).startswith("**WARNING: NOT PRIVATE")
    write_json_atomic(run_dir.privacy, privacy)
    audit = read_json(run_dir.audit_json)
    write_json_atomic(run_dir.audit_json, {**audit, "decision": "block"})
    with pytest.raises(PublishRefused, match="blocked"):
        check_publishable(run_dir)
    warnings = check_publishable(run_dir, force_blocked=True)
    assert _first_line(dataset_card(run_dir, {"lesion": 1}, warnings)).startswith("**WARNING: AUDIT BLOCKED")


def test_local_round_trip_keeps_pixels_and_provenance(released) -> None:
    import datasets

    _, run_dir = released
    audit = read_json(run_dir.audit_json)
    samples = Samples.load(run_dir.samples)
    ds = datasets.load_from_disk(str(run_dir.release_dir(True) / "dataset"))["train"]
    passed = [s for s in audit["samples"] if not s["flagged"]]
    assert len(ds) == len(passed) > 0
    for row, s in zip(ds, passed, strict=True):
        np.testing.assert_array_equal(np.asarray(row["image"]), samples.images[s["index"]])
        assert row["label"] == s["label"] and row["sample_seed"] == s["seed"]
        assert row["run_id"] == run_dir.run_id and row["sample_index"] == s["index"]
    assert list(ds.features) == ["image", "label", "run_id", "sample_seed", "sample_index"]


def test_push_to_standin_hub_then_load_dataset(released, hub, tmp_path, capsys) -> None:
    import datasets

    _, run_dir = released
    release_before = _tree_hash(run_dir.release_dir(True))
    out = publish(run_dir, "hospital/synthetic-mri", max_shard_size="1KB")  # several shards
    files = hub.files("hospital/synthetic-mri")
    assert {"README.md", "privacy_audit/audit-summary.md", "recipe.yaml", "synthfactory_ledger.json"} <= set(
        files
    )
    pushed = json.loads(files["synthfactory_ledger.json"])
    assert pushed["public"] and all("items" not in d for d in pushed["datasets"])
    shards = [p for p in files if p.startswith("data/train-") and p.endswith(".parquet")]
    assert len(shards) >= 2, shards
    assert not [p for p in files if "internal" in p or p.endswith(".html")]
    assert hub.repos["hospital/synthetic-mri"].private and out["private"]
    card = files["README.md"].decode()
    assert "dataset_info:" in card and "# Synthetic MRI images" in card  # datasets merged its metadata
    assert f"{read_json(run_dir.privacy)['n_train']} private training images" in card
    recipe = yaml.safe_load(files["recipe.yaml"])
    assert recipe["name"] == "tiny" and "/" not in str(recipe["outputs"]["destination"])
    # The token travels in the Authorization header only, and is stored nowhere.
    for r in hub.requests:
        assert TOKEN not in r.path and TOKEN.encode() not in r.body
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in (run_dir.root / "publish.json").read_text() and TOKEN not in capsys.readouterr().out
    assert _tree_hash(run_dir.release_dir(True)) == release_before
    # load_dataset on a copy of the pushed repository, no custom code.
    local = tmp_path / "clone"
    for p, data in files.items():
        (local / p).parent.mkdir(parents=True, exist_ok=True)
        (local / p).write_bytes(data)
    # A cache of its own: datasets' shared cache may hold an earlier session's data for this path.
    pushed = datasets.load_dataset(str(local), cache_dir=str(tmp_path / "cache"))["train"]
    mine = datasets.load_from_disk(str(run_dir.release_dir(True) / "dataset"))["train"]
    assert pushed.features["label"].names == ["no_lesion", "lesion"] and len(pushed) == len(mine)
    for a, b in zip(pushed, mine, strict=True):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert a["label"] == b["label"] and a["sample_index"] == b["sample_index"]


def test_interrupted_push_leaves_the_release_and_a_rerun_completes_it(released, hub) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    _, run_dir = released
    before = _tree_hash(run_dir.release_dir(True))
    hub.fail_commits_after = 1  # the card commit lands, the data commit fails
    with pytest.raises(HfHubHTTPError):
        publish(run_dir, "hospital/synthetic-mri", revision="v1")
    assert not any(p.startswith("data/") for p in hub.files("hospital/synthetic-mri", "v1"))
    assert _tree_hash(run_dir.release_dir(True)) == before and not (run_dir.root / "publish.json").exists()
    hub.fail_commits_after = None
    out = publish(run_dir, "hospital/synthetic-mri", revision="v1")
    assert out["revision"] == "v1"
    assert any(p.startswith("data/train-") for p in hub.files("hospital/synthetic-mri", "v1"))
    assert "data/" not in " ".join(hub.files("hospital/synthetic-mri", "main"))


def test_forced_publish_of_a_blocked_run_pushes_only_unflagged_samples(released, hub) -> None:
    _, run_dir = released
    audit = read_json(run_dir.audit_json)
    audit["samples"][0]["flagged"] = True
    write_json_atomic(run_dir.audit_json, {**audit, "decision": "block"})
    import shutil

    shutil.rmtree(run_dir.release_dir(True))  # a blocked run has no release
    with pytest.raises(PublishRefused):
        publish(run_dir, "hospital/blocked")
    out = publish(run_dir, "hospital/blocked", force_blocked=True)
    assert out["splits"]["train"] == len(audit["samples"]) - 1
    card = hub.files("hospital/blocked")["README.md"].decode()
    assert _first_line(card).startswith("**WARNING: AUDIT BLOCKED")


def test_inspect_prints_the_lineage(released) -> None:
    from typer.testing import CliRunner

    from synthfactory.cli import app

    _, run_dir = released
    res = CliRunner().invoke(app, ["inspect", str(run_dir.root), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    privacy, audit = read_json(run_dir.privacy), read_json(run_dir.audit_json)
    assert out["privacy"]["epsilon"] == privacy["epsilon"]
    assert out["data"]["manifest_sha256"] == privacy["data_manifest_sha256"]
    assert (
        out["audit"]["decision"] == audit["decision"]
        and out["audit"]["samples_sha256"] == audit["samples_sha256"]
    )
    assert len(out["checkpoint"]["unet"]) == 64 and out["release"]["formats"] == ["hf", "png", "dicom"]
    assert out["ledger"] == [f"dp_sgd of run {run_dir.run_id}: {privacy['steps_taken']} accountant steps"]


def _first_line(card: str) -> str:
    """The card's first line after its YAML metadata."""
    return card.split("---\n", 2)[2].lstrip().splitlines()[0]


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
