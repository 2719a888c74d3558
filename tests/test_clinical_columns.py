"""Clinical tables as people have them: other column names, times in days, Dead/Alive, events as 1."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from histosurv.cli._clinical_options import add_clinical_column_options, clinical_columns_from_args
from histosurv.data.cohort import load_cohort
from histosurv.data.tables import ClinicalColumns, patients_from_clinical, read_clinical
from histosurv.errors import InputError

DAYS = np.array([400.0, 30.0, 1000.0, 250.0, 3650.0])
DEAD = np.array([True, False, True, False, False])
CASES = [f"TCGA-AA-{i:04d}" for i in range(len(DAYS))]
# case 0 has two slides
ROWS = [0, 0, 1, 2, 3, 4]

TCGA_COLUMNS = ClinicalColumns(case_id="submitter_id", slide_id="slide", time="OS.time", time_unit="days",
                               event="vital_status")


def _canonical(path):
    pd.DataFrame({
        "case_id": [CASES[i] for i in ROWS],
        "slide_id": [f"{CASES[i]}-{k:02d}" for k, i in enumerate(ROWS)],
        "survival_months": [DAYS[i] / 30.4375 for i in ROWS],
        "censorship": [int(not DEAD[i]) for i in ROWS],
    }).to_csv(path, index=False)
    return path


def _tcga(path, **extra):
    table = pd.DataFrame({
        "submitter_id": [CASES[i] for i in ROWS],
        "age": [50 + i for i in ROWS],
        "slide": [f"{CASES[i]}-{k:02d}" for k, i in enumerate(ROWS)],
        "OS.time": [DAYS[i] for i in ROWS],
        "vital_status": ["Dead" if DEAD[i] else "alive" for i in ROWS],
    })
    for name, values in extra.items():
        table[name] = values
    table.to_csv(path, index=False)
    return path


def _same_patients(a, b):
    assert [p.case_id for p in a] == [p.case_id for p in b] == CASES
    assert [p.slide_ids for p in a] == [p.slide_ids for p in b]
    assert np.allclose([p.time for p in a], [p.time for p in b])
    assert [p.event for p in a] == [p.event for p in b] == list(DEAD)


def test_tcga_table_through_a_mapping_reads_as_the_canonical_one(tmp_path):
    canonical = read_clinical(_canonical(tmp_path / "canonical.csv"))
    mapped = read_clinical(_tcga(tmp_path / "tcga.csv"), columns=TCGA_COLUMNS)
    assert list(mapped.columns) == ["case_id", "slide_id", "survival_months", "censorship", "age"]  # covariates kept
    assert mapped["censorship"].dtype == int and mapped["survival_months"].dtype == float
    _same_patients(patients_from_clinical(mapped), patients_from_clinical(canonical))
    assert patients_from_clinical(mapped)[1].time == pytest.approx(30 / 30.4375)


@pytest.mark.parametrize("unit,factor", [("weeks", 7 / 30.4375), ("years", 12.0), ("months", 1.0)])
def test_time_units(tmp_path, unit, factor):
    _tcga(tmp_path / "t.csv")
    df = read_clinical(tmp_path / "t.csv", columns=TCGA_COLUMNS.__class__(**{**TCGA_COLUMNS.to_dict(), "time_unit": unit}))
    assert np.allclose(df["survival_months"], [DAYS[i] * factor for i in ROWS])


def test_event_column_is_the_opposite_of_censorship(tmp_path):
    _tcga(tmp_path / "t.csv", OS=[int(DEAD[i]) for i in ROWS])
    by_event = read_clinical(tmp_path / "t.csv", columns=ClinicalColumns(
        case_id="submitter_id", slide_id="slide", time="OS.time", time_unit="days", event="OS"))
    _tcga(tmp_path / "c.csv", cens=[int(not DEAD[i]) for i in ROWS])
    by_cens = read_clinical(tmp_path / "c.csv", columns=ClinicalColumns(
        case_id="submitter_id", slide_id="slide", time="OS.time", time_unit="days", censorship="cens"))
    assert list(by_event["censorship"]) == list(by_cens["censorship"]) == [int(not DEAD[i]) for i in ROWS]


def test_string_codings_any_case(tmp_path):
    words = ["DECEASED", "deceased", "Living", "1:DECEASED", "0:LIVING", "No"]
    _tcga(tmp_path / "t.csv", status=words)
    cols = ClinicalColumns(case_id="submitter_id", slide_id="slide", time="OS.time", event="status")
    # case 0's two slides must agree, so give the table one row per slide that agrees with itself
    df = pd.read_csv(tmp_path / "t.csv")
    df["submitter_id"] = [f"c{k}" for k in range(len(df))]
    df.to_csv(tmp_path / "t.csv", index=False)
    assert list(read_clinical(tmp_path / "t.csv", columns=cols)["censorship"]) == [0, 0, 1, 0, 1, 1]
    own = ClinicalColumns(case_id="submitter_id", slide_id="slide", time="OS.time", event="status",
                          event_values=("Died of disease",), censored_values=("lost",))
    df["status"] = ["died of disease", "LOST", "dead", "alive", "1", "0"]
    df.to_csv(tmp_path / "t.csv", index=False)
    assert list(read_clinical(tmp_path / "t.csv", columns=own)["censorship"]) == [0, 1, 0, 1, 0, 1]


def test_unknown_coding_is_refused_naming_line_column_and_value(tmp_path):
    status = ["Dead", "Dead", "Alive", "Not Reported", "Alive", "Alive"]
    path = _tcga(tmp_path / "clinical.csv")
    df = pd.read_csv(path)
    df["vital_status"] = status
    df.to_csv(path, index=False)
    with pytest.raises(InputError) as e:
        read_clinical(path, columns=TCGA_COLUMNS)
    msg = str(e.value)
    assert "clinical.csv" in msg and "'vital_status'" in msg and "line 5" in msg and "'Not Reported'" in msg
    assert "1 (event) or 0 (censored)" in msg and "dead/alive" in msg


def test_missing_mapped_column_names_the_flag(tmp_path):
    path = _tcga(tmp_path / "clinical.csv")
    cols = ClinicalColumns(case_id="submitter_id", slide_id="slide", time="days_to_death", event="vital_status")
    with pytest.raises(InputError, match=r"clinical\.csv: the clinical table has no column 'days_to_death' "
                       r"\(given by --time-column; found: submitter_id, age, slide"):
        read_clinical(path, columns=cols)
    # the default names, missing, say which flag would name them
    with pytest.raises(InputError, match=r"no column 'case_id', 'slide_id', 'survival_months', 'censorship' .*"
                       r"--case-column / --slide-column / --time-column / --censorship-column / --event-column"):
        read_clinical(path)


def test_id_checks_name_the_users_columns(tmp_path):
    path = _tcga(tmp_path / "clinical.csv")
    df = pd.read_csv(path)
    df.loc[2, "slide"] = df.loc[1, "slide"]
    df.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"slide 'TCGA-AA-0000-01' appears more than once"):
        read_clinical(path, columns=TCGA_COLUMNS)
    df = pd.read_csv(_tcga(path))
    df.loc[3, "submitter_id"] = None
    df.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"column 'submitter_id' is empty on line 5"):
        read_clinical(path, columns=TCGA_COLUMNS)
    df = pd.read_csv(_tcga(path))
    df.loc[3, "OS.time"] = -4
    df.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"'OS.time' must be a number >= 0; line 5 has -4"):
        read_clinical(path, columns=TCGA_COLUMNS)


def test_empty_death_time_of_a_living_patient_gets_a_hint(tmp_path):
    path = _tcga(tmp_path / "clinical.csv", days_to_death=[400.0, 400.0, None, 1000.0, None, None])
    cols = ClinicalColumns(case_id="submitter_id", slide_id="slide", time="days_to_death", time_unit="days",
                           event="vital_status")
    with pytest.raises(InputError, match=r"'days_to_death' must be a number >= 0; line 4 has nan \(the case is censored"):
        read_clinical(path, columns=cols)


def test_mapped_columns_win_over_canonical_names(tmp_path):
    path = _tcga(tmp_path / "clinical.csv", case_id=["x"] * 6, censorship=[7] * 6, survival_months=["?"] * 6)
    df = read_clinical(path, columns=TCGA_COLUMNS)
    assert list(df.columns) == ["case_id", "slide_id", "survival_months", "censorship", "age"]
    _same_patients(patients_from_clinical(df), patients_from_clinical(read_clinical(_canonical(tmp_path / "c.csv"))))


def test_default_is_unchanged(tmp_path):
    path = _canonical(tmp_path / "clinical.csv")
    df = read_clinical(path)
    assert df.equals(read_clinical(path, columns=ClinicalColumns()))
    assert list(df.columns) == ["case_id", "slide_id", "survival_months", "censorship"]
    assert ClinicalColumns().is_default and not TCGA_COLUMNS.is_default
    table = pd.read_csv(path)
    table.loc[3, "censorship"] = 2
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"'censorship' must be 1 \(censored\) or 0 \(event\); line 5 has 2"):
        read_clinical(path)
    # prediction tables need no outcome; genes-only tables no slides
    table.drop(columns=["censorship", "slide_id"]).drop_duplicates("case_id").to_csv(path, index=False)
    df = read_clinical(path, require_outcome=False, require_slides=False)
    assert list(df.columns) == ["case_id", "survival_months"]


def test_round_trip_and_validation():
    own = ClinicalColumns(case_id="patient_id", time="OS.time", time_unit="Days", event="OS", event_values=("DOD",))
    assert own.time_unit == "days" and own.event_values == ("dod",)
    assert ClinicalColumns.from_dict(json.loads(json.dumps(own.to_dict()))) == own
    assert ClinicalColumns.from_dict(ClinicalColumns().to_dict()) == ClinicalColumns()
    assert "OS.time (days)" in own.describe()
    with pytest.raises(InputError, match=r"'fortnights' .*months, days, weeks, years"):
        ClinicalColumns(time_unit="fortnights")
    with pytest.raises(InputError, match=r"unknown key 'time_column'"):
        ClinicalColumns.from_dict({"time_column": "OS.time"})
    with pytest.raises(InputError, match="both an event column"):
        ClinicalColumns(event="OS", censorship="cens")


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_clinical_column_options(parser)
    return parser.parse_args(list(argv))


def test_options_file_and_flags(tmp_path):
    assert clinical_columns_from_args(_args()) == ClinicalColumns()
    cfg = tmp_path / "columns.json"
    cfg.write_text(json.dumps({"case_id": "submitter_id", "slide_id": "slide", "time": "OS.time",
                               "time_unit": "days", "event": "OS"}))
    from_file = clinical_columns_from_args(_args("--clinical-columns", str(cfg)))
    assert from_file == ClinicalColumns(case_id="submitter_id", slide_id="slide", time="OS.time", time_unit="days",
                                        event="OS")
    flagged = clinical_columns_from_args(_args("--clinical-columns", str(cfg), "--event-column", "vital_status",
                                               "--time-unit", "weeks"))
    assert flagged == TCGA_COLUMNS.__class__(**{**TCGA_COLUMNS.to_dict(), "time_unit": "weeks"})
    # a censorship flag replaces the file's event column
    assert clinical_columns_from_args(_args("--clinical-columns", str(cfg), "--censorship-column", "cens")).event is None
    with pytest.raises(InputError, match="give one"):
        clinical_columns_from_args(_args("--event-column", "OS", "--censorship-column", "cens"))
    with pytest.raises(SystemExit):
        _args("--time-unit", "fortnights")


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "must be a JSON object"),
    ('["OS.time"]', "not a list"),
    ('{"time": "OS.time", "unit": "days"}', "unknown key 'unit'"),
    ('{"time_unit": "hours"}', "'hours'"),
    ('{"time": 3}', "must be a column name"),
    ('{"event_values": 5}', "must be a list of words"),
])
def test_bad_options_file(tmp_path, text, fragment):
    cfg = tmp_path / "columns.json"
    cfg.write_text(text)
    with pytest.raises(InputError, match="columns.json") as e:
        clinical_columns_from_args(_args("--clinical-columns", str(cfg)))
    assert fragment in str(e.value)
    with pytest.raises(InputError, match="not found"):
        clinical_columns_from_args(_args("--clinical-columns", str(tmp_path / "nothing.json")))


def test_load_cohort_genes_only_with_columns(tmp_path):
    pd.DataFrame({"patient_id": CASES, "days": DAYS, "event": DEAD.astype(int)}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"case_id": CASES, "G1": np.arange(5.0), "G2": np.ones(5)}).to_csv(tmp_path / "g.csv", index=False)
    cols = ClinicalColumns(case_id="patient_id", time="days", time_unit="days", event="event")
    cohort = load_cohort(tmp_path / "c.csv", tmp_path / "g.csv", None, columns=cols)
    assert cohort.bags is None and cohort.gene_names == ["G1", "G2"]
    t, e = cohort.times_events(range(5))
    assert np.allclose(t, DAYS / 30.4375) and list(e) == list(DEAD)
    assert cohort.genes[:, 0].tolist() == [0, 1, 2, 3, 4]
