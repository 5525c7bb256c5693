"""`data.group_by`: which images belong to one patient (or scan), so that a split never puts one
patient on both sides. A rule maps a file to a group; the manifest keeps the group as a
`group_key` (a SHA-256 prefix), never the id itself.

- `patient`: DICOM PatientID, else StudyInstanceUID (dicom source).
- `column:NAME`: the column NAME of `data.labels_csv` (dicom and nifti sources).
- `regex:PATTERN`: the first capture group of PATTERN (or the whole match) searched in the file's
  path relative to `data.path` (folder, dicom and nifti sources), e.g. `regex:^[^/]+/(sub-\\d+)_`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .common import DataError, group_key, refuse_crossing_groups, split_by_fraction, split_groups_by_fraction

GroupRule = Callable[[str, dict | None], str]


def group_rule(spec: str | None, root: Path) -> GroupRule | None:
    """The recipe's `group_by` as a function (file, its label-CSV row or None) → group key."""
    if spec is None:
        return None
    if spec == "patient":
        from .dicom import patient_of

        def by_patient(f: str, row: dict | None) -> str:
            # a file without either id (or not readable: it is skipped later) is its own group
            return patient_of(f) or group_key(f"file:{f}")

        return by_patient
    kind, _, arg = spec.partition(":")
    if kind == "column":

        def by_column(f: str, row: dict | None) -> str:
            value = (row or {}).get(arg, "")
            if not str(value).strip():
                raise DataError("group_by", f"labels_csv has no '{arg}' value for {f}")
            return group_key(value)

        return by_column
    pattern = re.compile(arg)  # the recipe validator has compiled it once already

    def by_regex(f: str, row: dict | None) -> str:
        rel = Path(f).relative_to(root).as_posix() if Path(f).is_relative_to(root) else Path(f).as_posix()
        m = pattern.search(rel)
        if m is None:
            raise DataError("group_by", f"the pattern {arg!r} does not match {rel}")
        return group_key(m.group(1) if m.groups() and m.group(1) is not None else m.group(0))

    return by_regex


Items = list[tuple[str, str]]


def split_groups(
    train: Items, held: Items, rule: GroupRule | None, rows: dict | None = None
) -> dict[str, str]:
    """Groups of an already split data set ({file: group}); refuses a group on both sides."""
    if rule is None:
        return {}
    rows = rows or {}
    groups = {f: rule(f, rows.get(f)) for f, _ in train + held}
    refuse_crossing_groups(train, [groups[f] for f, _ in train], held, [groups[f] for f, _ in held])
    return groups


def split_items(
    items: Items, rule: GroupRule | None, fraction: float | None, seed: int, rows: dict | None = None
) -> tuple[Items, Items, dict[str, str]]:
    """(train, held-out, {file: group}): by whole groups with a rule, else per file, stratified."""
    if rule is None:
        return (*split_by_fraction(items, fraction, seed, "heldout_fraction"), {})
    rows = rows or {}
    groups = {f: rule(f, rows.get(f)) for f, _ in items}
    train, held = split_groups_by_fraction(items, [groups[f] for f, _ in items], fraction, seed)
    return train, held, groups
