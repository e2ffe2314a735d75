"""Architectures by name, for teachers and students alike (as timm's registry resolves them).

``create_model(name, library, num_classes, in_chans)`` builds an untrained network from
webdistill's own registry (small CIFAR-style ResNets for 28–32 px images), timm, or torchvision.
Weights always come from local files (``stages.common.teacher``); nothing is ever downloaded.
Every webdistill model ends in ``global_pool`` → a linear classifier (``fc``; ``linear`` in
the CIFAR ResNet-18/34): the classifier's input is the penultimate feature vector.
"""

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import UserError

LIBRARIES = ("webdistill", "timm", "torchvision")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes, in_chans, **kwargs) -> nn.Module`` under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, §4.2): 3 stages of basic blocks on 28–32 px images."""

    def __init__(self, blocks: int, widths=(16, 32, 64), num_classes: int = 10, in_chans: int = 3,
                 stem_stride: int = 1):
        super().__init__()
        # stem_stride 2 halves the side the blocks work at: 4× fewer operations on inputs above 32 px
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        return self.global_pool(self.layers(self.stem(x)))

    def forward(self, x):
        return self.fc(self.forward_features(x))


class ConvNet(nn.Module):
    """A VGG-style CNN: conv-BN-ReLU ×5 with two max-pools; the demo teacher (98.8% on the demo's MNIST)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32):
        super().__init__()

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*conv(in_chans, w), *conv(w, w), nn.MaxPool2d(2),
                                      *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2), *conv(2 * w, 4 * w))
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 4 * w
        self.fc = nn.Linear(4 * w, num_classes)

    def forward_features(self, x):
        return self.global_pool(self.features(x))

    def forward(self, x):
        return self.fc(self.forward_features(x))


@register_model
def convnet5(num_classes: int = 10, in_chans: int = 3, width: int = 32) -> nn.Module:
    return ConvNet(num_classes, in_chans, width)


class CifarResNet(nn.Module):
    """ResNet-18/34 for 32 px images (3×3 stem, no max-pool, widths 64–512): the teacher/student
    pair of DFND, KD³ and CMI. Module names follow DAFL's ``resnet.py`` (conv1, bn1, layer1–4,
    linear), so the CIFAR checkpoints those projects publish load with ``format: webdistill``."""

    def __init__(self, blocks: tuple, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layer = []
            for j in range(n):
                layer.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c_in
        self.linear = nn.Linear(c_in, num_classes)

    def forward_features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.global_pool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def forward(self, x):
        return self.linear(self.forward_features(x))


@register_model
def cifar_resnet18(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes, in_chans)


@register_model
def cifar_resnet34(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet((3, 4, 6, 3), num_classes, in_chans)


def _resnet(depth: int, widths):
    def build(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, stem_stride: int = 1) -> nn.Module:
        return SmallResNet((depth - 2) // 6, tuple(int(w * width_mult) for w in widths), num_classes, in_chans,
                           stem_stride)

    return build


# depth = 6·blocks + 2, as in the CIFAR ResNets; the "_w" variants are twice as wide
for _depth in (8, 14, 20, 32, 56):
    _REGISTRY[f"resnet{_depth}"] = _resnet(_depth, (16, 32, 64))
    _REGISTRY[f"resnet{_depth}_w"] = _resnet(_depth, (32, 64, 128))


def create_model(name: str, library: str = "webdistill", num_classes: int = 10, in_chans: int = 3,
                 **kwargs) -> nn.Module:
    """An untrained network ``name`` from ``library`` (webdistill, timm or torchvision)."""
    if library == "webdistill":
        if name not in _REGISTRY:
            raise UserError(f"unknown webdistill model {name!r}; registered: {', '.join(list_models())}")
        return _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if library == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise UserError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
        if in_chans != 3:
            raise UserError(f"torchvision model {name} takes 3-channel images; set channels: 3")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise UserError(f"unknown model library {library!r}; one of {', '.join(LIBRARIES)}")
