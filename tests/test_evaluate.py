"""evaluate: the metrics by hand, and the test sets it reads."""

import io

import numpy as np
import pytest

from pipeline.errors import UserError
from stages.evaluate.stage import classification_metrics, expected_calibration_error


def test_metrics_by_hand():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics(logits, labels, 3, bins=10)
    assert m["top1"] == 0.75
    assert m["per_class_recall"][0] == 1.0 and m["per_class_recall"][1] == pytest.approx(2 / 3)
    assert np.isnan(m["per_class_recall"][2]) and m["macro_recall"] == pytest.approx((1 + 2 / 3) / 2)
    # bins: 0.9 (right) → |1 − 0.9|; 0.6 (wrong) → |0 − 0.6|; 0.7 (right) → 0.3; 0.8 (right) → 0.2; each 1/4
    assert expected_calibration_error(np.exp(logits), labels, 10) == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    assert m["confusion"] == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]


def test_evaluate_reads_a_folder_per_class_and_rejects_unlabelled_shards(tmp_path):
    import webdataset as wds
    from PIL import Image

    from stages.evaluate.stage import test_images

    for name in ("cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name / "a.png")
    found = list(test_images(str(tmp_path / "folder"), ["dog", "cat"]))
    assert [label for _, _, label in found] == [1, 0]  # by class name, not folder order
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        sink.write({"__key__": "a", "png": buffer.getvalue()})
    with pytest.raises(UserError, match=r"needs an image\s+and a .cls label"):
        list(test_images(str(tmp_path / "x.tar"), ["dog", "cat"]))
