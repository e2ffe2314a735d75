"""The student file: one self-describing torch file that load_student rebuilds without the config."""

import pytest
import torch

from pipeline.errors import UserError
from stages.common import teacher as teacher_module
from stages.common.student import Student, load_student, save_student
from tests.conftest import Planted


def small_student():
    torch.manual_seed(0)
    return Student("resnet8", "webdistill", {}, 10, 1, None, False, 28)


def test_a_student_file_round_trips_bit_identically(tmp_path):
    student = small_student()
    path = tmp_path / "student.pt"
    transform = teacher_module.ImageTransform(28, 1, [0.1], [0.3])
    path.write_bytes(save_student(student, {"input_size": 28, "transform": transform.spec}))
    loaded, meta = load_student(path)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), loaded.state_dict().values()))
    rebuilt = teacher_module.ImageTransform(**meta["transform"])  # plain data that rebuilds the transform
    assert (rebuilt.scale == transform.scale).all() and (rebuilt.shift == transform.shift).all()
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot be read"):
        load_student(path)


def test_a_student_file_is_data_a_planted_pickle_runs_no_code(tmp_path):
    path, marker = tmp_path / "student.pt", tmp_path / "code_ran"
    path.write_bytes(save_student(small_student(), {"input_size": 28, "hostile": Planted(marker)}))
    with pytest.raises(UserError, match="cannot be read as weights-only torch data"):
        load_student(path)
    assert not marker.exists()


def test_a_stem_stride_halves_the_side_the_blocks_work_at():
    from stages.common.models import create_model

    seen = {}
    plain, strided = (create_model("resnet8", num_classes=3, in_chans=1, stem_stride=s) for s in (1, 2))
    for name, net in (("plain", plain), ("strided", strided)):
        net.layers[0].register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.shape[-1]}))
        assert net(torch.zeros(2, 1, 96, 96)).shape == (2, 3)
    assert seen == {"plain": 96, "strided": 48}
