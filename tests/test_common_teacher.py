"""Every teacher format loads from local files, and every mismatch gets one clear message."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from pipeline.config import load_config
from pipeline.errors import UserError
from stages.common.config import TeacherConfig
from stages.common.models import create_model, list_models
from stages.common.teacher import load_teacher

NAMES10 = [f"c{i}" for i in range(10)]


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def spec(**kw) -> TeacherConfig:
    return TeacherConfig(**{"class_names": NAMES10, "input_size": 32, "channels": 3, **kw})


def check_forward(teacher, reference: nn.Module | None = None):
    """The teacher's logits are the reference model's, and it yields penultimate features."""
    x = torch.randn(4, teacher.channels, teacher.input_size, teacher.input_size)
    with torch.no_grad():
        logits, features = teacher.model(x)
        if reference is not None:
            torch.testing.assert_close(logits, reference.eval()(x))
    assert logits.shape == (4, teacher.num_classes)
    assert features.shape == (4, teacher.feature_dim)
    return x, logits, features


def test_registry_lists_the_demo_architectures():
    assert {"convnet5", "resnet8", "resnet20", "resnet56_w"} <= set(list_models())
    with pytest.raises(UserError, match="unknown webdistill model 'resnet9'"):
        create_model("resnet9")


def test_webdistill_arch_and_state_dict(tmp_path):
    net = create_model("resnet8", num_classes=10, in_chans=3)
    teacher = load_teacher(spec(arch="resnet8", checkpoint=save(net.state_dict(), tmp_path / "t.pt")))
    x, logits, features = check_forward(teacher, net)
    # features are the classifier's input: the classifier applied to them gives the logits back
    weight, bias = teacher.classifier
    torch.testing.assert_close(features @ torch.tensor(weight).T + torch.tensor(bias), logits)
    assert teacher.feature_dim == 64


def test_checkpoint_containers_are_unwrapped(tmp_path):
    net = create_model("resnet8", num_classes=10)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    teacher = load_teacher(spec(arch="resnet8", checkpoint=save(wrapped, tmp_path / "ddp.pt")))
    check_forward(teacher, net)


def test_timm_arch(tmp_path):
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    teacher = load_teacher(spec(format="timm", arch="resnet10t", checkpoint=save(net.state_dict(), tmp_path / "t.pt")))
    check_forward(teacher, net)
    assert teacher.feature_dim == net.num_features


def test_timm_input_size_defaults_to_the_architecture(tmp_path):
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    teacher = load_teacher(spec(format="timm", arch="resnet10t", input_size=None,
                                checkpoint=save(net.state_dict(), tmp_path / "t.pt")))
    assert teacher.input_size == net.pretrained_cfg["input_size"][-1]


def test_torchvision_arch_with_named_feature_layer(tmp_path):
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    teacher = load_teacher(spec(format="torchvision", arch="resnet18", feature_layer="avgpool",
                                checkpoint=save(net.state_dict(), tmp_path / "t.pt")))
    _, _, features = check_forward(teacher, net)
    assert features.shape[1] == 512


def test_entrypoint_and_state_dict(tmp_path):
    import torchvision

    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    teacher = load_teacher(spec(format="entrypoint", arch="torchvision.models:mobilenet_v3_small",
                                arch_kwargs={"num_classes": 10}, checkpoint=save(net.state_dict(), tmp_path / "t.pt")))
    check_forward(teacher, net)


class ScriptableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = create_model("resnet8", num_classes=10)

    def forward(self, x):
        return self.body(x)

    @torch.jit.export
    def forward_features(self, x):
        return self.body.forward_features(x)


def test_torchscript_with_exported_features(tmp_path):
    net = ScriptableNet().eval()
    path = tmp_path / "t.torchscript"
    torch.jit.script(net).save(str(path))
    teacher = load_teacher(spec(format="torchscript", checkpoint=str(path)))
    x, _, features = check_forward(teacher, net)
    torch.testing.assert_close(features, net.forward_features(x))


def test_torchscript_without_features_says_how_to_export_them(tmp_path):
    path = tmp_path / "plain.torchscript"
    torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))).save(str(path))
    with pytest.raises(UserError, match="export `forward_features`"):
        load_teacher(spec(format="torchscript", checkpoint=str(path)))


def test_open_clip_zero_shot(tmp_path):
    import open_clip

    clip = open_clip.create_model("ViT-S-32", pretrained=None)
    path = save(clip.state_dict(), tmp_path / "clip.pt")
    teacher = load_teacher(TeacherConfig(format="open_clip", arch="ViT-S-32", checkpoint=path,
                                         class_names=["cat", "dog", "digit"]))
    assert teacher.input_size == 224 and teacher.channels == 3
    x = teacher.transform(Image.new("RGB", (64, 64), "white")).unsqueeze(0)
    with torch.no_grad():
        logits, features = teacher.model(x)
    assert logits.shape == (1, 3)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(1))
    # zero-shot: logits are the scaled cosine similarity to the class prompts (the prototypes)
    prototypes = torch.tensor(teacher.classifier[0])
    torch.testing.assert_close(logits, clip.logit_scale.exp() * features @ prototypes.T)


def test_open_clip_checkpoint_of_another_model_is_refused(tmp_path):
    import open_clip

    path = save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), tmp_path / "s32.pt")
    with pytest.raises(UserError, match=r"does not match open_clip model ViT-B-32"):
        load_teacher(TeacherConfig(format="open_clip", arch="ViT-B-32", checkpoint=path, class_names=["a", "b"]))


# ---------------------------------------------------------------- mismatches, one message each

@pytest.fixture(scope="module")
def resnet8_file(tmp_path_factory):
    return save(create_model("resnet8", num_classes=10).state_dict(), tmp_path_factory.mktemp("r8") / "resnet8.pt")


@pytest.mark.parametrize("changes, message", [
    ({"arch": "resnet14"}, r"resnet8\.pt does not match webdistill architecture resnet14 .*missing layers\.3\.conv1"),
    ({"class_names": NAMES10[:5]}, r"shape of fc\.weight \(10, 64\) in the file, \(5, 64\) in the model"),
    ({"channels": 1}, r"shape of stem\.0\.weight \(16, 3, 3, 3\) in the file, \(16, 1, 3, 3\) in the model"),
    ({"class_names": None}, r"teacher\.class_names is not set"),
    ({"checkpoint": "/nonexistent/teacher.pt"}, r"teacher checkpoint /nonexistent/teacher\.pt not found"),
    ({"sha256": "0" * 64}, r"sha256 differs"),
    ({"feature_layer": "layers.9"}, r"feature_layer 'layers\.9' is not a module"),
    ({"format": "timm", "arch": "resnet8"}, r"unknown timm model 'resnet8'"),
    ({"format": "entrypoint", "arch": "nosuchmodule:build"}, r"cannot find nosuchmodule .*PYTHONPATH"),
    ({"format": "entrypoint", "arch": "torchvision.models"}, r"needs module:function"),
    ({"format": "torchscript"}, r"is not a TorchScript file"),
])
def test_mismatch_gets_a_clear_message(resnet8_file, changes, message):
    with pytest.raises(UserError, match=message):
        load_teacher(spec(**{"arch": "resnet8", "checkpoint": resnet8_file, **changes}))


def test_unreadable_and_torchscript_checkpoints_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"garbage\.pt cannot be read as a PyTorch state_dict"):
        load_teacher(spec(arch="resnet8", checkpoint=str(garbage)))
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(create_model("resnet8", num_classes=10)).save(str(scripted))
    with pytest.raises(UserError, match="use format: torchscript"):
        load_teacher(spec(arch="resnet8", checkpoint=str(scripted)))


def fixed_size_mlp():
    """A model that only takes 3×32×32 images: the entry point of the next test."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def test_input_size_that_does_not_fit_is_reported(tmp_path):
    path = save(fixed_size_mlp().state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(UserError, match=r"forward pass on 3×28×28 inputs fails"):
        load_teacher(spec(format="entrypoint", arch="tests.test_common_teacher:fixed_size_mlp", checkpoint=path, input_size=28))


def test_spec_file_is_merged_under_the_config_keys(tmp_path, resnet8_file):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(Path(resnet8_file).read_bytes())
    (folder / "classes.txt").write_text("\n".join(NAMES10) + "\n")
    (folder / "spec.yaml").write_text(yaml.safe_dump(
        {"format": "webdistill", "arch": "resnet8", "checkpoint": "weights.pt", "class_names": "classes.txt",
         "input_size": 32, "channels": 3}))
    cfg = load_config(None, [f"teacher.spec_file={folder / 'spec.yaml'}", "teacher.input_size=40"])
    assert cfg.teacher.checkpoint == str(folder / "weights.pt")  # relative to the spec file
    assert cfg.teacher.input_size == 40  # the config's own key wins
    teacher = load_teacher(cfg.teacher)
    assert teacher.class_names == NAMES10 and teacher.input_size == 40


def test_missing_spec_file_says_how_to_make_it():
    cfg = load_config(None, ["teacher.spec_file=demo_data/nowhere/spec.yaml"])
    with pytest.raises(UserError, match=r"spec file \S*demo_data/nowhere/spec\.yaml not found .*make teacher"):
        load_teacher(cfg.teacher)


def test_grey_transform_resizes_and_normalises(tmp_path):
    path = save(create_model("convnet5", num_classes=10, in_chans=1, width=8).state_dict(), tmp_path / "c5.pt")
    teacher = load_teacher(spec(arch="convnet5", arch_kwargs={"width": 8}, checkpoint=path, input_size=28, channels=1,
                                mean=[0.5], std=[0.25]))
    x = teacher.transform(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert x.shape == (1, 28, 28)
    torch.testing.assert_close(x, torch.full((1, 28, 28), 2.0))  # (1 - 0.5) / 0.25


def test_a_pretrained_tag_is_never_downloaded():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by importing pipeline
    with pytest.raises(UserError, match=r"checkpoint laion2b_s34b_b79k not found: .*nothing is downloaded"):
        load_teacher(TeacherConfig(format="open_clip", arch="ViT-B-32", checkpoint="laion2b_s34b_b79k",
                                   class_names=["a", "b"]))


def test_bn_feature_prior_matches_the_moments_of_rectified_bn_outputs():
    """The prior is what the last BatchNorm's output, rectified, has on data it normalises exactly."""
    from stages.common.teacher import bn_feature_prior

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 3))
    bn = net[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.5, 1.0, 0.3]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.7, 0.2, -3.0, 0.0]))
    normalised = torch.randn(400_000, 6)  # what BN sees on its training data, after normalising
    y = torch.relu(normalised * bn.weight.detach() + bn.bias.detach())
    prior = bn_feature_prior(net, 6, rectified=True)
    assert prior["layer"] == "1"
    np.testing.assert_allclose(prior["mean"], y.mean(0).numpy(), atol=5e-3)
    np.testing.assert_allclose(prior["std"], y.std(0).numpy(), atol=5e-3)
    plain = bn_feature_prior(net, 6, rectified=False)
    np.testing.assert_allclose(plain["std"], bn.weight.detach().abs().numpy(), atol=1e-6)
    assert bn_feature_prior(net, 7, rectified=True) is None  # no BatchNorm with one channel per feature


def test_demo_style_teacher_carries_its_bn_prior(tmp_path):
    net = create_model("convnet5", num_classes=10, in_chans=3, width=8)
    teacher = load_teacher(spec(arch="convnet5", arch_kwargs={"width": 8},
                                checkpoint=save(net.state_dict(), tmp_path / "t.pt")))
    assert teacher.feature_prior["layer"].endswith("features.15") and teacher.feature_prior["rectified"]
    assert teacher.feature_prior["mean"].shape == (teacher.feature_dim,)
