"""The evaluate stage: student and teacher on a labelled test set (stage.py); its config section
`evaluate` (config.py)."""
