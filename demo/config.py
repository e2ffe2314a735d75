"""Config section of the embedded demo (`webdistill demo-data`, `webdistill demo-teacher`)."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class DemoConfig:
    """The embedded demo: private MNIST split and a synthetic web pool (``webdistill demo-data``)."""

    scenario: str = opt("digits", "which built-in demo: digits (a private MNIST split, a convnet5 teacher, a web of "
                        "digits, letters, photos and noise) or textile (simulated textile inspection: nominal, local "
                        "and global defects, a MobileNetV3 teacher, a web of fabric-like textures, photos, glyphs "
                        "and noise)", choices=("digits", "textile"))
    dir: str = opt("demo_data", "where the demo data is built", path=True)
    pool_size: int = opt(10000, "images in the web pool (broken entries come on top)", valid="> 0")
    broken_fraction: float = opt(0.02, "share of broken entries in the URL list (404, truncated, non-image, refused)", valid="[0, 1)")
    seed: int = opt(0, "seed of the demo data and of the demo teacher's training")
    teacher_arch: str = opt("convnet5", "webdistill architecture of the demo teacher (`make teacher`)")
    teacher_epochs: int = opt(24, "training epochs of the demo teacher on the private train split", valid=">= 1")
    teacher_min_accuracy: float = opt(0.985, "`make teacher` fails if the teacher's top-1 on the private test split is lower", valid="[0, 1]")
