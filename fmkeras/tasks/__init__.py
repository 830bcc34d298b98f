"""Tasks: what `python -m fmkeras.train TASK` runs."""
