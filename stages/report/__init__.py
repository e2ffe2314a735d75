"""The report stage: one markdown and self-contained HTML page per run (stage.py)."""
