"""The student file: one self-describing torch file that load_student rebuilds without the config."""

import sys
import types

import pytest
import torch

from pipeline.errors import UserError
from stages.common import teacher as teacher_module
from stages.common.student import Student, load_student, save_student


def small_student():
    torch.manual_seed(0)
    return Student("resnet8", "webdistill", {}, 10, 1, None, False, 28)


def test_a_student_file_round_trips_bit_identically(tmp_path):
    student = small_student()
    path = tmp_path / "student.pt"
    transform = teacher_module.ImageTransform(28, 1, [0.1], [0.3])
    path.write_bytes(save_student(student, {"input_size": 28, "transform": transform}))
    loaded, meta = load_student(path)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), loaded.state_dict().values()))
    assert isinstance(meta["transform"], teacher_module.ImageTransform)
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot be read"):
        load_student(path)


def test_a_student_file_written_before_the_shared_modules_moved_still_loads(tmp_path, monkeypatch):
    # the transform's class as it was pickled when it lived in pipeline/teacher.py
    old_module = types.ModuleType("pipeline.teacher")
    old_class = type("ImageTransform", (teacher_module.ImageTransform,), {"__module__": "pipeline.teacher"})
    old_module.ImageTransform = old_class
    monkeypatch.setitem(sys.modules, "pipeline.teacher", old_module)
    path = tmp_path / "student.pt"
    path.write_bytes(save_student(small_student(), {"input_size": 28, "transform": old_class(28, 1, [0.1], [0.3])}))
    monkeypatch.delitem(sys.modules, "pipeline.teacher")
    with pytest.raises(ModuleNotFoundError):  # what a plain torch.load of such a file does now
        torch.load(path, weights_only=False)
    _, meta = load_student(path)
    assert type(meta["transform"]) is teacher_module.ImageTransform
