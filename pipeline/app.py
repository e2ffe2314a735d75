"""What webdistill is made of: its stages (``stages.STAGES``, in order) and the root config,
assembled from the sections the stages declare beside their code plus the demo's and the
benchmark's. The only module of ``pipeline`` that names the application's parts."""

from bench.config import BenchConfig
from demo.config import DemoConfig
from pipeline.config import root_config
from stages import STAGE_NAMES, STAGES

SECTIONS = {name: cls for spec in STAGES for name, cls in spec.sections.items()} | {
    "demo": DemoConfig, "bench": BenchConfig}
Config = root_config(SECTIONS)

__all__ = ["STAGES", "STAGE_NAMES", "SECTIONS", "Config"]
