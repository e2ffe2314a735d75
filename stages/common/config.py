"""The teacher section: read by every stage that loads the teacher (score, distill, evaluate)."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class TeacherConfig:
    """The teacher: a classifier trained on the private data, loaded from local files only."""

    spec_file: str | None = opt(
        None, "YAML file holding the keys of this section (`make teacher` writes the demo's); keys set here "
        "override it, and relative paths in it are relative to its folder", path=True)
    format: str = opt("webdistill", "how the teacher is stored: an architecture of webdistill's registry, timm or "
                      "torchvision + a state_dict; 'entrypoint': arch is module:function returning the model, + a "
                      "state_dict; 'torchscript': a TorchScript file; 'open_clip': a zero-shot CLIP classifier",
                      choices=("webdistill", "timm", "torchvision", "entrypoint", "torchscript", "open_clip"))
    arch: str | None = opt(None, "architecture name in the format's library (e.g. convnet5, resnet18, ViT-B-32), "
                           "or for format entrypoint module:function (the module looked up on sys.path, beside spec_file, then in the "
                           "working directory) or path/to/file.py:function; unused for torchscript")
    arch_kwargs: dict = opt({}, "keyword arguments of the architecture or entry point (e.g. width: 64)")
    checkpoint: str | None = opt(None, "local weights file: a state_dict (.pt, .pth, .safetensors), the TorchScript "
                                 "file, or the open_clip checkpoint", path=True)
    sha256: str | None = opt(None, "expected sha256 of the checkpoint, checked at load (null: not checked)")
    class_names: list | str | None = opt(None, "class names in logit order, or a text file with one per line (required)")
    input_size: int | None = opt(None, "side of the square input in pixels; null: the architecture's own "
                                 "(timm, open_clip), required otherwise", valid="> 0")
    channels: int = opt(3, "input channels: 1 (grey) or 3 (RGB)", choices=(1, 3))
    mean: list | None = opt(None, "per-channel normalisation mean on the 0–1 scale; null: the architecture's own, "
                            "else ImageNet's")
    std: list | None = opt(None, "per-channel normalisation std; null: as for mean")
    feature_layer: str = opt("auto", "module whose output (flattened) is the penultimate feature vector; auto: the "
                             "input of the last Linear layer. torchscript: a method the script exports (auto: "
                             "forward_features), unless forward returns (logits, features)")
    accuracy: float | None = opt(None, "the teacher's top-1 on its owner's held-out data, as the owner reports it "
                                 "(`make teacher` writes the demo's); DFND's noise adaptation takes it as the diagonal "
                                 "of its transition matrix Q; null: unknown", valid="(0, 1]")
    prompt_template: str = opt("a photo of a {}.", "prompt of each class name ({}) for an open_clip zero-shot teacher "
                               "and for the filter's clip_text reference")
