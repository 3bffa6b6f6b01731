"""S_event: the EHR events between I_prev and I_trg, serialized as text (§II-D, paper-reference §2.4-2.6).

For each of the seven tables (constants.EVENT_TABLES) the reference's item filter is applied
(``resources/reference-item-filters.json``; decision D2: the inputevents list, defined but never
applied by the released code, is applied unless ``filter_inputevents=False``), ``itemid`` is replaced by
the item's label (the column keeps the name "itemid"), the excluded columns and hadm_id/stay_id/the time
column are dropped, and each remaining non-null column is written as ``<column> <value>`` after the table
name, in the CSV's own column order (GenHPF-style, decision D7):

    plain          ``labevents itemid pO2 value 85 valuenum 85 valueuom mm Hg flag abnormal``
    genhpf_digits  ``labevents itemid p O 2 ...`` - every digit and "." space-separated, as the
                   reference's ``process_unit`` does before Bio_ClinicalBERT tokenisation.

Numbers with a decimal point are rounded to 4 decimals (``7.412345`` -> ``7.4123``); the plain style
also drops trailing zeros (``85.0`` -> ``85``), the genhpf style keeps one (``85.0``, Python's
``str(round(x, 4))`` as the reference). Whitespace runs collapse to one space.

Linkage (paper-reference §2.5): events join a pair through **hadm_id** with prev_time <= time <=
target_time (both inclusive, exact timestamps); rows with a null hadm_id cannot link and are counted.
Per pair events are time-ordered with a stable tie-break (table order, then file row order), the most
recent ``max_events`` kept, and pairs left with no event dropped.

Scale (:func:`extract_events_to_dir`): each table is streamed once by DuckDB with the item filter and a
semi-join on the cohort's admissions pushed into the scan, the text built in SQL for rows inside a window, and
written to parquet; the window join, the most-recent-``max_events`` selection, the unique texts and the
ordering run in DuckDB (within ``memory_limit``, spilling to disk) and are written with ``COPY ... TO``
parquet. No event passes through Python; :func:`ehrxdiff.event_store.build_event_store` reads the files in
chunks. :func:`extract_events` is the same, read back into frames (small cohorts, tests, notebooks).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from ehrxdiff.constants import EVENT_TABLES, MAX_EVENTS, NUMBER_DECIMALS
from ehrxdiff.schemas import COLUMNS, EVENT_TABLE_MODULE, TIME_COLUMNS
from ehrxdiff.sources import connect, register_table, sql_literal

log = logging.getLogger(__name__)

__all__ = ["EventResult", "extract_events", "extract_events_to_dir", "serialize_event", "event_columns", "load_item_filters", "TEXT_STYLES"]

TEXT_STYLES = ("plain", "genhpf_digits")
# tables whose itemid is replaced by a dictionary label [R mimiciv_filtering.py "code"/"desc"]
ITEM_DICTIONARY = {"labevents": "d_labitems", "chartevents": "d_items", "inputevents": "d_items",
                   "outputevents": "d_items", "procedureevents": "d_items"}
_DECIMAL = re.compile(r"-?\d*\.\d+")
_WS_RUN = re.compile(r"[ \t\n\r\f]+")


def load_item_filters() -> tuple[dict, dict]:
    """(item filters, prescription drug lists) from the package resources."""
    pkg = resources.files("ehrxdiff.resources")
    filters = json.loads(pkg.joinpath("reference-item-filters.json").read_text())
    drugs = json.loads(pkg.joinpath(filters["prescriptions"]["drug_lists_file"]).read_text())
    return filters, drugs


def _dropped_columns(table: str, filters: dict) -> set[str]:
    return {c.lower() for c in filters["excluded_columns"][table]} | {"hadm_id", "stay_id", TIME_COLUMNS[table]}


def event_columns(table: str, header: list[str] | None = None) -> list[str]:
    """The serialized columns of ``table`` in order: the header (default: the v2.2 release's) minus
    the excluded columns, hadm_id, stay_id and the time column."""
    filters, _ = load_item_filters()
    header = [c.lower() for c in (header if header is not None else COLUMNS[f"{EVENT_TABLE_MODULE[table]}/{table}"])]
    dropped = _dropped_columns(table, filters)
    return [c for c in header if c not in dropped]


# ---------------------------------------------------------------------------------------------
# The serialization rules, once in Python (for what-if edits and tests) and once in SQL (for scale).

def _format_value(value, style: str) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):  # a float is a decimal number: 85.0 -> "85" (plain) / "85.0" (genhpf)
        text = f"{value:.{NUMBER_DECIMALS}f}"
    else:
        text = str(value).strip(" ")
    if not text:
        return None
    if _DECIMAL.fullmatch(text):
        text = f"{float(text):.{NUMBER_DECIMALS}f}".rstrip("0")
        text = text.rstrip(".") if style == "plain" else (text + "0" if text.endswith(".") else text)
        if text in ("-0", "-0.0"):
            text = text[1:]
    return text


def serialize_event(table: str, values: dict, *, text_style: str = "plain") -> str:
    """One event as text; ``values`` maps column -> value in serialization order (itemid already a label).

    Identical to the SQL that :func:`extract_events` runs (tested), so an event added by hand in a
    what-if scenario embeds exactly like an extracted one.
    """
    if text_style not in TEXT_STYLES:
        raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {text_style!r}")
    parts = [table]
    for col, val in values.items():
        v = _format_value(val, text_style)
        if v is not None:
            parts += [col, v]
    text = " ".join(parts)
    if text_style == "genhpf_digits":
        text = re.sub(r"([0-9.])", r" \1 ", text)
    return _WS_RUN.sub(" ", text).strip(" ")


def _value_sql(v: str, style: str) -> str:
    """SQL for one serialized value from ``v``, a column already trimmed and NULL when blank."""
    rounded = f"rtrim(printf('%.{NUMBER_DECIMALS}f', CAST({v} AS DOUBLE)), '0')"
    if style == "plain":
        num = f"rtrim({rounded}, '.')"
    else:
        num = f"CASE WHEN suffix({rounded}, '.') THEN {rounded} || '0' ELSE {rounded} END"
    num = f"regexp_replace({num}, '^-(0|0\\.0)$', '\\1')"
    # the cheap contains() gates the regex (DuckDB evaluates AND with selection vectors)
    return f"CASE WHEN contains({v}, '.') AND regexp_full_match({v}, '-?[0-9]*\\.[0-9]+') THEN {num} ELSE {v} END"


def _text_sql(table: str, columns: list[str], style: str) -> str:
    """Text of one event from trimmed columns ``c0..cn`` (see :func:`_trimmed_sql`) named ``columns``."""
    parts = [sql_literal(table)] + [f"{sql_literal(c + ' ')} || ({_value_sql(f'c{i}', style)})"
                                    for i, c in enumerate(columns)]
    text = f"concat_ws(' ', {', '.join(parts)})"
    if style == "genhpf_digits":
        text = f"regexp_replace({text}, '([0-9.])', ' \\1 ', 'g')"
    return text


def _collapse_sql(t: str) -> str:
    """Fold whitespace runs, tabs and newlines to one space; contains() spares the regex on clean rows."""
    ws = " OR ".join(f"contains({t}, {x})" for x in ("'  '", "chr(9)", "chr(10)", "chr(12)", "chr(13)"))
    return f"CASE WHEN {ws} THEN trim(regexp_replace({t}, '[ \\t\\n\\r\\f]+', ' ', 'g')) ELSE {t} END"


def _trimmed_sql(exprs: list[str]) -> str:
    """Project each value once: trimmed of spaces, blank -> NULL (MIMIC's NULL is the empty field)."""
    return ", ".join(f"NULLIF(trim(CAST({e} AS VARCHAR)), '') AS c{i}" for i, e in enumerate(exprs))


# ---------------------------------------------------------------------------------------------

@dataclass
class EventResult:
    """Extracted events.

    ``events``: one row per (pair, event), ordered by pair_key then time: pair_key, position (0 = oldest
    kept), text_id (into ``texts``), hours (since the pair's previous image), table.
    ``texts``: the unique event texts (``texts[text_id]``). ``report``: tidy (table, what, n).
    ``root``: the folder the result was read from (:meth:`read`), if any; :func:`ehrxdiff.event_store.
    build_event_store` then streams from its files instead of the frames.
    """

    events: pd.DataFrame
    texts: list[str]
    report: pd.DataFrame
    text_style: str
    root: Path | None = None

    @property
    def pair_keys(self) -> list[str]:
        """Pairs that kept at least one event (the others are dropped, as the reference)."""
        return list(pd.unique(self.events["pair_key"]))

    def for_pair(self, pair_key: str) -> list[tuple[str, float, str]]:
        """[(text, hours since I_prev, table)] in time order."""
        ev = self.events[self.events["pair_key"] == pair_key]
        return [(self.texts[i], float(h), str(t)) for i, h, t in zip(ev["text_id"], ev["hours"], ev["table"])]

    def write(self, out_dir: str | Path) -> Path:
        """``events.parquet``, ``event_texts.parquet``, ``event_report.csv`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.events.to_parquet(out / "events.parquet", index=False)
        pd.DataFrame({"text": self.texts}).to_parquet(out / "event_texts.parquet", index=False)
        self.report.to_csv(out / "event_report.csv", index=False)
        (out / "event_meta.json").write_text(json.dumps({"text_style": self.text_style,
                                                          "tables": list(self.events["table"].cat.categories)
                                                          if hasattr(self.events["table"], "cat") else None}))
        return out

    @classmethod
    def read(cls, root: str | Path, text_style: str | None = None) -> "EventResult":
        """The files written by :meth:`write` or :func:`extract_events_to_dir`, as frames (dtypes as extracted)."""
        root = Path(root)
        meta_path = root / "event_meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        events = pd.read_parquet(root / "events.parquet")
        if not isinstance(events["table"].dtype, pd.CategoricalDtype) or meta.get("tables"):
            events["table"] = pd.Categorical(events["table"].astype(str), categories=meta.get("tables") or list(EVENT_TABLES))
        events["pair_key"] = events["pair_key"].astype(str).astype("category")
        texts = pd.read_parquet(root / "event_texts.parquet")["text"].tolist()
        return cls(events, texts, pd.read_csv(root / "event_report.csv"),
                   text_style or meta.get("text_style", "plain"), root=root)


def _filter_sql(table: str, filters: dict, drugs: dict, filter_inputevents: bool, con) -> str:
    """The reference's item selection for ``table`` as a WHERE clause on the raw VARCHAR view ``v``."""
    f = filters.get(table, {})

    def in_list(col: str, values) -> str:
        return f'v."{col}" IN ({", ".join(sql_literal(x) for x in values)})'

    item = 'TRY_CAST(v.itemid AS BIGINT)'
    if table == "labevents":
        return (f"{item} IN (SELECT TRY_CAST(itemid AS BIGINT) FROM d_labitems WHERE category IN "
                f"({', '.join(map(sql_literal, f['d_labitems_category']))}) OR label IN "
                f"({', '.join(map(sql_literal, f['d_labitems_label']))}))")
    if table == "chartevents":
        return (f"{item} IN (SELECT TRY_CAST(itemid AS BIGINT) FROM d_items WHERE linksto = "
                f"{sql_literal(f['d_items_linksto'])} AND category IN ({', '.join(map(sql_literal, f['d_items_category']))}))")
    if table == "prescriptions":
        names = [d for lst in f["lists"] for d in drugs[lst]]
        names = [d for d in names if not any(s in d.casefold() for s in f["drop_if_name_contains_casefold"])]
        return in_list("drug", names)  # exact, case-sensitive match [R get_filtered_items]
    if table == "inputevents":
        if not filter_inputevents:
            return "TRUE"
        # [R get_filtered_items("inputevents")]: itemids ever ordered as antibiotics, plus listed labels
        con.execute(f"""CREATE OR REPLACE TEMP TABLE input_abx AS SELECT DISTINCT TRY_CAST(itemid AS BIGINT) AS itemid
            FROM ev_inputevents v WHERE {in_list('ordercategoryname', f['ordercategoryname'])}""")
        return (f"({item} IN (SELECT itemid FROM input_abx) OR {item} IN (SELECT TRY_CAST(itemid AS BIGINT) "
                f"FROM d_items WHERE label IN ({', '.join(map(sql_literal, f['d_items_label']))})))")
    if table == "microbiologyevents":
        return in_list("spec_type_desc", f["spec_type_desc"])
    if table == "procedureevents":
        return in_list("ordercategoryname", f["ordercategoryname"])
    if table == "outputevents":
        return "TRUE"
    raise ValueError(f"unknown event table {table!r}; expected one of {EVENT_TABLES}")



def _check_args(pairs: pd.DataFrame, max_events: int, text_style: str) -> None:
    if text_style not in TEXT_STYLES:
        raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {text_style!r}")
    if max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    missing = [c for c in ("pair_key", "subject_id", "hadm_id", "prev_time", "target_time") if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs: missing column '{missing[0]}'")


def _load_windows(con, pairs: pd.DataFrame) -> None:
    """Temp tables ``win`` (one row per pair, ``pair_idx`` = rank of pair_key), ``win_hadm``, ``win_subj`` and
    ``span``: per admission the union of its pairs' windows as disjoint [lo, hi] intervals, so that "is this row
    inside any window" is an equi-join on hadm_id that matches at most once (a streaming probe, no fan-out)."""
    win = pairs[["pair_key", "subject_id", "hadm_id", "prev_time", "target_time"]].copy()
    win["prev_time"] = pd.to_datetime(win["prev_time"]).astype("datetime64[us]")
    win["target_time"] = pd.to_datetime(win["target_time"]).astype("datetime64[us]")
    con.register("win_df", win)
    con.execute("""CREATE TEMP TABLE win AS SELECT CAST(pair_key AS VARCHAR) AS pair_key,
        CAST(dense_rank() OVER (ORDER BY CAST(pair_key AS VARCHAR)) - 1 AS INTEGER) AS pair_idx,
        CAST(subject_id AS BIGINT) AS subject_id, CAST(hadm_id AS BIGINT) AS hadm_id,
        CAST(prev_time AS TIMESTAMP) AS prev_time, CAST(target_time AS TIMESTAMP) AS target_time FROM win_df""")
    con.unregister("win_df")
    con.execute("CREATE TEMP TABLE win_hadm AS SELECT DISTINCT hadm_id FROM win")
    con.execute("CREATE TEMP TABLE win_subj AS SELECT DISTINCT subject_id FROM win")
    con.execute("""CREATE TEMP TABLE span AS
        WITH o AS (SELECT hadm_id, prev_time, target_time, max(target_time) OVER (PARTITION BY hadm_id
                     ORDER BY prev_time, target_time ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reach
                   FROM win WHERE hadm_id IS NOT NULL AND prev_time <= target_time),
             g AS (SELECT *, sum(CASE WHEN reach IS NULL OR prev_time > reach THEN 1 ELSE 0 END) OVER (
                     PARTITION BY hadm_id ORDER BY prev_time, target_time ROWS UNBOUNDED PRECEDING) AS grp FROM o)
        SELECT hadm_id, min(prev_time) AS lo, max(target_time) AS hi FROM g GROUP BY hadm_id, grp""")


def _scan_sql(table: str, cols: list[str], where: str, subj: str, tcol: str) -> str:
    """Stage 1a, one streaming pass over a table: item filter + cohort semi-join pushed into the scan, and the
    file-order number of each surviving row (a streaming ``row_number() OVER ()``: it streams, in file order,
    only at the top of a statement, hence its own COPY)."""
    return f"""
        SELECT *, row_number() OVER () AS row_ord FROM (
          SELECT TRY_CAST(v.hadm_id AS BIGINT) AS _hadm, {subj} AS _subj,
                 TRY_CAST(v."{tcol}" AS TIMESTAMP) AS _time, {", ".join(f'v."{c}"' for c in cols)}
          FROM ev_{table} v
          WHERE {where} AND (TRY_CAST(v.hadm_id AS BIGINT) IN (SELECT hadm_id FROM win_hadm)
                OR (v.hadm_id IS NULL AND {subj} IN (SELECT subject_id FROM win_subj))))"""


def _rows_sql(table: str, cols: list[str], scan: str, label_join: str, text_style: str) -> str:
    """Stage 1b, over the scanned cohort rows: itemid -> label, and the text of rows inside a window (NULL
    elsewhere: those rows are only counted)."""
    exprs = ['COALESCE(d._label, r."itemid")' if c == "itemid" and label_join else f'r."{c}"' for c in cols]
    text = _collapse_sql(_text_sql(table, cols, text_style))
    return f"""
        SELECT _hadm, _subj, _time, row_ord, CASE WHEN _in THEN {text} END AS text FROM (
          SELECT r._hadm, r._subj, r._time, r.row_ord, s.hadm_id IS NOT NULL AS _in, {_trimmed_sql(exprs)}
          FROM read_parquet({sql_literal(scan)}) r
          LEFT JOIN span s ON s.hadm_id = r._hadm AND r._time BETWEEN s.lo AND s.hi
          {label_join})"""


def extract_events_to_dir(mimic_iv_dir: str | Path, pairs: pd.DataFrame, out_dir: str | Path, *,
                          max_events: int = MAX_EVENTS, text_style: str = "plain", filter_inputevents: bool = True,
                          tables: tuple[str, ...] = EVENT_TABLES, memory_limit: str | None = None,
                          threads: int | None = None, temp_directory: str | Path | None = None) -> Path:
    """Events of every pair in ``pairs`` (columns pair_key, subject_id, hadm_id, prev_time, target_time), written
    by DuckDB straight to parquet; nothing per event passes through Python, so the memory is DuckDB's
    ``memory_limit`` (it spills sorts and joins to ``temp_directory``) plus the pairs.

    Writes under ``out_dir``: ``events.parquet`` (pair_key, position, text_id, hours, table; ordered by
    pair_key, position), ``event_texts.parquet`` (text, row i = text id i), ``event_pairs.parquet``
    (pair_key, n_events), ``event_report.csv`` and ``event_meta.json``. Read them with :meth:`EventResult.read`
    or stream them into the store with :func:`ehrxdiff.event_store.build_event_store`.

    Stages: (1) per table one pass over the csv(.gz) → ``_work/rows_<table>.parquet`` (cohort rows: ids, time,
    file order, text if inside a window); (2) all tables: rows × windows → the most recent ``max_events`` per pair
    as integers (pair, table, row, position, hours) → ``_work/kept.parquet``; (3) the distinct texts of kept rows,
    sorted → text ids; (4) events joined to their text ids and pair keys, ordered, → ``events.parquet``.
    """
    _check_args(pairs, max_events, text_style)
    filters, drugs = load_item_filters()
    out = Path(out_dir)
    work = out / "_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    con = connect(memory_limit=memory_limit, threads=threads, temp_directory=temp_directory)
    # the small side (windows, dictionaries) must stay the hash table; DuckDB may flip it on bad estimates
    con.execute("SET disabled_optimizers = 'build_side_probe_side'")
    _load_windows(con, pairs)
    if "labevents" in tables:
        register_table(con, "d_labitems", mimic_iv_dir, "hosp/d_labitems", ["itemid", "label", "category"], "hosp/d_labitems")
    if any(t in ITEM_DICTIONARY and t != "labevents" for t in tables):
        register_table(con, "d_items", mimic_iv_dir, "icu/d_items", ["itemid", "label", "linksto", "category"], "icu/d_items")

    report: list[dict] = []

    def add(table: str, what: str, n) -> None:
        report.append({"table": table, "what": what, "n": n})

    def q(sql: str) -> int:
        return int(con.execute(sql).fetchone()[0])

    row_files: list[tuple[int, str]] = []
    n_in_windows = 0
    for ord_, table in enumerate(tables):
        t0 = time.perf_counter()
        tcol = TIME_COLUMNS[table]
        required = ["hadm_id", tcol] + (["itemid"] if table in ITEM_DICTIONARY else [])
        required += {"prescriptions": ["drug"], "microbiologyevents": ["spec_type_desc"],
                     "procedureevents": ["ordercategoryname"]}.get(table, [])
        if table == "inputevents" and filter_inputevents:
            required.append("ordercategoryname")
        stem = f"{EVENT_TABLE_MODULE[table]}/{table}"
        _, header = register_table(con, f"ev_{table}", mimic_iv_dir, stem, required, stem)
        cols = event_columns(table, header)
        where = _filter_sql(table, filters, drugs, filter_inputevents, con)
        subj = 'TRY_CAST(v.subject_id AS BIGINT)' if "subject_id" in header else "NULL::BIGINT"
        label_join = ""
        if table in ITEM_DICTIONARY:
            d = ITEM_DICTIONARY[table]
            # the label replaces the itemid number (column name kept); an itemid missing from the dictionary keeps its number
            label_join = (f"LEFT JOIN (SELECT TRY_CAST(itemid AS BIGINT) AS _item, any_value(label) AS _label "
                          f"FROM {d} GROUP BY 1) d ON d._item = TRY_CAST(r.\"itemid\" AS BIGINT)")
        path = (work / f"rows_{table}.parquet").as_posix()
        scan = (work / f"scan_{table}.parquet").as_posix()
        con.execute(f"COPY ({_scan_sql(table, cols, where, subj, tcol)}) TO {sql_literal(scan)} (FORMAT parquet)")
        con.execute(f"COPY ({_rows_sql(table, cols, scan, label_join, text_style)}) TO "
                    f"{sql_literal(path)} (FORMAT parquet)")
        Path(scan).unlink()
        t_scan = time.perf_counter()
        rows = f"read_parquet({sql_literal(path)})"
        add(table, "rows of cohort admissions passing the item filter", q(f"SELECT count(*) FROM {rows} WHERE _hadm IS NOT NULL"))
        add(table, "dropped: null hadm_id inside a pair window of the subject", q(f"""
            SELECT count(*) FROM {rows} r WHERE r._hadm IS NULL AND EXISTS (SELECT 1 FROM win w
              WHERE w.subject_id = r._subj AND r._time BETWEEN w.prev_time AND w.target_time)"""))
        add(table, f"dropped: null or unparseable {tcol}", q(f"SELECT count(*) FROM {rows} WHERE _hadm IS NOT NULL AND _time IS NULL"))
        n = q(f"""SELECT count(*) FROM {rows} r JOIN win w ON r._hadm = w.hadm_id
                  AND r._time BETWEEN w.prev_time AND w.target_time WHERE r.text IS NOT NULL""")
        n_in_windows += n
        add(table, "events in pair windows", n)
        t_end = time.perf_counter()
        add(table, "seconds: scan + item filter + cohort semi-join + serialize rows in windows", round(t_scan - t0, 3))
        add(table, "seconds: counts", round(t_end - t_scan, 3))
        add(table, "seconds", round(t_end - t0, 3))
        row_files.append((ord_, path))

    t0 = time.perf_counter()
    union = " UNION ALL ".join(f"SELECT CAST({o} AS SMALLINT) AS table_ord, _hadm, _time, row_ord, text "
                               f"FROM read_parquet({sql_literal(p)}) WHERE text IS NOT NULL" for o, p in row_files)
    con.execute(f"CREATE TEMP VIEW rows_all AS {union}")
    kept = (work / "kept.parquet").as_posix()
    # most recent max_events per pair; stable order: time, table order, file row order
    con.execute(f"""COPY (
        SELECT pair_idx, table_ord, row_ord, CAST(least(cnt, {int(max_events)}) - rn AS INTEGER) AS position,
               CAST((epoch(_time) - epoch(prev_time)) / 3600.0 AS FLOAT) AS hours
        FROM (SELECT w.pair_idx, r.table_ord, r.row_ord, r._time, w.prev_time,
                     row_number() OVER (PARTITION BY w.pair_idx ORDER BY r._time DESC, r.table_ord DESC, r.row_ord DESC) AS rn,
                     count(*) OVER (PARTITION BY w.pair_idx) AS cnt
              FROM rows_all r JOIN win w ON r._hadm = w.hadm_id AND r._time BETWEEN w.prev_time AND w.target_time)
        WHERE rn <= {int(max_events)}) TO {sql_literal(kept)} (FORMAT parquet)""")
    t_kept = time.perf_counter()
    kept_rel = f"read_parquet({sql_literal(kept)})"
    n_kept = q(f"SELECT count(*) FROM {kept_rel}")
    add("all", f"dropped: events beyond the most recent {max_events}", int(n_in_windows - n_kept))
    # texts of kept rows only, sorted -> ids (as the in-memory version: ORDER BY text)
    con.execute(f"""CREATE TEMP TABLE row_text AS
        SELECT r.table_ord, r.row_ord, r.text FROM rows_all r
        SEMI JOIN (SELECT DISTINCT table_ord, row_ord FROM {kept_rel}) k
          ON r.table_ord = k.table_ord AND r.row_ord = k.row_ord""")
    con.execute("""CREATE TEMP TABLE txt AS SELECT text, CAST(row_number() OVER (ORDER BY text) - 1 AS INTEGER) AS text_id
                   FROM (SELECT DISTINCT text FROM row_text)""")
    con.execute(f"COPY (SELECT text FROM txt ORDER BY text_id) TO {sql_literal((out / 'event_texts.parquet').as_posix())} (FORMAT parquet)")
    con.execute("""CREATE OR REPLACE TEMP TABLE row_text AS SELECT r.table_ord, r.row_ord, t.text_id
                   FROM row_text r JOIN txt t USING (text)""")
    n_texts = q("SELECT count(*) FROM txt")
    con.execute("DROP TABLE txt")
    t_text = time.perf_counter()
    table_names = "CASE k.table_ord " + " ".join(f"WHEN {o} THEN {sql_literal(t)}" for o, t in enumerate(tables)) + " END"
    con.execute(f"""COPY (
        SELECT p.pair_key, k.position, x.text_id, k.hours, {table_names} AS "table"
        FROM {kept_rel} k JOIN row_text x ON k.table_ord = x.table_ord AND k.row_ord = x.row_ord
        JOIN (SELECT DISTINCT pair_idx, pair_key FROM win) p ON p.pair_idx = k.pair_idx
        ORDER BY k.pair_idx, k.position) TO {sql_literal((out / 'events.parquet').as_posix())} (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT p.pair_key, CAST(n AS INTEGER) AS n_events FROM
        (SELECT pair_idx, count(*) AS n FROM {kept_rel} GROUP BY pair_idx) k
        JOIN (SELECT DISTINCT pair_idx, pair_key FROM win) p USING (pair_idx) ORDER BY pair_idx)
        TO {sql_literal((out / 'event_pairs.parquet').as_posix())} (FORMAT parquet)""")
    n_pairs_with = q(f"SELECT count(DISTINCT pair_idx) FROM {kept_rel}")
    t_end = time.perf_counter()
    con.close()
    shutil.rmtree(work, ignore_errors=True)
    add("all", "dropped: pairs with no events", int(len(set(pairs["pair_key"])) - n_pairs_with))
    add("all", "pairs kept", int(n_pairs_with))
    add("all", "events kept", int(n_kept))
    add("all", "unique event texts", int(n_texts))
    add("all", "seconds: window join + most recent per pair", round(t_kept - t0, 3))
    add("all", "seconds: unique texts", round(t_text - t_kept, 3))
    add("all", "seconds: write events", round(t_end - t_text, 3))
    pd.DataFrame(report, columns=["table", "what", "n"]).to_csv(out / "event_report.csv", index=False)
    (out / "event_meta.json").write_text(json.dumps({"text_style": text_style, "tables": list(tables),
                                                     "max_events": int(max_events)}))
    return out


def extract_events(mimic_iv_dir: str | Path, pairs: pd.DataFrame, *, max_events: int = MAX_EVENTS,
                   text_style: str = "plain", filter_inputevents: bool = True,
                   tables: tuple[str, ...] = EVENT_TABLES, memory_limit: str | None = None,
                   threads: int | None = None, temp_directory: str | Path | None = None) -> EventResult:
    """Events of every pair in ``pairs`` as in-memory frames: :func:`extract_events_to_dir` into a temporary
    folder, read back. At full MIMIC scale call :func:`extract_events_to_dir` and stream the files instead."""
    _check_args(pairs, max_events, text_style)
    with tempfile.TemporaryDirectory(prefix="ehrxdiff-events-") as tmp:
        extract_events_to_dir(mimic_iv_dir, pairs, tmp, max_events=max_events, text_style=text_style,
                              filter_inputevents=filter_inputevents, tables=tables, memory_limit=memory_limit,
                              threads=threads, temp_directory=temp_directory)
        res = EventResult.read(tmp)
    res.root = None
    return res
