"""The study's steps, one module per notebook pair: validated config in, files under ``run_dir`` out.

``layout`` every path under ``run_dir`` (its one owner) · ``shared`` seeding and the figures folder · ``prepare``
notebooks 01–02 · ``models`` 03–04 · ``evaluation`` 05–06 · ``simulation`` 07. Notebooks call these and plot.
"""
