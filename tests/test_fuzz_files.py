"""Property-based fuzzing of the files histosurv reads (issue 22): CLAM h5 bags (datasets' shapes,
dtypes, kinds and attributes; damaged files), clinical and gene CSVs and the clinical-column mapping,
clinical covariates as people write them, model manifests, and ``histosurv serve``'s TOML config.

The property: a named error (a ``HistosurvError``) or a correct reading, never another exception or a
non-finite value; where a reading is written back (a bag), a failure leaves no file behind. Settings as in
``test_fuzz_decoders`` (``HISTOSURV_FUZZ_EXAMPLES`` for a long run).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from histosurv.data.covariates import encode_table
from histosurv.data.features import MAX_COORD, read_bag, write_bag
from histosurv.data.tables import ClinicalColumns, GeneTable, read_clinical
from histosurv.errors import HistosurvError
from histosurv.runtime.manifest import ModelManifest

from .test_fuzz_decoders import CLINICAL, fuzz_settings

DATA = Path(__file__).parent / "data"


def _named(error: BaseException) -> None:
    """Only histosurv's own errors, with a message, are the expected failures."""
    assert isinstance(error, HistosurvError) and str(error), repr(error)


# ---------------------------------------------------------------------------------------------------
# CLAM h5 bags

DTYPES = ["<f2", "<f4", ">f4", "<f8", "<i4", "<i8", "|u1", "<u8", "|b1", "S3"]
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"), max_size=8)
attr_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), texts, st.binary(min_size=1, max_size=6).map(np.void),
    st.lists(st.integers(-5, 5), max_size=3).map(np.array), st.lists(texts, min_size=1, max_size=3),
)
attr_names = st.sampled_from(["patch_size_level0", "patch_size", "read_size", "patch_level", "mpp", "encoder",
                              "slide_sha256", "downsample", "x"])


