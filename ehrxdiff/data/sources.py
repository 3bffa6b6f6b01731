"""Locate the MIMIC release files and open them in DuckDB, with one clear error per bad input.

Why DuckDB: the reference pipeline needs PySpark + Java to get through 314 M chartevents rows
(paper-reference §2); DuckDB streams a gzip'd CSV with projection and semi-join push-down in one
process, within a memory limit, and spills to disk when it must.

Conventions (mimic-schemas §1.1, §6):
- a table is ``<root>/<module>/<table>.csv.gz`` or the gunzipped ``.csv`` (EHRXQA gunzips first);
- headers are lower-cased on read (v2.2 ``procedureevents`` has ``ORIGINALAMOUNT``/``ORIGINALRATE``
  in upper case; MIMIC-CXR metadata has ``StudyDate``/``ViewPosition``), so code reads by lower-case name;
- every column is read as VARCHAR (all-varchar-safe: a stray value never aborts a 30-minute scan) and
  cast in SQL with ``TRY_CAST``; the callers count what fails to cast instead of guessing;
- timestamps parse with ``TRY_CAST(... AS TIMESTAMP)``, which accepts fractional seconds
  (``2142-08-03 21:06:00.090``) and bare dates.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd

log = logging.getLogger(__name__)

__all__ = [
    "SchemaError", "MissingTableError", "InputFileError", "reading", "table_path", "read_header", "validate_columns",
    "csv_relation_sql", "register_table", "connect", "sql_literal", "ID_SQL", "OFFSET_SQL", "ID_PATTERN",
    "OFFSET_PATTERN", "materialize",
]


class SchemaError(ValueError):
    """A required column is absent (or the header cannot be read). The message names file and column."""


class MissingTableError(FileNotFoundError):
    """A required release file is absent. The message names every path that was tried."""


class InputFileError(ValueError):
    """An input file that cannot be read as what it claims to be (a truncated gzip, a row with too many or too
    few fields, text that is not UTF-8, conflicting duplicate keys, times with a UTC offset). The message names
    the file and, where the reader says, the line and the column; the library's exception is chained."""


def _short(exc: BaseException) -> str:
    """The reader's message without its advice and settings dump: the first paragraph, one line."""
    text = str(exc).strip()
    para = text.split("\n\n", 1)[0]
    lines = [ln.strip() for ln in para.splitlines()
             if ln.strip() and not ln.strip().startswith(("Possible", "* ", "file ="))]
    msg = "; ".join(lines)
    for prefix in ("Invalid Input Error: ", "IO Error: ", "Conversion Error: "):
        msg = msg.replace(prefix, "")
    return msg[:400]


@contextmanager
def reading(path: str | Path, what: str = "reading"):
    """Re-raise what DuckDB, pandas, PyArrow, gzip or the codec raise while ``path`` is read as
    :class:`InputFileError` naming the file (issue 15: no library traceback reaches the user)."""
    try:
        yield
    except (SchemaError, MissingTableError, InputFileError):
        raise
    except (duckdb.Error, UnicodeDecodeError, EOFError, zlib.error, gzip.BadGzipFile, pd.errors.ParserError,
            pd.errors.EmptyDataError) as exc:
        kind = {UnicodeDecodeError: "is not UTF-8 text"}.get(type(exc))
        detail = f"{kind} ({exc.reason} at byte {exc.start})" if kind else _short(exc)
        raise InputFileError(f"{path}: {what} failed: {detail}") from exc
    except Exception as exc:  # pyarrow's ArrowInvalid and friends, without importing pyarrow here
        if type(exc).__module__.startswith("pyarrow"):
            raise InputFileError(f"{path}: {what} failed: {_short(exc)}") from exc
        raise


# an id column read as text: digits, optionally written as a float with a zero fraction ("10412715.0", as a
# spreadsheet or pandas writes them); anything else ("NaN", "10412715.5", "abc") is NULL, and callers count it.
# (A plain TRY_CAST would round "10412715.5" to 10412716 and silently link the wrong patient.)
ID_PATTERN = r"[0-9]+(\.0*)?"        # the whole (trimmed) value; the own-cohort path applies the same rule
ID_SQL = (f"CASE WHEN regexp_full_match(trim({{x}}), '{ID_PATTERN}') "
          "THEN TRY_CAST(split_part(trim({x}), '.', 1) AS BIGINT) END")
# a time written with a UTC offset ("2150-01-01 10:00:00+02:00", "...Z"): TRY_CAST(... AS TIMESTAMP) drops the
# offset silently, so such values are found and refused (MIMIC times are local times without one)
OFFSET_PATTERN = r"[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]*)?)?\s*(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)$"  # a time, then Z or ±hh[:mm]
OFFSET_SQL = "(length({x}) > 19 AND regexp_matches(trim({x}), '" + OFFSET_PATTERN.replace("{", "{{").replace("}", "}}") + "'))"


