"""Reporting: Tables I–IV and every figure, written from tidy CSVs to ``figures/`` as CSV/Markdown/LaTeX and PNG/PDF.

``tables`` · ``figures`` (the one figures module) · ``results_digest`` the results block of ``docs/results.md`` ·
``provenance`` the run's environment next to its tables, and comparing two runs' tables.
"""
