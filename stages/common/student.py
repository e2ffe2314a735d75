"""The student network: an architecture from the shared registry, with its classifier.

``Student(x)`` returns ``(logits, features)`` like a loaded teacher. With ``classifier: shared``
(KD³'s knowledge memorisation) the logits come from the teacher's frozen classifier applied to
the projected student features; the projector and that head are part of the student and are
saved with it. ``save_student`` writes one self-describing file that ``load_student`` rebuilds
without the config that trained it.
"""

import io
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from stages.common.models import create_model
from stages.common.teacher import FeatureTap

FORMAT = "webdistill-student/1"


class Student(nn.Module):
    def __init__(self, arch: str, library: str, arch_kwargs: dict, num_classes: int, in_chans: int,
                 teacher_dim: int | None = None, shared_head: bool = False, input_size: int = 32):
        super().__init__()
        self.spec = {"arch": arch, "library": library, "arch_kwargs": dict(arch_kwargs), "num_classes": num_classes,
                     "in_chans": in_chans, "teacher_dim": teacher_dim, "shared_head": shared_head}
        self.net = FeatureTap(create_model(arch, library, num_classes=num_classes, in_chans=in_chans, **arch_kwargs),
                              "auto", f"student {arch}")
        with torch.no_grad():
            self.feature_dim = self.net(torch.zeros(2, in_chans, input_size, input_size))[1].shape[1]
        # h: student features -> teacher feature space (feature alignment, shared head, contrastive)
        self.projector = nn.Linear(self.feature_dim, teacher_dim) if teacher_dim else None
        self.shared = None
        if shared_head:
            if not teacher_dim:
                raise UserError("distill.classifier shared needs the teacher's feature size")
            self.shared = nn.Linear(teacher_dim, num_classes)
            self.shared.requires_grad_(False)

    def set_shared_head(self, weight, bias) -> None:
        """Copy the teacher's classifier into the frozen shared head."""
        with torch.no_grad():
            self.shared.weight.copy_(torch.as_tensor(weight))
            self.shared.bias.copy_(torch.as_tensor(bias) if bias is not None else torch.zeros(len(weight)))

    def forward(self, x):
        logits, features = self.net(x)
        if self.shared is not None:
            logits = self.shared(self.projector(features))
        return logits, features


def save_student(student: Student, extra: dict) -> bytes:
    """The student as the bytes of a torch file: spec, weights and ``extra`` (input spec, class names)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "spec": student.spec, "state_dict": student.state_dict(), **extra}, buffer)
    return buffer.getvalue()


def load_student(path: Path, device: torch.device | str = "cpu") -> tuple[Student, dict]:
    """(student in eval mode, the file's metadata) from a file ``save_student`` wrote."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"student file {path} not found: run the distill stage first")
    try:  # a file is data: weights_only runs no pickled code
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated, not a torch file, or pickled objects (an older webdistill)
        raise UserError(f"student file {path} cannot be read as weights-only torch data "
                        f"({str(e).splitlines()[0][:200]}): re-run distill with --force") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{path} is not a webdistill student file (format {FORMAT})")
    spec = blob["spec"]
    student = Student(**spec, input_size=blob.get("input_size", 32))
    student.load_state_dict(blob["state_dict"])
    return student.to(device).eval(), blob
