"""Data: raw MIMIC-shaped files (or an own cohort) → cohort → S_event, the first boxes of the paper's Fig. 1.

``sources`` reads the tables through DuckDB (bad files are errors naming the file and column) · ``schemas`` the
files and columns · ``cohort`` the (I_prev, I_trg) pairs and their split (§II-B, Table I) · ``own_cohort`` the same
for a cohort in our own format · ``events`` S_event, the serialized events between two films (§II-B) ·
``embedding`` event text → vectors · ``event_store`` the compact store of every pair's events · ``images`` ·
``labels`` Chest ImaGenome findings · ``datasets`` the PyTorch datasets of pairs · ``wnull`` the §II-D null samples.
"""
