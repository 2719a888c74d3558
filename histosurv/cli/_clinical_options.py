"""Options naming the columns of a clinical table (train, predict, ...), for tables that do not use
the MCAT names (``case_id, slide_id, survival_months, censorship``).

``--clinical-columns FILE`` is a JSON object with the keys of :class:`~histosurv.data.tables.ClinicalColumns`
(``case_id, slide_id, time, time_unit, event, censorship, event_values, censored_values``); the
flags override it. :func:`clinical_columns_from_args` gives the mapping, for ``read_clinical`` and
``load_cohort``; its ``to_dict()`` is what a run records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# flag destination -> ClinicalColumns field
_FLAG_FIELDS = {
    "case_column": "case_id",
    "slide_column": "slide_id",
    "time_column": "time",
    "time_unit": "time_unit",
    "event_column": "event",
    "censorship_column": "censorship",
}


def add_clinical_column_options(parser: argparse.ArgumentParser) -> None:
    from ..data.tables import TIME_UNITS

    group = parser.add_argument_group(
        "clinical table columns",
        "for clinical tables that name their columns otherwise than case_id, slide_id, survival_months, "
        "censorship (e.g. TCGA's submitter_id, OS.time in days, vital_status Dead/Alive)",
    )
    group.add_argument("--case-column", metavar="COLUMN", help="the column of case (patient) ids (default: case_id)")
    group.add_argument("--slide-column", metavar="COLUMN",
                       help="the column of slide ids or slide file names (default: slide_id)")
    group.add_argument("--time-column", metavar="COLUMN",
                       help="the column of survival or follow-up times, in --time-unit (default: survival_months)")
    group.add_argument("--time-unit", choices=list(TIME_UNITS),
                       help="unit of --time-column; read as months, 30.4375 days a month (default: months)")
    group.add_argument("--event-column", metavar="COLUMN",
                       help="the column that is 1 (or true, yes, Dead, Deceased) where the death was observed and 0 "
                       "(or false, no, Alive, Living, censored) where the patient was censored; instead of "
                       "--censorship-column")
    group.add_argument("--censorship-column", metavar="COLUMN",
                       help="the column that is 1 where the patient was censored, 0 where the death was observed "
                       "(default: censorship)")
    group.add_argument("--clinical-columns", metavar="FILE",
                       help="JSON file with the keys case_id, slide_id, time, time_unit, event, censorship, "
                       "event_values, censored_values (the last two: a table's own words for death / censored); "
                       "the flags above override it")


def clinical_columns_from_args(args: argparse.Namespace):
    """The :class:`ClinicalColumns` the options give (the default mapping when none is given).

    Raises :class:`~histosurv.errors.InputError` for a missing or malformed file or bad values."""
    from ..data.tables import ClinicalColumns
    from ..errors import InputError

    values: dict = {}
    path = getattr(args, "clinical_columns", None)
    if path:
        values = _read_config(Path(path))
    flags = {field: getattr(args, dest, None) for dest, field in _FLAG_FIELDS.items()}
    if flags["event"] is not None and flags["censorship"] is not None:
        raise InputError(
            "--event-column and --censorship-column are both given; give one (--event-column: 1 = event, "
            "--censorship-column: 1 = censored)"
        )
    for field, value in flags.items():
        if value is None:
            continue
        if not str(value).strip():
            raise InputError(f"--{_flag_of(field)}: needs a column name")
        values[field] = value
    # a flag chooses the outcome's sense over the file's: one outcome column only
    if flags["censorship"] is not None:
        values.pop("event", None)
    elif flags["event"] is not None:
        values.pop("censorship", None)
    source = f"{path} (--clinical-columns)" if path else "clinical table columns"
    return ClinicalColumns.from_dict(values, source=source)


def _flag_of(field: str) -> str:
    return {v: k for k, v in _FLAG_FIELDS.items()}[field].replace("_", "-")


def _read_config(path: Path) -> dict:
    from ..errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: --clinical-columns file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: --clinical-columns must be a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: --clinical-columns must be a JSON object such as "
            '{"case_id": "submitter_id", "time": "OS.time", "time_unit": "days", "event": "vital_status"}, '
            f"not a {type(data).__name__}"
        )
    return data
