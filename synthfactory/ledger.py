"""The privacy ledger: every mechanism that read private images, in the order it was answered;
the one source of every ε synthfactory prints.

A mechanism is the warm start's query, a run's DP-SGD (its steps so far), or training on private
images without DP. Each names the data it read by *identity*: the set of its source items (a
file's bytes, a DICOM SOP Instance UID, a NIfTI volume, an npz row, a phantom's seed and index;
see data/common.item_id), not the pixels after preprocessing, so the same images at another size
are the same people.

Two forms, one content:

- the run's ledger, `ledger.jsonl` in the run directory: append-only, one JSON event a line,
  flushed and fsync'd *before* the answer it records is used (the warm start's answer is written
  after its entry; a DP-SGD checkpoint after the entry for its steps);
- an artifact's ledger, `synthfactory_ledger.json` beside every model folder synthfactory saves and
  in every release folder: the mechanisms of the run that made it and of all its ancestors. An
  internal artifact (a checkpoint) keeps each data set's items, so that a later run can show it
  is disjoint; a public one (a release, a published model) keeps only a description and a count.

Composition rule (`Ledger.composed`): a mechanism composes into a run unless its data is *shown*
to be disjoint from the run's (train and held-out items alike); a mechanism whose items are not
known here composes. Everything that composes is in the accountant's history, before the run's own
DP-SGD, and ε is the accountant's ε of that history at the run's δ. A mechanism that composes
and carries no DP guarantee makes a run that is to be private impossible: refused
(`verdict`). Nothing else assembles a history: training, `validate`, `plan`, privacy.json, the
cards and the sampler's DP counts all read a Ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .distributed import launched
from .privacy import epsilon_of
from .rundir import enclosing_run_dir, write_json_atomic

ARTIFACT_FILE = "synthfactory_ledger.json"
LEGACY_ORIGIN_FILE = "synthfactory_origin.json"  # written by synthfactory before the ledger
SCHEMA = "synthfactory.ledger/v1"

History = list[tuple[float, float, int]]


class LedgerRefused(ValueError):
    """An artifact that may not be used by this run, or a stage whose inputs the ledger does not
    cover. The message is one line that says why."""


# --- what a ledger holds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataIdentity:
    """One data set, as the ledger names it. `key` is random (it links mechanisms to their data
    within a ledger and says nothing of the data); `items` are its source items (by content and by
    place) where known. `declared_public`: data a recipe declared public (its items are no secret,
    so even a public ledger keeps them)."""

    key: str
    description: str
    n_items: int
    items: frozenset[str] | None = None
    declared_public: bool = False

    def disjoint_from(self, items: frozenset[str]) -> bool:
        """Shown to share no source item with `items` (never when its items are not known here, or
        when there are none to compare)."""
        return bool(self.items) and bool(items) and not (self.items & items)

    def to_json(self, public: bool) -> dict:
        out: dict = {"key": self.key, "description": self.description}
        if self.declared_public:
            out["declared_public"] = True
        if not public or self.declared_public:  # how many distinct items a private set has is not public
            out["n_items"] = self.n_items
            if self.items is not None:
                out["items"] = sorted(self.items)
        return out

    @classmethod
    def from_json(cls, d: dict, public: bool = False) -> DataIdentity:
        """From JSON; a public ledger's private data sets are read without items, whatever the
        file says (a public ledger cannot prove data disjoint)."""
        declared = bool(d.get("declared_public"))
        items = d.get("items") if declared or not public else None
        return cls(d["key"], d.get("description", ""), int(d.get("n_items", 0)),
                   frozenset(items) if items is not None else None, declared)  # fmt: skip


def new_data_identity(items: Iterable[str], description: str, declared_public: bool = False) -> DataIdentity:
    items = frozenset(items)
    return DataIdentity(f"data-{secrets.token_hex(6)}", description, len(items), items, declared_public)


@dataclass(frozen=True)
class Mechanism:
    """One use of private data. `history` is its entry in the accountant ((σ, q, steps) rows);
    `private` is False for training without DP or with seeded (known) noise, whose ε is no
    guarantee. `via` says how an ancestor's mechanism came into this ledger (None: this run's own)."""

    id: str
    kind: (
        str  # "warm_start", "dp_sgd", "non_private", or "public_data" (pre-training on data declared public)
    )
    run_id: str
    data: str  # a DataIdentity key
    history: tuple[tuple[float, float, int], ...]
    private: bool
    detail: dict = field(default_factory=dict)
    via: str | None = None

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def to_json(self, public: bool = False) -> dict:
        detail = {k: v for k, v in self.detail.items() if not (public and k in INTERNAL_DETAIL)}
        return {
            "id": self.id, "kind": self.kind, "run_id": self.run_id, "data": self.data,
            "history": [list(h) for h in self.history], "private": self.private,
            "detail": detail, "via": self.via,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Mechanism:
        history = tuple((float(s), float(q), int(t)) for s, q, t in d.get("history") or [])
        return cls(d["id"], d["kind"], d["run_id"], d["data"], history, bool(d["private"]),
                   dict(d.get("detail") or {}), d.get("via"))  # fmt: skip


INTERNAL_DETAIL = ("answer_sha256",)  # details that are a function of private images beyond ε


@dataclass
class Ledger:
    """Data sets and mechanisms, in the order they entered (one record per mechanism id: the
    latest, so a DP-SGD mechanism's last checkpointed step count)."""

    datasets: dict[str, DataIdentity] = field(default_factory=dict)
    mechanisms: list[Mechanism] = field(default_factory=list)
    own_data: str | None = None  # the key of the run's own data set (a run ledger)

    def add(self, m: Mechanism) -> None:
        for i, old in enumerate(self.mechanisms):
            if old.id == m.id:
                self.mechanisms[i] = m
                return
        self.mechanisms.append(m)

    def merge(self, other: Ledger, via: str | None = None) -> None:
        """Add `other`'s data sets and mechanisms (an artifact's ledger brought into this one)."""
        for key, ds in other.datasets.items():
            mine = self.datasets.get(key)
            self.datasets[key] = ds if mine is None or mine.items is None else mine
        for m in other.mechanisms:
            if all(m.id != x.id for x in self.mechanisms):
                self.mechanisms.append(m if m.via or via is None else replace(m, via=via))

    def own(self) -> list[Mechanism]:
        return [m for m in self.mechanisms if m.via is None]

    def composes(self, m: Mechanism, items: frozenset[str]) -> bool:
        """Whether `m` composes into a run whose private items are `items` (see the module).
        Pre-training on data declared public never composes: it is no DP mechanism (see
        `public_overlap`)."""
        if m.kind == "public_data":
            return False
        ds = self.datasets.get(m.data)
        return ds is None or not ds.disjoint_from(items)

    def composed(self, items: frozenset[str], exclude: Iterable[str] = ()) -> list[Mechanism]:
        skip = set(exclude)
        return [m for m in self.mechanisms if m.id not in skip and self.composes(m, items)]

    def public_overlap(self, items: frozenset[str]) -> list[Mechanism]:
        """Pre-training on data declared public whose items are not shown disjoint from `items`:
        an artifact's weights trained without DP on what may be this run's images (the run that
        declared that data public screened it against *its* private images only)."""
        return [
            m for m in self.mechanisms
            if m.kind == "public_data" and not (self.datasets.get(m.data) and self.datasets[m.data].disjoint_from(items))
        ]  # fmt: skip

    def history(self, items: frozenset[str], exclude: Iterable[str] = ()) -> History:
        """The accountant history of everything that composes into a run on `items`."""
        return [h for m in self.composed(items, exclude) for h in m.history]

    def warm_start(self) -> Mechanism | None:
        """This run's own warm-start query, if it was answered (the latest, if a crash made it ask
        twice: both compose)."""
        return next((m for m in reversed(self.own()) if m.kind == "warm_start"), None)

    def training(self) -> Mechanism | None:
        """This run's own training on its private images (DP-SGD or not), once it has a checkpoint."""
        return next((m for m in self.own() if m.kind in ("dp_sgd", "non_private")), None)

    def to_json(self, public: bool) -> dict:
        return {
            "schema": SCHEMA,
            "datasets": [d.to_json(public) for d in self.datasets.values()],
            "mechanisms": [m.to_json(public) for m in self.mechanisms],
            "public": public,
        }

    @classmethod
    def from_json(cls, d: dict) -> Ledger:
        public = bool(d.get("public"))
        datasets = {x["key"]: DataIdentity.from_json(x, public) for x in d.get("datasets", [])}
        out = cls(datasets=datasets)
        for m in d.get("mechanisms", []):
            out.add(Mechanism.from_json(m))
        return out

    def ids(self) -> set[str]:
        return {m.id for m in self.mechanisms}


def new_id(run_id: str, kind: str) -> str:
    return f"{run_id}:{kind}:{secrets.token_hex(4)}"


def answer_sha256(*arrays) -> str:
    """The hash of a mechanism's answer (numpy arrays), recorded with its entry so that a stage
    that reads the answer back can show the ledger covers exactly it."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --- the run's ledger: ledger.jsonl ----------------------------------------------------------------------


class RunLedger:
    """ledger.jsonl of one run directory: events appended, each flushed and fsync'd before the
    caller goes on. Events: `dataset` (the run's own data, or an ancestor's), `mechanism`
    (answered, or a DP-SGD mechanism's steps so far), `import` (an artifact whose ledger was
    brought in, and how)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def _append(self, events: list[dict]) -> None:
        if not launched().main:  # under torchrun rank 0 keeps the ledger; the others read it
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        if not new:
            _drop_unfinished_line(self.path)
        with open(self.path, "a") as fh:
            for e in events:
                fh.write(json.dumps(e, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # the file's directory entry must survive a crash too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def events(self) -> list[dict]:
        """The events, in order (a last line cut by a crash was never acknowledged: skipped)."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):  # the last line cut by a crash: its answer was never used
                    break
                raise LedgerRefused(f"{self.path}: line {n} is not JSON; the ledger is damaged") from None
        return out

    def read(self) -> Ledger:
        ledger = Ledger()
        for e in self.events():
            if e["event"] == "dataset":
                ds = DataIdentity.from_json(e)
                ledger.datasets[ds.key] = ds
                if e.get("own"):
                    ledger.own_data = ds.key
            elif e["event"] == "mechanism":
                ledger.add(Mechanism.from_json(e))
        return ledger

    def own_data(self, items: frozenset[str], description: str) -> DataIdentity:
        """The run's own data set: recorded the first time, then checked to be the same items."""
        ledger = self.read()
        if ledger.own_data is not None:
            ds = ledger.datasets[ledger.own_data]
            if ds.items != items:
                raise LedgerRefused(
                    f"{self.path}: this run's ledger names other private images than the data read "
                    "now; start a new run"
                )
            return ds
        ds = new_data_identity(items, description)
        self._append([{"event": "dataset", **ds.to_json(public=False), "own": True}])
        return ds

    def record_dataset(self, ds: DataIdentity) -> None:
        """Name a data set other than the run's own (data declared public), before it is used."""
        self._append([{"event": "dataset", **ds.to_json(public=False)}])

    def record(self, m: Mechanism) -> None:
        """Write a mechanism (or a DP-SGD mechanism's steps so far) before its answer is used."""
        self._append([{"event": "mechanism", **m.to_json()}])

    def bring_in(self, artifact: Ledger, via: str) -> None:
        """Append an artifact's data sets and mechanisms (those not already here), before the
        artifact is used."""
        here = self.read()
        events: list[dict] = [
            {"event": "import", "via": via, "mechanisms": [m.id for m in artifact.mechanisms]}
        ]
        for key, ds in artifact.datasets.items():
            if key not in here.datasets:
                events.append({"event": "dataset", **ds.to_json(public=False)})
        for m in artifact.mechanisms:
            if m.id not in here.ids():
                events.append({"event": "mechanism", **replace(m, via=m.via or via).to_json()})
        self._append(events)


def _drop_unfinished_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline: its append never returned, so its
    answer was never used."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


# --- artifacts ------------------------------------------------------------------------------------------


def write_artifact(folder: Path, ledger: Ledger, public: bool = False) -> None:
    """synthfactory_ledger.json in `folder` (a model folder or a release folder)."""
    write_json_atomic(Path(folder) / ARTIFACT_FILE, ledger.to_json(public))


WEIGHTS_MARKER = "synthfactory_run"  # a key in the safetensors metadata of every UNet synthfactory saves


def mark_weights(folder: Path, run_id: str) -> None:
    """Write the run id into the safetensors metadata of a saved model folder, so that weights
    separated from their ledger are still recognised as synthfactory's (and refused)."""
    from safetensors.torch import load_file, save_file

    for f in Path(folder).glob("*.safetensors"):
        save_file(load_file(f), f, metadata={"format": "pt", WEIGHTS_MARKER: run_id})


def weights_marker(folder: Path) -> str | None:
    """The run id synthfactory wrote into a model folder's weights, if any."""
    from safetensors import safe_open

    for f in Path(folder).glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            run = (fh.metadata() or {}).get(WEIGHTS_MARKER)
        if run:
            return run
    return None


def read_artifact(folder: Path) -> Ledger | None:
    """The ledger an artifact carries: its own file; else the ledger of the run directory it lies
    in (the nearest folder holding ledger.jsonl: a run, or an audit model's run inside one);
    else a legacy origin file inside its run directory; None for a folder synthfactory did not
    write. Raises LedgerRefused for synthfactory weights whose lineage cannot be told."""
    folder = Path(folder)
    own = folder / ARTIFACT_FILE
    if own.is_file():
        return Ledger.from_json(json.loads(own.read_text()))
    for parent in [folder.resolve(), *folder.resolve().parents]:
        if (parent / "ledger.jsonl").is_file():
            return RunLedger(parent / "ledger.jsonl").read()
    run = enclosing_run_dir(folder)
    if (folder / LEGACY_ORIGIN_FILE).is_file():
        return _from_legacy_origin(json.loads((folder / LEGACY_ORIGIN_FILE).read_text()), folder, run)
    if run is not None:
        raise LedgerRefused(
            f"{folder} lies in the run directory {run}, which has no ledger: what it was trained on "
            "cannot be told"
        )
    marked = weights_marker(folder)
    if marked is not None:
        raise LedgerRefused(
            f"{folder}: the weights of synthfactory run {marked} without their {ARTIFACT_FILE}: what "
            "they were trained on cannot be told; use the folder as the run wrote it"
        )
    return None


def _from_legacy_origin(origin: dict, folder: Path, run: Path | None) -> Ledger:
    """An origin file of an older synthfactory. Its data is known only by a manifest hash of the
    preprocessed pixels (never shown disjoint: it composes, or is refused), and it kept no
    ancestor that it had taken for other data: it is read only inside its run directory, and
    refused where that run started from a checkpoint it did not compose."""
    if run is None:
        raise LedgerRefused(
            f"{folder}: a checkpoint of an older synthfactory, moved out of its run directory: its "
            "lineage cannot be told (older checkpoints did not carry their ancestors); use it from "
            "its run directory, or retrain"
        )
    pretrain = run / "checkpoints" / "pretrained" / "pretrain.json"
    record = json.loads(pretrain.read_text()) if pretrain.is_file() else {}
    if record.get("kind") == "checkpoint" and record.get("origin") != "composed":
        raise LedgerRefused(
            f"{folder}: its run {run.name} (an older synthfactory) started from a checkpoint it took for "
            f"{record.get('origin')}; that checkpoint's lineage was not kept: retrain"
        )
    if not origin.get("trained_on_private_data"):
        return Ledger()
    run_id = origin.get("run_id", "unknown")
    data = DataIdentity(f"data-legacy-{run_id}", "private data of an older synthfactory run", 0)
    history = tuple(tuple(h) for h in origin.get("accountant_history") or [])
    kind = "dp_sgd" if history else "non_private"
    m = Mechanism(f"{run_id}:legacy", kind, run_id, data.key, history, bool(origin.get("private")),
                  {"from": "synthfactory_origin.json (older synthfactory)"})  # fmt: skip
    return Ledger(datasets={data.key: data}, mechanisms=[m])


def find_release_ledger(path: Path) -> tuple[Path, Ledger] | None:
    """The ledger of a synthfactory release that `path` (a data source's file or folder) lies in:
    the nearest synthfactory_ledger.json in it or a folder above it."""
    path = Path(path).resolve()
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        f = folder / ARTIFACT_FILE
        if f.is_file():
            return f, Ledger.from_json(json.loads(f.read_text()))
    return None


# --- what an artifact is to this run ------------------------------------------------------------------


@dataclass
class Verdict:
    """What a checkpoint or a data set declared public is to a run: `external` (synthfactory did
    not write it; declared public by the recipe), `public` (it saw no private image), `other_data`
    (every mechanism it carries read data shown disjoint from this run's) or `composed`."""

    kind: str
    statement: str
    ledger: Ledger = field(default_factory=Ledger)
    what: str = ""


def verdict(artifact: Ledger | None, what: str, items: frozenset[str], for_private_run: bool) -> Verdict:
    """How `artifact` (its ledger, None if synthfactory did not write it) may enter a run whose
    private items are `items`. Raises LedgerRefused for a run that is to be private when a
    mechanism that composes carries no DP guarantee."""
    if artifact is None:
        return Verdict(
            "external", f"{what}: not written by synthfactory; declared public by the recipe", what=what
        )
    unscreened = artifact.public_overlap(items)
    if unscreened and for_private_run:
        m = unscreened[0]
        raise LedgerRefused(
            f"{what} carries run {m.run_id}'s pre-training WITHOUT DP on data it declared public, and that "
            "data is not shown to hold none of this run's images (it was screened against that run's "
            "private images only); it cannot start a private run"
        )
    if not artifact.mechanisms:
        return Verdict("public", f"{what}: saw no private image", artifact, what)
    composed = artifact.composed(items)
    if not composed:
        runs = sorted({m.run_id for m in artifact.mechanisms})
        return Verdict("other_data", f"{what}: trained by synthfactory run(s) {', '.join(runs)} on other "
                       "private data (no source item in common with this run's); public to this run, "
                       "its lineage kept", artifact, what)  # fmt: skip
    unguarded = [m for m in composed if not m.private]
    if unguarded and for_private_run:
        m = unguarded[0]
        raise LedgerRefused(
            f"{what} carries run {m.run_id}'s training on {_same(artifact, m)} WITHOUT a DP guarantee "
            "(no DP-SGD, or seeded DP noise); it cannot start a private run"
        )
    steps = sum(m.steps for m in composed)
    runs = ", ".join(sorted({m.run_id for m in composed}))
    statement = (
        f"{what}: carries {len(composed)} mechanism(s) of run(s) {runs} on data not shown to be other "
        f"than this run's ({steps} accountant steps): composed into this run's ε"
    )
    if unguarded:
        statement += "; some carry no DP guarantee, so this run is NOT PRIVATE either"
    return Verdict("composed", statement, artifact, what)


def _same(ledger: Ledger, m: Mechanism) -> str:
    ds = ledger.datasets.get(m.data)
    return (
        "this run's data"
        if ds is not None and ds.items is not None
        else "data that cannot be shown to be other"
    )


def require_covered(artifact_folder: Path, run: Ledger, what: str) -> Ledger:
    """An artifact a stage is about to read must carry a ledger, and every mechanism in it must be
    in the run's ledger (else its use would be uncounted). Returns the artifact's ledger."""
    carried = read_artifact(artifact_folder) if (Path(artifact_folder) / ARTIFACT_FILE).is_file() else None
    if carried is None:
        raise LedgerRefused(
            f"{artifact_folder}: {what} carries no {ARTIFACT_FILE}: what it was trained on is not in "
            "the ledger; start a new run"
        )
    missing = carried.ids() - run.ids()
    if missing:
        raise LedgerRefused(
            f"{artifact_folder}: {what} rests on {len(missing)} mechanism(s) the run's ledger does not "
            f"hold (e.g. {sorted(missing)[0]}); start a new run"
        )
    return carried


# --- ε of a ledger ---------------------------------------------------------------------------------------


def epsilon_alone(m: Mechanism, delta: float, accountant: str) -> float | None:
    return epsilon_of(list(m.history), delta, accountant) if m.history and m.private else None


def lineage(ledger: Ledger, items: frozenset[str], delta: float | None, accountant: str | None) -> list[dict]:
    """Every mechanism of the ledger as privacy.json lists it: what it was, whether it composes
    into this run and why, and its ε alone at this run's δ (public: no item, no answer hash)."""
    out = []
    for m in ledger.mechanisms:
        ds = ledger.datasets.get(m.data)
        composes = ledger.composes(m, items)
        if m.kind == "public_data":
            why = ("pre-training without DP on data declared public, screened against this run's private "
                   "images: no DP mechanism, nothing composes" if m.via is None else
                   "an ancestor's pre-training without DP on data it declared public, shown to share no "
                   "source item with this run's images")  # fmt: skip
        elif m.via is None:
            why = "this run's own mechanism"
        elif composes:
            why = "its data is not shown to be other than this run's: composed"
        else:
            why = "its data shares no source item with this run's: not composed (it covers other people)"
        row = {**m.to_json(public=True), "data": ds.to_json(public=True) if ds else {"key": m.data},
               "composed": composes, "reading": why}  # fmt: skip
        if delta and accountant:
            row["epsilon_alone"] = epsilon_alone(m, delta, accountant)
        out.append(row)
    return out


__all__ = [
    "ARTIFACT_FILE",
    "DataIdentity",
    "Ledger",
    "LedgerRefused",
    "Mechanism",
    "RunLedger",
    "Verdict",
    "answer_sha256",
    "find_release_ledger",
    "lineage",
    "new_id",
    "read_artifact",
    "require_covered",
    "verdict",
    "write_artifact",
]