@st.composite
def h5_contents(draw):
    """What an h5 file holds: 'features' and 'coords' as datasets (any dtype, any shape, often a matching
    N), groups or absent, and attributes on the root and on the datasets."""
    n, d = draw(st.integers(0, 4)), draw(st.integers(0, 3))
    contents = {}
    for name, shape in (("features", (n, d)), ("coords", (n, 2))):
        kind = draw(st.sampled_from(["good"] * 4 + ["any", "group", "absent", "scalar", "empty"]))
        if kind == "good":
            dtype = draw(st.sampled_from(["<f4", "<f2", "<f8"] if name == "features" else ["<i8", "<i4", "<f8", "<u8"]))
            elements = st.integers(0, MAX_COORD + 1) if name == "coords" and dtype != "<f8" else None
            shape = (1, *shape) if draw(st.integers(0, 5)) == 0 else shape  # a leading batch axis of 1
            contents[name] = draw(hnp.arrays(dtype, shape, elements=elements))
        elif kind == "any":
            contents[name] = draw(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
        else:
            contents[name] = kind
    contents["attrs"] = {where: draw(st.dictionaries(attr_names, attr_values, max_size=3)) for where in ("/", "features", "coords")}
    return contents


def _write_h5(path: Path, contents: dict) -> None:
    with h5py.File(path, "w") as f:
        for name in ("features", "coords"):
            value = contents[name]
            if isinstance(value, np.ndarray):
                f.create_dataset(name, data=value)
            elif value == "group":
                f.create_group(name)
            elif value == "scalar":
                f.create_dataset(name, data=3.0)
            elif value == "empty":
                f.create_dataset(name, data=h5py.Empty("f4"))
        for where, attrs in contents["attrs"].items():
            if where == "/" or where in f:
                for key, v in attrs.items():
                    f[where].attrs[key] = v


def _check_bag_or_named(path: Path, feature_dim: int | None):
    try:
        bag = read_bag(path, feature_dim)
    except Exception as e:
        _named(e)
        return None
    f, c = bag.features, bag.coords
    assert f.dtype == np.float32 and f.ndim == 2 and len(f) > 0 and np.isfinite(f).all()
    assert feature_dim is None or f.shape[1] == feature_dim
    assert c.dtype == np.int64 and c.shape == (len(f), 2) and c.min() >= 0 and c.max() <= MAX_COORD
    return bag


def _check_written_back(bag, folder: Path) -> None:
    """A bag read is written back whole (and reads the same), or refused by name with nothing left behind."""
    out = folder / "out" / "bag.h5"
    try:
        write_bag(out, bag)
    except Exception as e:
        _named(e)
        assert not out.parent.exists() or not any(out.parent.iterdir()), list(out.parent.iterdir())
        return
    again = read_bag(out)
    np.testing.assert_array_equal(again.features, bag.features)
    np.testing.assert_array_equal(again.coords, bag.coords)
    assert [p.name for p in out.parent.iterdir()] == ["bag.h5"]


GOOD_BAG = {"features": np.ones((2, 3), "<f4"), "coords": np.zeros((2, 2), "<i8"), "attrs": {"/": {}, "features": {}, "coords": {}}}


@fuzz_settings(150)
@given(h5_contents(), st.sampled_from([None, None, 3, 2]))
# an attribute written back by write_bag must be one h5py takes: here CLAM's patch_size_level0 as text
@example({**GOOD_BAG, "attrs": {"/": {"patch_size_level0": "abc"}, "features": {}, "coords": {}}}, None)
def test_h5_bags_are_read_whole_or_refused_by_name(contents, feature_dim):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.h5"
        _write_h5(path, contents)
        bag = _check_bag_or_named(path, feature_dim)
        if bag is not None:
            _check_written_back(bag, Path(tmp))


@fuzz_settings(60)
@given(st.integers(0, 10**6), st.binary(max_size=64))
def test_damaged_h5_files_are_refused_by_name(cut, junk):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.h5"
        _write_h5(path, GOOD_BAG)
        data = path.read_bytes()
        path.write_bytes(data[: cut % len(data)] + junk)
        _check_bag_or_named(path, None)


# ---------------------------------------------------------------------------------------------------
# Clinical and gene tables

CELLS = ["", "nan", "NA", "inf", "-inf", "-1", "1e400", "0", "1", "2", "0.0", "1.0", "12.5", "Dead", "alive", "TRUE",
         "no", "x", " 3 ", '"a,b"', '"', "TCGA-01", "TCGA-02", "None", "[Not Available]"]
COLUMN_NAMES = ["case_id", "slide_id", "survival_months", "censorship", "OS.time", "event", "vital_status", "age",
                "stage", "GENE1", "GENE2", ""]
cells = st.sampled_from(CELLS) | st.integers(-3, 3).map(str) | st.floats(allow_nan=False).map(repr) | texts.map(lambda t: t.replace("\n", ""))


@st.composite
def csv_tables(draw):
    columns = draw(st.lists(st.sampled_from(COLUMN_NAMES), min_size=1, max_size=7))
    rows = draw(st.lists(st.lists(cells, min_size=len(columns) - 1, max_size=len(columns) + 1), max_size=6))
    text = "\n".join(",".join(r) for r in [columns, *rows])
    return text if draw(st.integers(0, 9)) else draw(texts)


COLUMN_MAPPINGS = st.sampled_from([
    ClinicalColumns(),
    ClinicalColumns(time="OS.time", time_unit="days", event="vital_status"),
    ClinicalColumns(event="event", event_values=("x",), censored_values=("no",)),
    ClinicalColumns(slide_id="case_id", time="age", time_unit="years"),
])


def _write(folder: str, name: str, text: str) -> Path:
    path = Path(folder) / name
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    return path


@fuzz_settings(200)
@given(csv_tables(), COLUMN_MAPPINGS, st.booleans(), st.booleans())
@example("case_id,slide_id,survival_months,censorship\na,s1,1e400,1\n", ClinicalColumns(), True, True)
def test_clinical_tables_are_read_canonically_or_refused_by_name(text, columns, require_outcome, require_slides):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            df = read_clinical(_write(tmp, "clinical.csv", text), require_outcome, require_slides, columns)
        except Exception as e:
            _named(e)
            return
    ids = ["case_id", "slide_id"] if require_slides else ["case_id"]
    assert list(df.columns[: len(ids)]) == ids
    for c in ids:
        assert df[c].notna().all()
    key = "slide_id" if "slide_id" in df.columns else "case_id"
    assert not df[key].duplicated().any()
    if require_outcome:
        months = df["survival_months"].to_numpy(np.float64)
        assert np.isfinite(months).all() and (months >= 0).all()
        assert set(df["censorship"].tolist()) <= {0, 1}


@fuzz_settings(150)
@given(csv_tables(), st.lists(st.sampled_from(["GENE1", "GENE2", "age", "case_id"]), min_size=1, max_size=3, unique=True),
       st.lists(st.sampled_from(["TCGA-01", "TCGA-02", "0", "x"]), min_size=1, max_size=2))
# one field more than the header: pandas indexes by the first column, whose NaN label was taken for a line
@example("case_id,case_id,case_id,case_id\n,,,,", ["GENE1"], ["TCGA-01"])
def test_gene_tables_give_finite_vectors_or_refuse_by_name(text, genes, cases):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            vectors = GeneTable.read(_write(tmp, "genes.csv", text)).vectors(cases, genes)
        except Exception as e:
            _named(e)
            return
    assert vectors.shape == (len(cases), len(genes)) and vectors.dtype == np.float32 and np.isfinite(vectors).all()


@fuzz_settings(150)
@given(st.lists(st.fixed_dictionaries({"case_id": st.sampled_from(["a", "b", "1"]), "age": cells | st.floats() | st.integers(),
                                       "stage": cells | st.sampled_from(["I", "II", "III", 1, 2.0, True, None])}), max_size=4),
       st.lists(st.sampled_from(["a", "b", "1", 1]), max_size=3))
@example([{"case_id": "a", "age": "1e39", "stage": "I"}], ["a"])  # finite in float64, an infinity on the wire
def test_clinical_covariates_encode_to_known_codes_or_refuse_by_name(rows, cases):
    table = pd.DataFrame(rows, columns=["case_id", "age", "stage"])
    try:
        values = encode_table(CLINICAL, table, cases)
    except Exception as e:
        _named(e)
        return
    assert values.shape == (len(cases), 2) and values.dtype == np.float32
    age, stage = values[:, 0], values[:, 1]
    assert not np.isinf(age).any()
    assert all(math.isnan(s) or s in (0, 1, 2) for s in stage)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6,
)


