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

Scale: each table is streamed once by DuckDB with the item filter and a semi-join on the cohort's
admissions pushed into the scan, so only cohort rows are ever materialised; the text is built in SQL.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from ehrxdiff.constants import EVENT_TABLES, MAX_EVENTS, NUMBER_DECIMALS
from ehrxdiff.schemas import COLUMNS, EVENT_TABLE_MODULE, TIME_COLUMNS
from ehrxdiff.sources import connect, register_table, sql_literal

log = logging.getLogger(__name__)

__all__ = ["EventResult", "extract_events", "serialize_event", "event_columns", "load_item_filters", "TEXT_STYLES"]

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
    """

    events: pd.DataFrame
    texts: list[str]
    report: pd.DataFrame
    text_style: str

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
        return out


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


def extract_events(mimic_iv_dir: str | Path, pairs: pd.DataFrame, *, max_events: int = MAX_EVENTS,
                   text_style: str = "plain", filter_inputevents: bool = True,
                   tables: tuple[str, ...] = EVENT_TABLES, memory_limit: str | None = None,
                   threads: int | None = None, temp_directory: str | Path | None = None) -> EventResult:
    """Events of every pair in ``pairs`` (columns pair_key, subject_id, hadm_id, prev_time, target_time)."""
    if text_style not in TEXT_STYLES:
        raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {text_style!r}")
    if max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    missing = [c for c in ("pair_key", "subject_id", "hadm_id", "prev_time", "target_time") if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs: missing column '{missing[0]}'")
    filters, drugs = load_item_filters()
    con = connect(memory_limit=memory_limit, threads=threads, temp_directory=temp_directory)
    win = pairs[["pair_key", "subject_id", "hadm_id", "prev_time", "target_time"]].copy()
    win["prev_time"] = pd.to_datetime(win["prev_time"]).astype("datetime64[us]")
    win["target_time"] = pd.to_datetime(win["target_time"]).astype("datetime64[us]")
    con.register("win_df", win)
    con.execute("""CREATE TEMP TABLE win AS SELECT CAST(pair_key AS VARCHAR) AS pair_key, CAST(subject_id AS BIGINT) AS subject_id,
        CAST(hadm_id AS BIGINT) AS hadm_id, CAST(prev_time AS TIMESTAMP) AS prev_time,
        CAST(target_time AS TIMESTAMP) AS target_time FROM win_df""")
    con.execute("CREATE TEMP TABLE win_hadm AS SELECT DISTINCT hadm_id FROM win")
    con.execute("CREATE TEMP TABLE win_subj AS SELECT DISTINCT subject_id FROM win")
    con.execute("""CREATE TEMP TABLE ev (pair_key VARCHAR, t TIMESTAMP, prev_time TIMESTAMP, table_ord INTEGER,
        row_ord BIGINT, text VARCHAR)""")
    if any(t in ("labevents",) for t in tables):
        register_table(con, "d_labitems", mimic_iv_dir, "hosp/d_labitems", ["itemid", "label", "category"], "hosp/d_labitems")
    if any(t in ITEM_DICTIONARY and t != "labevents" for t in tables):
        register_table(con, "d_items", mimic_iv_dir, "icu/d_items", ["itemid", "label", "linksto", "category"], "icu/d_items")

    report: list[dict] = []

    def add(table: str, what: str, n) -> None:
        report.append({"table": table, "what": what, "n": n})

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
        keep = ", ".join(f'v."{c}"' for c in cols)
        # stage 1: one streaming scan; item filter + cohort semi-join pushed into it (file order preserved)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE raw AS
            SELECT TRY_CAST(v.hadm_id AS BIGINT) AS _hadm, {subj} AS _subj, TRY_CAST(v."{tcol}" AS TIMESTAMP) AS _time,
                   {keep}
            FROM ev_{table} v
            WHERE {where} AND (TRY_CAST(v.hadm_id AS BIGINT) IN (SELECT hadm_id FROM win_hadm)
                   OR (v.hadm_id IS NULL AND {subj} IN (SELECT subject_id FROM win_subj)))""")
        t_scan = time.perf_counter()
        add(table, "rows of cohort admissions passing the item filter", int(con.execute(
            "SELECT count(*) FROM raw WHERE _hadm IS NOT NULL").fetchone()[0]))
        add(table, "dropped: null hadm_id inside a pair window of the subject", int(con.execute("""
            SELECT count(*) FROM raw r WHERE r._hadm IS NULL AND EXISTS (SELECT 1 FROM win w
              WHERE w.subject_id = r._subj AND r._time BETWEEN w.prev_time AND w.target_time)""").fetchone()[0]))
        add(table, f"dropped: null or unparseable {tcol}", int(con.execute(
            "SELECT count(*) FROM raw WHERE _hadm IS NOT NULL AND _time IS NULL").fetchone()[0]))
        # stage 2: window join (inclusive both ends), itemid -> label, text in SQL
        label_join = ""
        if table in ITEM_DICTIONARY:
            d = ITEM_DICTIONARY[table]
            label_join = (f"LEFT JOIN (SELECT TRY_CAST(itemid AS BIGINT) AS _item, any_value(label) AS _label "
                          f"FROM {d} GROUP BY 1) d ON d._item = TRY_CAST(r.itemid AS BIGINT)")
        # the label replaces the itemid number (column name kept); an itemid missing from the dictionary keeps its number
        exprs = ['COALESCE(d._label, r."itemid")' if c == "itemid" and label_join else f'r."{c}"' for c in cols]
        text = _text_sql(table, cols, text_style)
        # text once per row inside at least one window (windows of one admission overlap: all-earlier pairing)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE rawtext AS
            SELECT _hadm, _time, row_ord, {_collapse_sql("t")} AS text FROM (
              SELECT _hadm, _time, row_ord, {text} AS t FROM (
                SELECT r._hadm, r._time, r.rowid AS row_ord, {_trimmed_sql(exprs)}
                FROM raw r {label_join}
                WHERE EXISTS (SELECT 1 FROM win w WHERE w.hadm_id = r._hadm
                              AND r._time BETWEEN w.prev_time AND w.target_time)))""")
        t_text = time.perf_counter()
        n_before = con.execute("SELECT count(*) FROM ev").fetchone()[0]
        con.execute(f"""INSERT INTO ev
            SELECT w.pair_key, x._time, w.prev_time, {ord_}, x.row_ord, x.text
            FROM rawtext x JOIN win w ON x._hadm = w.hadm_id AND x._time BETWEEN w.prev_time AND w.target_time""")
        add(table, "events in pair windows", int(con.execute("SELECT count(*) FROM ev").fetchone()[0] - n_before))
        t_end = time.perf_counter()
        add(table, "seconds: scan + item filter + cohort semi-join", round(t_scan - t0, 3))
        add(table, "seconds: serialize rows in windows", round(t_text - t_scan, 3))
        add(table, "seconds: window join", round(t_end - t_text, 3))
        add(table, "seconds", round(t_end - t0, 3))
        con.execute("DROP TABLE raw; DROP TABLE rawtext")

    # most recent max_events per pair; stable order: time, table order, file row order
    con.execute(f"""CREATE TEMP TABLE kept AS SELECT * FROM (
        SELECT *, row_number() OVER (PARTITION BY pair_key ORDER BY t DESC, table_ord DESC, row_ord DESC) AS rn
        FROM ev) WHERE rn <= {int(max_events)}""")
    n_all = con.execute("SELECT count(*) FROM ev").fetchone()[0]
    n_kept = con.execute("SELECT count(*) FROM kept").fetchone()[0]
    add("all", f"dropped: events beyond the most recent {max_events}", int(n_all - n_kept))
    con.execute("""CREATE TEMP TABLE txt AS SELECT text, CAST(row_number() OVER (ORDER BY text) - 1 AS INTEGER) AS text_id
                   FROM (SELECT DISTINCT text FROM kept)""")
    events = con.execute("""
        SELECT k.pair_key, CAST(row_number() OVER (PARTITION BY k.pair_key ORDER BY k.rn DESC) - 1 AS INTEGER) AS position,
               x.text_id, CAST((epoch(k.t) - epoch(k.prev_time)) / 3600.0 AS FLOAT) AS hours, k.table_ord
        FROM kept k JOIN txt x USING (text) ORDER BY k.pair_key, position""").df()
    texts = [r[0] for r in con.execute("SELECT text FROM txt ORDER BY text_id").fetchall()]
    con.close()
    events["table"] = pd.Categorical.from_codes(events.pop("table_ord").astype("int16"), categories=list(tables))
    events["pair_key"] = events["pair_key"].astype("category")
    n_pairs_with = events["pair_key"].nunique()
    add("all", "dropped: pairs with no events", int(len(set(pairs["pair_key"])) - n_pairs_with))
    add("all", "pairs kept", int(n_pairs_with))
    add("all", "events kept", int(len(events)))
    add("all", "unique event texts", int(len(texts)))
    return EventResult(events=events, texts=texts, report=pd.DataFrame(report, columns=["table", "what", "n"]),
                       text_style=text_style)