def materialize(con: duckdb.DuckDBPyConnection, name: str, view: str, path: str | Path) -> None:
    """Read view ``view`` of file ``path`` into temp table ``name`` once, so a bad file fails here, named."""
    with reading(path):
        con.execute(f'CREATE OR REPLACE TEMP TABLE "{name}" AS SELECT * FROM "{view}"')


def table_path(root: str | Path, stem: str) -> Path:
    """``root/stem.csv.gz`` if it exists, else ``root/stem.csv``; otherwise :class:`MissingTableError`.

    ``stem`` is release-relative, e.g. ``"hosp/labevents"`` under the MIMIC-IV root, or
    ``"mimic-cxr-2.0.0-metadata"`` under the MIMIC-CXR-JPG root.
    """
    root = Path(root)
    tried = [root / f"{stem}.csv.gz", root / f"{stem}.csv"]
    for p in tried:
        if p.is_file():
            return p
    raise MissingTableError(f"missing file: {tried[0]} (also tried {tried[1].name})")


def read_header(path: str | Path) -> list[str]:
    """The CSV's header, lower-cased and stripped, in file order."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            line = fh.readline()
    except (OSError, EOFError) as exc:
        raise SchemaError(f"{path}: cannot read the header ({exc})") from exc
    text = line.decode("utf-8-sig", errors="replace")
    if not text.strip():
        raise SchemaError(f"{path}: empty file, no header row")
    row = next(csv.reader(io.StringIO(text)))
    return [c.strip().lower() for c in row]


def _release_columns(schema_key: str | None) -> tuple[str, ...] | None:
    if schema_key is None:
        return None
    try:  # the lead's single source of truth for release headers
        from ehrxdiff.data.schemas import COLUMNS
    except ImportError:  # pragma: no cover - schemas.py is part of the package
        return None
    cols = COLUMNS.get(schema_key)
    return tuple(c.lower() for c in cols) if cols else None


def validate_columns(path: str | Path, header: list[str], required, schema_key: str | None = None) -> None:
    """Raise :class:`SchemaError` naming the file and the first missing required column.

    When ``schema_key`` names a release file in :data:`ehrxdiff.data.schemas.COLUMNS`, columns that differ
    from the release's list are logged (not fatal: extraction reads by name; a v3.x file loads too).
    """
    present = set(header)
    for col in required:
        if col.lower() not in present:
            raise SchemaError(f"{path}: missing column '{col}' (header has: {', '.join(header)})")
    release = _release_columns(schema_key)
    if release is not None and tuple(header) != release:
        extra = [c for c in header if c not in release]
        absent = [c for c in release if c not in present]
        if extra or absent:
            log.warning("%s: header differs from %s (extra %s, absent %s)", path, schema_key, extra, absent)


def sql_literal(value: str) -> str:
    """A single-quoted SQL string literal (paths and fixed identifiers only, never user data)."""
    return "'" + str(value).replace("'", "''") + "'"


def csv_relation_sql(path: str | Path, header: list[str]) -> str:
    """A ``read_csv(...)`` expression reading every column as VARCHAR under its lower-cased name.

    Empty fields are NULL (MIMIC's NULL convention, mimic-schemas §1.1). Projection push-down means
    only the columns a query uses are materialised.
    """
    if len(set(header)) != len(header):
        dup = sorted({c for c in header if header.count(c) > 1})
        raise SchemaError(f"{path}: duplicate column(s) after lower-casing: {', '.join(dup)}")
    columns = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in header) + "}"
    return (
        f"read_csv({sql_literal(Path(path).as_posix())}, header=true, columns={columns}, "
        f"delim=',', quote='\"', escape='\"', auto_detect=false)"
    )


def register_table(con: duckdb.DuckDBPyConnection, name: str, root: str | Path, stem: str,
                   required, schema_key: str | None = None) -> tuple[Path, list[str]]:
    """Locate ``stem`` under ``root``, validate ``required`` columns, create view ``name`` over it.

    Returns (path, lower-cased header). The view is lazy: nothing is read until a query runs.
    """
    path = table_path(root, stem)
    header = read_header(path)
    validate_columns(path, header, required, schema_key)
    con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT * FROM {csv_relation_sql(path, header)}')
    return path, header


def connect(*, memory_limit: str | None = None, threads: int | None = None,
            temp_directory: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with an optional memory cap, thread count and spill folder.

    ``memory_limit`` is DuckDB syntax (``"2GB"``); DuckDB spills sorts/joins beyond it to
    ``temp_directory`` (a fresh temporary folder when not given).
    """
    config: dict[str, str | int] = {}
    if memory_limit:
        config["memory_limit"] = str(memory_limit)
    if threads:
        config["threads"] = int(threads)
    con = duckdb.connect(config=config)
    # one spill folder per process (DuckDB creates it only when it spills), never the repo's cwd
    spill = Path(temp_directory) if temp_directory else Path(tempfile.gettempdir()) / f"ehrxdiff-duckdb-{os.getpid()}"
    con.execute(f"SET temp_directory = {sql_literal(spill.as_posix())}")
    con.execute("SET preserve_insertion_order = true")  # file order = the events' stable tie-break
    con.execute("SET enable_progress_bar = false")
    return con
