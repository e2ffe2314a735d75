"""The score stage: the teacher (and an optional open_clip embedder) over every crawled image (stage.py);
its config section `score` (config.py)."""
