"""The crawl stage: a URL list (or a folder of images) → WebDataset shards with img2dataset (stage.py),
its config sections `data` and `crawl` (config.py), the loopback server for local folders (webserver.py)."""
