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

Linkage (paper-reference §2.5): events join a pair through **hadm_id** with prev_time <= time < target_time
(``window_end="exclusive"``, the default) or prev_time <= time <= target_time (``"inclusive"``, the reference's).
An event at the target's own time was charted with the film that is to be predicted: in day-resolution data that
is every measurement of the target's day, and on MIMIC the film's own procedure row (the synthetic world charts one
for 88 % of the demo's pairs), so the default leaves it out (issue 16); the paper profile keeps the reference's
rule. Rows with a null or unparseable hadm_id ("NaN") cannot link and are counted.
Per pair events are time-ordered with a total order that depends on the data only: time, then table order
(:data:`EVENT_TABLES`), then the event's raw column values (their sort order as text). File row order is not
used: a parallel scan does not keep it, and it made two runs order 7 of 403 k same-time events differently
(issue 15). A row repeated in a table (same admission, time and values) is one event; the copies are counted in
the report. The most recent ``max_events`` are kept (``budget_last``: those tables only after all others), and
pairs left with no event dropped.

Scale (:func:`extract_events_to_dir`): each table is streamed once by DuckDB with the item filter (a literal
itemid list) and a semi-join on the cohort's admissions pushed into the scan, and the raw values of rows inside
a window written to parquet; the window join, the ``max_events`` selection and the ordering run in
DuckDB on integers (within ``memory_limit``, spilling to disk); the text is built in SQL once per distinct value
tuple of the kept rows (texts repeat heavily), not per row. Events reach Python only as Arrow batches for the
final write; :func:`ehrxdiff.data.event_store.build_event_store` reads the files in chunks. :func:`extract_events` is
the same, read back into frames (small cohorts, tests, notebooks).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ehrxdiff.constants import EVENT_TABLES, MAX_EVENTS, NUMBER_DECIMALS
from ehrxdiff.data.schemas import COLUMNS, EVENT_TABLE_MODULE, TIME_COLUMNS
from ehrxdiff.data.sources import (ID_SQL, OFFSET_SQL, InputFileError, MissingTableError, SchemaError, connect,
                                   csv_relation_sql, materialize, reading, register_table, sql_literal)

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
    pkg = resources.files("ehrxdiff.data.resources")
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


def unknown_columns(table: str, columns) -> list[str]:
    """The ``columns`` that ``table``'s extracted text never carries (sorted): an event written by hand with one of
    them could not look like an extracted event (what-if edits, ``whatif_definitions``)."""
    return sorted(set(columns) - set(event_columns(table)))


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
    ``root``: the folder the result was read from (:meth:`read`), if any; :func:`ehrxdiff.data.event_store.
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


def _in_sql(expr: str, values) -> str:
    """``expr IN (literals)``; FALSE for an empty list (no match, as ``IN`` over an empty subquery)."""
    values = list(values)
    lit = [str(int(x)) if isinstance(x, int) else sql_literal(x) for x in values]
    return f"{expr} IN ({', '.join(lit)})" if lit else "FALSE"


def _item_ids(con, sql: str) -> list[int]:
    """The distinct non-null integer itemids a dictionary query selects, sorted (a literal list for the scan)."""
    return sorted(int(r[0]) for r in con.execute(f"SELECT DISTINCT x FROM ({sql}) t(x) WHERE x IS NOT NULL").fetchall())


DRUG_MATCHING = ("casefold", "exact")
WINDOW_END = ("exclusive", "inclusive")


def window_sql(time: str, win: str, window_end: str) -> str:
    """``time`` inside the window of pair ``win``: prev_time <= time < target_time (exclusive end, the default) or
    <= target_time (inclusive, the reference's). One rule for the MIMIC and the own-cohort path."""
    if window_end not in WINDOW_END:
        raise ValueError(f"window_end must be one of {WINDOW_END}, got {window_end!r}")
    return f"{time} >= {win}.prev_time AND {time} {'<' if window_end == 'exclusive' else '<='} {win}.target_time"


def _filter_sql(table: str, filters: dict, drugs: dict, filter_inputevents: bool, con,
                drug_matching: str = "casefold", selected: dict | None = None) -> str:
    """The reference's item selection for ``table`` as a WHERE clause on the raw VARCHAR view ``v``.

    The dictionary look-ups run once here and enter the scan as literal lists (``TRY_CAST(itemid) IN (...)``
    over a subquery and ``IN`` over the same values select the same rows in a WHERE clause: a NULL in the
    subquery only turns a FALSE into a NULL)."""
    f = filters.get(table, {})

    def note(column: str, values) -> None:   # what the filter selects, for the report of values that match nothing
        if selected is not None:
            selected[table] = (column, [str(v) for v in values])

    def lits(values) -> str:
        return ", ".join(map(sql_literal, values))

    item = 'TRY_CAST(v.itemid AS BIGINT)'
    if table == "labevents":
        ids = _item_ids(con, f"SELECT TRY_CAST(itemid AS BIGINT) FROM d_labitems WHERE category IN "
                             f"({lits(f['d_labitems_category'])}) OR label IN ({lits(f['d_labitems_label'])})")
        note("itemid", ids)
        return _in_sql(item, ids)
    if table == "chartevents":
        ids = _item_ids(con, f"SELECT TRY_CAST(itemid AS BIGINT) FROM d_items WHERE linksto = "
                             f"{sql_literal(f['d_items_linksto'])} AND category IN ({lits(f['d_items_category'])})")
        note("itemid", ids)
        return _in_sql(item, ids)
    if table == "prescriptions":
        names = [d for lst in f["lists"] for d in drugs[lst]]
        names = [d for d in names if not any(s in d.casefold() for s in f["drop_if_name_contains_casefold"])]
        if drug_matching == "exact":   # exact, case-sensitive match [R get_filtered_items]
            note("drug", sorted(set(names)))
            return _in_sql('v."drug"', names)
        # trimmed and case-folded on both sides: MIMIC writes tall-man and lower-case names (HydrALAZINE,
        # NORepinephrine, vancomycin) that the reference's exact match drops (issue 16)
        folded = sorted({d.strip().lower() for d in names})
        note("drug", folded)
        return _in_sql('lower(trim(v."drug"))', folded)
    if table == "inputevents":
        if not filter_inputevents:
            return "TRUE"
        # [R get_filtered_items("inputevents")]: itemids ever ordered as antibiotics, plus listed labels
        ids = _item_ids(con, f"SELECT TRY_CAST(itemid AS BIGINT) FROM ev_inputevents v "
                             f"WHERE {_in_sql('v.ordercategoryname', f['ordercategoryname'])}")
        ids += _item_ids(con, f"SELECT TRY_CAST(itemid AS BIGINT) FROM d_items WHERE label IN ({lits(f['d_items_label'])})")
        note("itemid", sorted(set(ids)))
        return _in_sql(item, sorted(set(ids)))
    if table == "microbiologyevents":
        note("spec_type_desc", f["spec_type_desc"])
        return _in_sql('v."spec_type_desc"', f["spec_type_desc"])
    if table == "procedureevents":
        note("ordercategoryname", f["ordercategoryname"])
        return _in_sql('v."ordercategoryname"', f["ordercategoryname"])
    if table == "outputevents":
        return "TRUE"
    raise ValueError(f"unknown event table {table!r}; expected one of {EVENT_TABLES}")


def budget_order_sql(tables, budget_last, column: str = "table_ord") -> str:
    """The leading ORDER BY term that ranks the ``budget_last`` tables' events after all others' ('' when none),
    over ``column`` = the table's index in ``tables``. A name that is not one of ``tables`` is refused: it would
    otherwise change nothing, silently."""
    tables, budget_last = list(tables), list(budget_last or ())
    unknown = [t for t in budget_last if t not in tables]
    if unknown:
        raise ValueError(f"event_budget_last names {unknown}, which are not event tables of this extraction "
                         f"({', '.join(tables)})")
    if not budget_last:
        return ""
    return f"({column} IN ({', '.join(str(tables.index(t)) for t in budget_last)})) ASC, "


def budget_report_row(max_events: int, budget_last) -> str:
    """The event report's row for the events the budget drops (one wording for both extractions)."""
    if not budget_last:
        return f"dropped: events beyond the most recent {max_events}"
    return f"dropped: events beyond the budget of {max_events} ({', '.join(budget_last)} fill it last)"


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


class _GunzipPipe:
    """Decompress a .csv.gz into a named pipe on a second thread while DuckDB parses the other end.

    DuckDB inflates a gzip csv on the thread that parses it (a gzip stream cannot be split), so one table's pass
    runs on one core; here zlib (which releases the GIL) inflates on another core. Used for one streaming scan;
    errors on the writing side are raised by :meth:`close`, so a truncated stream never passes silently."""

    def __init__(self, src: Path, fifo: Path) -> None:
        self.src, self.fifo, self.error = Path(src), Path(fifo), None
        os.mkfifo(self.fifo)
        self.thread = threading.Thread(target=self._run, name=f"gunzip-{self.src.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with open(self.fifo, "wb", buffering=1 << 20) as w, open(self.src, "rb") as f:
                d, fed = zlib.decompressobj(16 + zlib.MAX_WBITS), False
                while chunk := f.read(1 << 20):
                    while chunk:
                        w.write(d.decompress(chunk))
                        fed, chunk = True, b""
                        if d.eof:  # a multi-member gzip file: the next member starts in unused_data
                            chunk, d, fed = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS), False
                w.write(d.flush())
                if fed and not d.eof:
                    raise EOFError(f"{self.src}: truncated gzip stream")
        except BrokenPipeError:
            self.error = self.error or BrokenPipeError(f"{self.src}: the reader closed the pipe early")
        except BaseException as e:  # noqa: BLE001 - re-raised by close()
            self.error = e

    def close(self, *, failed: bool = False) -> None:
        """Wait for the writer, remove the pipe, and raise the writer's error if it had one. ``failed``: the
        reading query failed, so the writer is unblocked (the rest of the stream drained) and its error ignored."""
        if failed or self.thread.is_alive():
            try:  # a writer waiting in open() or write(): give it a reader that drains what is left
                fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    while self.thread.is_alive():
                        try:
                            if not os.read(fd, 1 << 20):
                                self.thread.join(timeout=0.05)
                        except BlockingIOError:
                            self.thread.join(timeout=0.05)
                finally:
                    os.close(fd)
            except OSError:
                pass
        self.thread.join()
        self.fifo.unlink(missing_ok=True)
        if self.error is not None and not failed:
            raise RuntimeError(f"decompressing {self.src} failed: {self.error}") from self.error


def _scan_sql(table: str, cols: list[str], where: str, subj: str, tcol: str, source: str | None = None) -> str:
    """Stage 1, one streaming pass over a table: item filter + cohort semi-join pushed into the scan, whether the
    row lies in a window span of its admission (``_in``), and the raw columns ``r0..rn`` of those rows (NULL
    elsewhere: those rows are only counted). Row order in the parquet file does not matter: events at the same
    time are ordered by their values later, never by the order a parallel scan wrote them in."""
    raw = ", ".join(f'CASE WHEN s.hadm_id IS NOT NULL THEN r."{c}" END AS r{i}' for i, c in enumerate(cols))
    hadm = ID_SQL.format(x="v.hadm_id")   # "NaN" or "123.5" is no id: such rows count as null hadm_id
    return f"""
        SELECT r._hadm, r._subj, r._time, s.hadm_id IS NOT NULL AS _in, r._offset, {raw}
        FROM (SELECT {hadm} AS _hadm, {subj} AS _subj,
                     TRY_CAST(v."{tcol}" AS TIMESTAMP) AS _time,
                     CASE WHEN {OFFSET_SQL.format(x=f'v."{tcol}"')} THEN v."{tcol}" END AS _offset,
                     {", ".join(f'v."{c}"' for c in cols)}
              FROM {source or f"ev_{table}"} v
              WHERE {where} AND ({hadm} IN (SELECT hadm_id FROM win_hadm)
                    OR ({hadm} IS NULL AND {subj} IN (SELECT subject_id FROM win_subj)))) r
        LEFT JOIN span s ON s.hadm_id = r._hadm AND r._time BETWEEN s.lo AND s.hi"""


def _tuple_text_sql(table: str, cols: list[str], tuples: str, label_join: str, text_style: str) -> str:
    """(tuple_id, text) for each raw value tuple ``r0..rn`` of ``tuples`` (texts repeat heavily, so the
    serialization runs once per distinct tuple, not per row): itemid -> label, trimmed, serialized."""
    exprs = ['COALESCE(d._label, u."r{}")'.format(i) if c == "itemid" and label_join else f'u."r{i}"'
             for i, c in enumerate(cols)]
    # the text once as a column, then the whitespace fold over it (one expression tree each, not nested copies)
    return f"""
        SELECT tuple_id, {_collapse_sql('_t')} AS text FROM (
          SELECT tuple_id, {_text_sql(table, cols, text_style)} AS _t FROM (
            SELECT u.tuple_id, {_trimmed_sql(exprs)} FROM {tuples} u {label_join}))"""


def extract_events_to_dir(mimic_iv_dir: str | Path, pairs: pd.DataFrame, out_dir: str | Path, *,
                          max_events: int = MAX_EVENTS, text_style: str = "plain", filter_inputevents: bool = True,
                          drug_matching: str = "casefold", window_end: str = "exclusive",
                          tables: tuple[str, ...] = EVENT_TABLES, memory_limit: str | None = None,
                          threads: int | None = None, temp_directory: str | Path | None = None,
                          gunzip_thread: bool = False, budget_last: tuple[str, ...] = ()) -> Path:
    """Events of every pair in ``pairs`` (columns pair_key, subject_id, hadm_id, prev_time, target_time), written
    by DuckDB to parquet; events pass through Python only as Arrow batches of integers (the final write), so the
    memory is DuckDB's ``memory_limit`` (it spills sorts and joins to ``temp_directory``) plus the pairs.

    ``gunzip_thread``: inflate each .csv.gz on a second thread into a named pipe that DuckDB parses (DuckDB
    inflates gzip on the parsing thread). Off by default: it can only help with a spare core, and on the shared
    2-core machine of the benchmark it measured no gain (chartevents pass 23.9 s vs 22.1 s).

    ``budget_last``: tables whose events fill the ``max_events`` budget only after every other table's (the most
    recent first within each group); the kept events stay in time order. Empty (the default) is the reference's
    rule, the most recent ``max_events`` of all tables [R ehr.py make_input], which keeps 1024. Not in the paper: at
    the demo's 64 the most recent events are mostly hourly vitals and push out the doses that change the film
    (docs/methods.md, "Vitals last in the event budget"; :func:`budget_order_sql`).

    Writes under ``out_dir``: ``events.parquet`` (pair_key, position, text_id, hours, table; ordered by
    pair_key, position), ``event_texts.parquet`` (text, row i = text id i), ``event_pairs.parquet``
    (pair_key, n_events), ``event_report.csv``, ``event_filter_unmatched.csv`` (the filter values that select no
    event in any pair window) and ``event_meta.json``. Read them with :meth:`EventResult.read`
    or stream them into the store with :func:`ehrxdiff.data.event_store.build_event_store`.

    Stages: (1) per table one pass over the csv(.gz) → ``_work/rows_<table>.parquet`` (cohort rows:
    ids, time, in-a-window flag, the raw values of rows in a window);
    (2) per table the distinct raw value tuples of rows in windows get ids; (3) all tables: rows × windows → the
    most recent ``max_events`` per pair as integers (pair, table, tuple id, position, hours), sorted by pair and
    position → ``_work/kept.parquet``; (4) the tuples of kept rows are serialized (once per distinct tuple, not
    per row), the distinct texts sorted → text ids; (5) kept.parquet streamed in order, text ids / pair keys /
    table names looked up by index → ``events.parquet``.
    """
    _check_args(pairs, max_events, text_style)
    if drug_matching not in DRUG_MATCHING:
        raise ValueError(f"drug_matching must be one of {DRUG_MATCHING}, got {drug_matching!r}")
    last_first = budget_order_sql(tables, budget_last)
    in_window = window_sql("r._time", "w", window_end)
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
        p, _ = register_table(con, "d_labitems_csv", mimic_iv_dir, "hosp/d_labitems", ["itemid", "label", "category"],
                              "hosp/d_labitems")
        materialize(con, "d_labitems", "d_labitems_csv", p)
    if any(t in ITEM_DICTIONARY and t != "labevents" for t in tables):
        p, _ = register_table(con, "d_items_csv", mimic_iv_dir, "icu/d_items", ["itemid", "label", "linksto", "category"],
                              "icu/d_items")
        materialize(con, "d_items", "d_items_csv", p)

    report: list[dict] = []

    def add(table: str, what: str, n) -> None:
        report.append({"table": table, "what": what, "n": n})

    def q(sql: str):
        return con.execute(sql).fetchone()

    def rows_of(path: str) -> str:
        return f"read_parquet({sql_literal(path)})"

    done: list[tuple[int, str, str, list[str]]] = []  # (table_ord, table, rows file, columns)
    selected: dict[str, tuple[str, list[str]]] = {}    # table -> (column, values its filter selects)
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
        src, header = register_table(con, f"ev_{table}", mimic_iv_dir, stem, required, stem)
        cols = event_columns(table, header)
        with reading(src):   # the inputevents filter reads the table once (itemids ever ordered as antibiotics)
            where = _filter_sql(table, filters, drugs, filter_inputevents, con, drug_matching, selected)
        subj = ID_SQL.format(x="v.subject_id") if "subject_id" in header else "NULL::BIGINT"
        path = (work / f"rows_{table}.parquet").as_posix()
        pipe = None
        if gunzip_thread and src.name.endswith(".gz") and hasattr(os, "mkfifo"):
            pipe = _GunzipPipe(src, work / f"{table}.csv")
        try:
            source = f"{csv_relation_sql(pipe.fifo, header)}" if pipe else None
            with reading(src):
                con.execute(f"COPY ({_scan_sql(table, cols, where, subj, tcol, source)}) TO {sql_literal(path)} (FORMAT parquet)")
        except BaseException as e:
            if pipe:
                pipe.close(failed=True)
                if pipe.error is not None and not isinstance(pipe.error, BrokenPipeError):  # the root cause
                    raise RuntimeError(f"decompressing {src} failed: {pipe.error}") from e
                e.add_note(f"(reading {src} through the decompression pipe {pipe.fifo})")
            raise
        if pipe:
            pipe.close()
        t_scan = time.perf_counter()
        rows = f"read_parquet({sql_literal(path)})"
        n_offset, example = q(f"SELECT count(_offset), any_value(_offset) FROM {rows}")
        if n_offset:
            raise InputFileError(f"{src}: column '{tcol}': {n_offset} time(s) of cohort rows carry a UTC offset (e.g. "
                                 f"'{example}'). MIMIC times are local times without one, as the images' are; an "
                                 "offset would be dropped or shift these events against the films. Write every time "
                                 "in one clock, without an offset.")
        n_rows, n_null_time = q(f"""SELECT count(*) FILTER (WHERE _hadm IS NOT NULL),
                                           count(*) FILTER (WHERE _hadm IS NOT NULL AND _time IS NULL) FROM {rows}""")
        add(table, "rows of cohort admissions passing the item filter", int(n_rows))
        add(table, "dropped: null or unparseable hadm_id inside a pair window of the subject", int(q(f"""
            SELECT count(*) FROM {rows} r WHERE r._hadm IS NULL AND EXISTS (SELECT 1 FROM win w
              WHERE w.subject_id = r._subj AND {in_window})""")[0]))
        add(table, f"dropped: null or unparseable {tcol}", int(n_null_time))
        n = int(q(f"""SELECT count(*) FROM {rows} r JOIN win w ON r._hadm = w.hadm_id
                      AND {in_window} WHERE r._in""")[0])
        n_in_windows += n
        add(table, "events in pair windows", n)
        t_end = time.perf_counter()
        add(table, "seconds: scan + item filter + cohort semi-join + window flag", round(t_scan - t0, 3))
        add(table, "seconds: counts", round(t_end - t_scan, 3))
        add(table, "seconds", round(t_end - t0, 3))
        done.append((ord_, table, path, cols))

    t0 = time.perf_counter()
    # each distinct raw value tuple of the rows in windows gets an id (per table); rows carry the id, not the values
    for o, table, path, cols in done:
        raw = ", ".join(f"r{i}" for i in range(len(cols)))
        # ids in the order of the values themselves: the tie-break of events at the same time (below) is then a
        # function of the data, not of the order a parallel scan happened to write rows in (issue 15)
        con.execute(f"""CREATE TEMP TABLE tup_{o} AS SELECT {raw},
                            CAST(row_number() OVER (ORDER BY {raw or "1"}) - 1 AS INTEGER) AS tuple_id
                        FROM (SELECT DISTINCT {raw} FROM read_parquet({sql_literal(path)}) WHERE _in)""")
    # filter values that select no event of any pair window (issue 16: on the real MIMIC-IV demo, 8 of 15 specimen
    # types; a filter tuned on one release can go quietly empty on another): counted here, listed in a file
    unmatched = []
    for o, table, _, cols in done:
        if table not in selected or selected[table][0] not in cols:
            continue
        col, values = selected[table]
        r = f"r{cols.index(col)}"
        key = {"itemid": f"CAST(TRY_CAST({r} AS BIGINT) AS VARCHAR)",
               "drug": f"lower(trim({r}))" if drug_matching == "casefold" else r}.get(col, r)
        seen = {x for (x,) in con.execute(f"SELECT DISTINCT {key} FROM tup_{o}").fetchall()}
        miss = [v for v in values if v not in seen]
        add(table, f"filter values ({col}) that select no event in a pair window (event_filter_unmatched.csv)",
            len(miss))
        add(table, f"filter values ({col})", len(values))
        unmatched += [{"table": table, "column": col, "value": v} for v in miss]
    pd.DataFrame(unmatched, columns=["table", "column", "value"]).to_csv(out / "event_filter_unmatched.csv", index=False)
    t_tup = time.perf_counter()

    def with_tuple(o: int, path: str, cols: list[str]) -> str:
        on = " AND ".join(f"r.r{i} IS NOT DISTINCT FROM u.r{i}" for i in range(len(cols))) or "TRUE"
        return (f"SELECT CAST({o} AS SMALLINT) AS table_ord, r._hadm, r._time, u.tuple_id "
                f"FROM {rows_of(path)} r JOIN tup_{o} u ON {on} WHERE r._in")

    # a row repeated in a table (same admission, time and values) is one event, not two (issue 15: a duplicated
    # row doubled S_event); DISTINCT over the rows in windows, counted below
    con.execute("CREATE TEMP VIEW rows_all AS SELECT DISTINCT * FROM ("
                + " UNION ALL ".join(with_tuple(o, p, c) for o, _, p, c in done) + ")")
    con.execute(f"""CREATE TEMP TABLE in_win AS SELECT w.pair_idx, r.table_ord, r.tuple_id, r._time, w.prev_time
                    FROM rows_all r JOIN win w ON r._hadm = w.hadm_id AND {in_window}""")
    n_distinct = int(q("SELECT count(*) FROM in_win")[0])
    add("all", "dropped: duplicate rows (same table, admission, time and values; one kept)", int(n_in_windows - n_distinct))
    kept = (work / "kept.parquet").as_posix()
    # max_events per pair, the most recent first (the budget_last tables after all others); a total order that
    # depends on the data only: time, table order, then the event's values (tuple ids follow the values' sort
    # order); rows equal in all of these were merged above. Positions number the kept events in time order.
    con.execute(f"""COPY (
        SELECT pair_idx, table_ord, tuple_id,
               CAST(row_number() OVER (PARTITION BY pair_idx ORDER BY _time, table_ord, tuple_id) - 1 AS INTEGER)
                 AS position,
               CAST((epoch(_time) - epoch(prev_time)) / 3600.0 AS FLOAT) AS hours
        FROM (SELECT *, row_number() OVER (PARTITION BY pair_idx
                                           ORDER BY {last_first}_time DESC, table_ord DESC, tuple_id DESC) AS rn
              FROM in_win)
        WHERE rn <= {int(max_events)} ORDER BY pair_idx, position) TO {sql_literal(kept)} (FORMAT parquet)""")
    con.execute("DROP TABLE in_win")
    t_kept = time.perf_counter()
    kept_rel = f"read_parquet({sql_literal(kept)})"
    n_kept = int(q(f"SELECT count(*) FROM {kept_rel}")[0])
    add("all", budget_report_row(max_events, budget_last), int(n_distinct - n_kept))
    # texts of kept rows only: the value tuples of kept rows are serialized (once per tuple), the distinct texts
    # sorted -> ids (ORDER BY text, as the in-memory version), and each (table, tuple) mapped to its text id
    con.execute(f"CREATE TEMP TABLE kept_tup AS SELECT DISTINCT table_ord, tuple_id FROM {kept_rel}")
    for o, table, path, cols in done:
        label_join = ""
        if table in ITEM_DICTIONARY and "itemid" in cols:
            # the label replaces the itemid number (column name kept); an itemid missing from the dictionary keeps its number
            label_join = (f"LEFT JOIN (SELECT TRY_CAST(itemid AS BIGINT) AS _item, any_value(label) AS _label "
                          f"FROM {ITEM_DICTIONARY[table]} GROUP BY 1) d ON d._item = TRY_CAST(u.\"r{cols.index('itemid')}\" AS BIGINT)")
        tuples = (f"(SELECT * FROM tup_{o} t SEMI JOIN (SELECT tuple_id FROM kept_tup WHERE table_ord = {o}) k "
                  f"ON t.tuple_id = k.tuple_id)")
        con.execute(f"CREATE OR REPLACE TEMP TABLE tup_{o} AS "
                    f"{_tuple_text_sql(table, cols, tuples, label_join, text_style)}")
    con.execute("CREATE TEMP TABLE txt AS SELECT text, CAST(row_number() OVER (ORDER BY text) - 1 AS INTEGER) AS text_id "
                "FROM (SELECT DISTINCT text FROM (" + " UNION ALL ".join(f"SELECT text FROM tup_{o}" for o, *_ in done) + "))")
    con.execute(f"COPY (SELECT text FROM txt ORDER BY text_id) TO {sql_literal((out / 'event_texts.parquet').as_posix())} (FORMAT parquet)")
    n_texts = int(q("SELECT count(*) FROM txt")[0])
    # (table, tuple) -> text id as one flat array: index = first tuple id of the table + tuple id
    n_tup = {o: int(q(f"SELECT coalesce(max(tuple_id) + 1, 0) FROM tup_{o}")[0]) for o, *_ in done}
    base = np.zeros(len(tables) + 1, dtype=np.int64)
    for o, *_ in done:
        base[o + 1] = n_tup[o]
    base = np.cumsum(base)
    lut = np.full(int(base[-1]), -1, dtype=np.int32)
    for o, *_ in done:
        m = con.execute(f"SELECT u.tuple_id, t.text_id FROM tup_{o} u JOIN txt t USING (text)").fetchnumpy()
        lut[base[o] + m["tuple_id"].astype(np.int64)] = m["text_id"]
    for o, *_ in done:
        con.execute(f"DROP TABLE tup_{o}")
    con.execute("DROP TABLE txt")
    con.execute("DROP TABLE kept_tup")
    t_text = time.perf_counter()
    # kept.parquet is sorted by (pair_idx, position): stream it in order, look the text ids, pair keys and table
    # names up by index (Arrow batches, no per-event Python) and write events.parquet in the same order
    pk = con.execute("SELECT pair_idx, any_value(pair_key) AS pair_key FROM win GROUP BY pair_idx ORDER BY pair_idx").fetchnumpy()
    if len(pk["pair_idx"]) and not np.array_equal(pk["pair_idx"], np.arange(len(pk["pair_idx"]))):
        raise AssertionError("pair_idx is not dense")  # dense_rank - 1 by construction
    keys = pa.array(pk["pair_key"].tolist(), pa.string())
    names = pa.array(list(tables), pa.string())
    schema = pa.schema([("pair_key", pa.string()), ("position", pa.int32()), ("text_id", pa.int32()),
                        ("hours", pa.float32()), ("table", pa.string())])
    with pq.ParquetWriter(out / "events.parquet", schema) as w:
        for b in pq.ParquetFile(kept).iter_batches(batch_size=1 << 20, columns=["pair_idx", "position", "table_ord",
                                                                                  "tuple_id", "hours"]):
            t_ord = b.column(2).to_numpy().astype(np.int64)
            text_id = lut[base[t_ord] + b.column(3).to_numpy().astype(np.int64)]
            if text_id.size and text_id.min() < 0:
                raise AssertionError("a kept event has no text id")
            w.write_table(pa.table([keys.take(b.column(0)), b.column(1), pa.array(text_id, pa.int32()), b.column(4),
                                    names.take(pa.array(t_ord))], schema=schema))
    con.execute(f"""COPY (SELECT p.pair_key, CAST(n AS INTEGER) AS n_events FROM
        (SELECT pair_idx, count(*) AS n FROM {kept_rel} GROUP BY pair_idx) k
        JOIN (SELECT DISTINCT pair_idx, pair_key FROM win) p USING (pair_idx) ORDER BY pair_idx)
        TO {sql_literal((out / 'event_pairs.parquet').as_posix())} (FORMAT parquet)""")
    n_pairs_with = int(q(f"SELECT count(DISTINCT pair_idx) FROM {kept_rel}")[0])
    t_end = time.perf_counter()
    con.close()
    shutil.rmtree(work, ignore_errors=True)
    add("all", "dropped: pairs with no events", int(len(set(pairs["pair_key"])) - n_pairs_with))
    add("all", "pairs kept", int(n_pairs_with))
    add("all", "events kept", int(n_kept))
    add("all", "unique event texts", int(n_texts))
    add("all", "seconds: distinct value tuples", round(t_tup - t0, 3))
    add("all", "seconds: window join + most recent per pair", round(t_kept - t_tup, 3))
    add("all", "seconds: unique texts", round(t_text - t_kept, 3))
    add("all", "seconds: write events", round(t_end - t_text, 3))
    pd.DataFrame(report, columns=["table", "what", "n"]).to_csv(out / "event_report.csv", index=False)
    (out / "event_meta.json").write_text(json.dumps({"text_style": text_style, "tables": list(tables),
                                                     "max_events": int(max_events), "window_end": window_end,
                                                     "drug_matching": drug_matching,
                                                     "budget_last": list(budget_last or ())}))
    return out


def extract_events(mimic_iv_dir: str | Path, pairs: pd.DataFrame, *, max_events: int = MAX_EVENTS,
                   text_style: str = "plain", filter_inputevents: bool = True, drug_matching: str = "casefold",
                   window_end: str = "exclusive",
                   tables: tuple[str, ...] = EVENT_TABLES, memory_limit: str | None = None,
                   threads: int | None = None, temp_directory: str | Path | None = None,
                   budget_last: tuple[str, ...] = ()) -> EventResult:
    """Events of every pair in ``pairs`` as in-memory frames: :func:`extract_events_to_dir` into a temporary
    folder, read back. At full MIMIC scale call :func:`extract_events_to_dir` and stream the files instead."""
    _check_args(pairs, max_events, text_style)
    with tempfile.TemporaryDirectory(prefix="ehrxdiff-events-") as tmp:
        extract_events_to_dir(mimic_iv_dir, pairs, tmp, max_events=max_events, text_style=text_style,
                              filter_inputevents=filter_inputevents, drug_matching=drug_matching,
                              window_end=window_end, tables=tables, budget_last=budget_last,
                              memory_limit=memory_limit,
                              threads=threads, temp_directory=temp_directory)
        res = EventResult.read(tmp)
    res.root = None
    return res


PAIR_INPUT_COLUMNS = ("pair_key", "subject_id", "hadm_id", "prev_time", "target_time")


def main(argv: list[str] | None = None) -> int:
    """``python -m ehrxdiff.data.events``: S_event of a cohort from the shell, as notebook 02 extracts it - the
    companion of ``python -m ehrxdiff.data.cohort`` (its ``pairs.parquet`` is the input), with the same error
    handling: a problem with an input file is one line naming it, exit status 2."""

    ap = argparse.ArgumentParser(prog="python -m ehrxdiff.data.events", description=" ".join(main.__doc__.split()))
    ap.add_argument("--mimic-iv", required=True, help="MIMIC-IV v2.2 root (holds hosp/ and icu/)")
    ap.add_argument("--cohort", required=True, help="pairs.parquet of python -m ehrxdiff.data.cohort (or its --out folder)")
    ap.add_argument("--out", required=True, help="output folder: events.parquet, event_texts.parquet, event_report.csv")
    ap.add_argument("--max-events", type=int, default=MAX_EVENTS, help=f"most recent events per pair (default {MAX_EVENTS})")
    ap.add_argument("--text-style", choices=sorted(TEXT_STYLES), default="plain")
    ap.add_argument("--no-filter-inputevents", action="store_true", help="keep every inputevents item (the released code)")
    ap.add_argument("--window-end", choices=WINDOW_END, default="exclusive",
                    help="events strictly before the target film (default) or up to and at its time (the reference)")
    ap.add_argument("--drug-matching", choices=DRUG_MATCHING, default="casefold",
                    help="prescription names: trimmed and case-folded (default) or the reference's exact match")
    ap.add_argument("--memory-limit", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    path = Path(a.cohort)
    path = path / "pairs.parquet" if path.is_dir() else path
    try:
        if not path.is_file():
            raise MissingTableError(f"{path}: no such file (the cohort's pairs.parquet: python -m ehrxdiff.data.cohort --out DIR)")
        pairs = pd.read_parquet(path)
        missing = [c for c in PAIR_INPUT_COLUMNS if c not in pairs.columns]
        if missing:
            raise SchemaError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, pairs.columns))})")
        out = extract_events_to_dir(a.mimic_iv, pairs, a.out, max_events=a.max_events, text_style=a.text_style,
                                    filter_inputevents=not a.no_filter_inputevents, drug_matching=a.drug_matching,
                                    window_end=a.window_end,
                                    memory_limit=a.memory_limit,
                                    threads=a.threads)
    except (SchemaError, MissingTableError, ValueError, OSError, duckdb.Error) as exc:
        print(f"error: {exc}")
        return 2
    report = pd.read_csv(out / "event_report.csv")
    print(report.to_string(index=False))
    n = pd.read_parquet(out / "event_pairs.parquet")
    print(f"wrote {out / 'events.parquet'}: {int(n['n_events'].sum()):,} events of {len(n):,} pair(s) "
          f"({len(pairs) - len(n):,} of {len(pairs):,} pairs have no event)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
