"""webdistill orchestration: config, run directory, stage runner and CLI.

The stages themselves live in ``stages/`` and the contracts between them in ``manifests/``.
"""

import os

__version__ = "0.1.0"

# Nothing is downloaded at run time: no model hub look-ups, no update checks on import.
for _var in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