@fuzz_settings(150)
@given(st.dictionaries(st.sampled_from(["case_id", "slide_id", "time", "time_unit", "event", "censorship", "event_values",
                                        "censored_values", "other"]),
                       json_values | st.sampled_from(["days", "year", "OS.time", "", ["dead"], ["1", 2]]), max_size=5)
       | json_values)
def test_clinical_column_mappings_are_valid_or_refused_by_name(d):
    try:
        columns = ClinicalColumns.from_dict(d, "columns.json")
    except Exception as e:
        _named(e)
        return
    assert ClinicalColumns.from_dict(columns.to_dict()) == columns


# ---------------------------------------------------------------------------------------------------
# Model manifests

MANIFESTS = [json.loads((DATA / "manifest_v1" / name).read_text()) for name in ("ammasurv.json", "resnet18_encoder.json")]


def _schema2(d: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(ModelManifest.load(_write(tmp, "histosurv.json", json.dumps(d))).to_json())


MANIFESTS += [_schema2(d) for d in MANIFESTS]


@st.composite
def mutated(draw, value, depth: int = 0):
    """``value`` with one place somewhere inside it changed: replaced by other JSON, or a key dropped."""
    if isinstance(value, dict) and value and draw(st.integers(0, depth + 1)):
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.integers(0, 4)) == 0:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: draw(mutated(value[key], depth + 1))}
    if isinstance(value, list) and value and draw(st.integers(0, depth + 1)):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutated(value[i], depth + 1)), *value[i + 1:]]
    return draw(json_values | st.sampled_from([-1, 0, 1.5, "FP64", "cox", "discrete", "1", [], {}, [[1, 2, 3]]]))


@st.composite
def manifest_texts(draw):
    d = draw(st.sampled_from(MANIFESTS))
    for _ in range(draw(st.integers(1, 3))):
        d = draw(mutated(d))
    return json.dumps(d) if draw(st.integers(0, 19)) else draw(texts)


@fuzz_settings(200)
@given(manifest_texts())
def test_manifests_load_or_are_refused_by_name(text):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = ModelManifest.load(_write(tmp, "histosurv.json", text))
        except Exception as e:
            _named(e)
            return
    assert all(isinstance(v, int) and v > 0 for v in manifest.versions)  # none: RepositoryError when served
    with tempfile.TemporaryDirectory() as tmp:  # a manifest that loads also saves back (its records are consistent)
        manifest.save(Path(tmp) / "again.json")


# ---------------------------------------------------------------------------------------------------
# histosurv serve --config (TOML)

SERVE_KEYS = ["repo", "host", "grpc-port", "metrics-port", "no-metrics", "model-control", "poll-seconds", "engine",
              "instances", "max-queue", "no-batching", "max-batch", "max-delay-ms", "max-queue-patches", "slide-root",
              "max-active-slides", "max-queued-slides", "mpp", "min-tissue", "threshold", "mask-downsample",
              "batch-size", "workers", "reader", "device", "max-message-mb", "grace", "access-log", "grpc_port", "nope"]
toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str), st.sampled_from(["inf", "-inf", "nan", "true", "false", "0", "1", "1.5",
                                                                "-3", "1e308", '"otsu"', '"poll"', '"cpu"', "2024-01-01"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr), texts.map(json.dumps),
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3).map(lambda v: f"[{', '.join(v)}]") | st.just("{ a = 1 }")


@functools.cache
def _cli_parser():
    from histosurv.cli import build_parser

    return build_parser()


@st.composite
def serve_configs(draw):
    lines = [f"{key} = {draw(toml_values)}" for key in draw(st.lists(st.sampled_from(SERVE_KEYS), max_size=4, unique=True))]
    if draw(st.booleans()):
        lines.append('repo = "."')
    return "\n".join(lines) if draw(st.integers(0, 9)) else draw(texts)


@fuzz_settings(200)
@given(serve_configs())
@example("grpc-port = inf")  # TOML's inf for an integer setting: int(inf) is an OverflowError
@example('repo = "."\npoll-seconds = nan')  # a NaN poll interval, grace or delay is no setting at all
def test_serve_configs_give_options_or_are_refused_by_name(text):
    from histosurv.cli.serve import apply_config, flags_given, options_from_args

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["serve", "--config", str(_write(tmp, "serve.toml", text))]
        args = _cli_parser().parse_args(argv)
        try:
            options = options_from_args(apply_config(args.parser, args, flags_given(args.parser, argv[1:])))
        except Exception as e:
            _named(e)
            return
    assert isinstance(options.repository, str) and isinstance(options.grpc_port, int)
    for seconds in (options.poll_seconds, options.grace_seconds, options.execution.max_delay):
        assert math.isfinite(seconds) and seconds >= 0
