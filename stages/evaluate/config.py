"""Config section of the evaluate stage."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class EvaluateConfig:
    """The evaluate stage: student and teacher on a labelled test set."""

    test_set: str | None = opt(None, "labelled test images: WebDataset shards with .cls labels (brace pattern or "
                               "glob) or a folder with one subfolder per class name", path=True)
    val_set: str | None = opt(None, "labelled validation images, same formats as test_set, for choosing settings: "
                              "the student's top-1 on them is recorded beside the test top-1 (webdistill bench "
                              "chooses on it, never on the test set)", path=True)
    batch_size: int = opt(256, "images per forward pass", valid="> 0")
    ece_bins: int = opt(15, "confidence bins of the expected calibration error", valid="> 0")
    device: str = opt("auto", "auto: CUDA when available, else CPU")
