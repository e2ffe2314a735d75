"""What trains in distill: the student and the small modules some losses add.

``DistillModel`` holds them all so that one DDP wrapper synchronises every gradient: the student
(with KD³'s projector and shared head), IE-KD's two factor encoders, DFND's transition logits θ,
IPWD's two propensity heads, KD³'s contrastive projection head, IE-DML's peer student.
The teacher-feature-map auto-encoder of IE-KD is trained before the student, on the teacher's maps
of the transfer set computed on the fly, and then frozen.
"""

import torch
from torch import nn

from pipeline.errors import UserError
from stages.common.mixing import mix_within_batch
from stages.common.student import Student
from stages.distill import losses


class FeatureMapTap:
    """The feature map a network pools globally (the input of its ``global_pool`` module, as timm and
    webdistill's registry name it, else of its last ``nn.AdaptiveAvgPool2d``): IE-KD's features."""

    def __init__(self, net: nn.Module, where: str):
        modules = dict(net.named_modules())
        pool = next((m for n, m in modules.items() if n.split(".")[-1] == "global_pool"), None) or next(
            (m for m in reversed(list(modules.values())) if isinstance(m, nn.AdaptiveAvgPool2d)), None)
        if pool is None:
            raise UserError(f"{where}: IE-KD needs the feature map before global pooling, and this network has no "
                            "module named global_pool nor an nn.AdaptiveAvgPool2d")
        self.map = None
        self._handle = pool.register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs):
        self.map = inputs[0] if inputs[0].dim() == 4 else None

    def take(self) -> torch.Tensor:
        out, self.map = self.map, None
        if out is None:
            raise RuntimeError("the feature map was not seen in this forward pass")
        return out

    def channels(self, net: nn.Module, in_chans: int, size: int, device="cpu") -> int:
        """Channels of the map: one dry forward pass of ``net`` (in eval mode, its mode restored after)."""
        was_training = net.training
        with torch.no_grad():
            net.eval()(torch.zeros(2, in_chans, size, size, device=device))
        net.train(was_training)
        return self.take().shape[1]

    def remove(self) -> None:
        self._handle.remove()


def coder(c_in: int, c_out: int) -> nn.Sequential:
    """IE-KD's coder (the authors' ``model/auto_encoder.py``): LeakyReLU(0.1), then 3 × (3×3 conv without
    bias, BatchNorm, LeakyReLU(0.1)), channels c_in → c_in → c_out → c_out, He-initialised."""
    layers: list[nn.Module] = [nn.LeakyReLU(0.1)]
    for a, b in ((c_in, c_in), (c_in, c_out), (c_out, c_out)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, (2.0 / (9 * m.out_channels)) ** 0.5)
    return net


class AutoEncoder(nn.Module):
    """IE-KD stage 1: the teacher's feature map → factor (half its channels, as the official 64 → 32) →
    reconstruction."""

    def __init__(self, channels: int):
        super().__init__()
        self.factor_channels = max(1, channels // 2)
        self.encoder = coder(channels, self.factor_channels)
        self.decoder = coder(self.factor_channels, channels)

    def forward(self, x):
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def train_autoencoder(feature_maps, channels: int, epochs: int, seed: int, device) -> tuple[AutoEncoder, list]:
    """Fit the auto-encoder with IE-KD's reconstruction loss and the official optimiser (SGD, lr 0.1,
    Nesterov momentum 0.9, weight decay 5e-4). ``feature_maps(epoch)`` yields the teacher's maps of
    one pass over the transfer set (computed on the fly: nothing the size of the pool is held)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(channels).to(device)
    opt = torch.optim.SGD(ae.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    history = []
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for maps in feature_maps(epoch):
            if len(maps) < 2:  # BatchNorm needs two samples
                continue
            loss = losses.reconstruction_loss(ae(maps)[1], maps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(maps), seen + len(maps)
        history.append(total / max(seen, 1))
    return ae.eval().requires_grad_(False), history


def student_map_channels(student: Student, size: int) -> int:
    """Channels of the student's feature map before global pooling (the tap is removed after: no hook
    stays on the student's forward pass)."""
    tap = FeatureMapTap(student.net.net, "distill.student")
    try:
        return tap.channels(student, student.spec["in_chans"], size)
    finally:
        tap.remove()


class Peer(nn.Module):
    """IE-DML's second network: a student of the same architecture (its own initialisation), the
    auto-encoder of its own feature map (trained online: the partner changes as it learns) and its
    inheritance and exploration coders."""

    def __init__(self, student: Student, channels: int):
        super().__init__()
        self.student = student
        self.feature_map = FeatureMapTap(student.net.net, "distill.student (IE-DML's peer)")
        self.autoencoder = AutoEncoder(channels)
        self.inherit = coder(channels // 2, self.autoencoder.factor_channels)
        self.explore = coder(channels - channels // 2, self.autoencoder.factor_channels)

    def forward(self, x) -> dict:
        logits, _ = self.student(x)
        return {"peer_logits": logits, **factors(self.feature_map.take(), self.autoencoder, self.inherit, self.explore,
                                                  "peer_")}


def factors(fmap: torch.Tensor, autoencoder: AutoEncoder, inherit: nn.Module, explore: nn.Module, prefix: str) -> dict:
    """IE-DML, one network: the factor of its own map (a target for its partner, detached), the
    reconstruction loss of its online auto-encoder, and its inheritance and exploration factors."""
    half = fmap.shape[1] // 2
    factor, rebuilt = autoencoder(fmap.detach())
    return {f"{prefix}factor": factor.detach(),
            f"{prefix}reconstruction": losses.reconstruction_loss(rebuilt, fmap.detach()),
            f"{prefix}inherit": inherit(fmap[:, :half]), f"{prefix}explore": explore(fmap[:, half:])}


class DistillModel(nn.Module):
    def __init__(self, student: Student, num_classes: int, factor_dim: int | None, learn_transition: bool,
                 mix_layer: str | None, mix_alpha: float, propensity_heads: bool = False, contrast_head: bool = False,
                 input_size: int = 32, peer: Student | None = None):
        super().__init__()
        self.student = student
        # IE-DML: a second student learning with this one; both halve their maps into inheritance and
        # exploration factors, each imitating / leaving the other's factor
        self.peer, self.own_autoencoder = None, None
        if peer is not None:
            channels = student_map_channels(student, input_size)
            self.peer = Peer(peer, channels)
            self.own_autoencoder = AutoEncoder(channels)
            factor_dim = self.own_autoencoder.factor_channels
        # KD³'s instance alignment on a projection of its own (SimCLR's 2-layer MLP to 128 dimensions)
        d = student.feature_dim
        self.contrast = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 128)) if contrast_head else None
        # IPWD's two heads: CE on the labels, KD on the teacher (on detached features: they only estimate)
        self.head_cls = nn.Linear(student.feature_dim, num_classes) if propensity_heads else None
        self.head_kd = nn.Linear(student.feature_dim, num_classes) if propensity_heads else None
        # IE-KD: the student's feature map, its channels halved (the official "natural" division), each half
        # encoded to the teacher's factor channels by a coder of its own
        self.feature_map = FeatureMapTap(student.net.net, "distill.student") if factor_dim else None
        if factor_dim:
            channels = student_map_channels(student, input_size)
            self.inherit = coder(channels // 2, factor_dim)
            self.explore = coder(channels - channels // 2, factor_dim)
        else:
            self.inherit = self.explore = None
        self.theta = nn.Parameter(torch.zeros(num_classes, num_classes - 1)) if learn_transition else None
        self.mix_alpha = mix_alpha
        self._mix_from: int | None = None  # rows from this index on are perturbed at mix_layer
        if mix_layer:
            modules = dict(student.net.net.named_modules())
            name = next(iter(dict(student.net.net.named_children()))) if mix_layer == "auto" else mix_layer
            if name not in modules:
                raise UserError(f"distill.mix_layer {mix_layer!r} is not a module of the student; its top-level "
                                f"modules: {', '.join(dict(student.net.net.named_children()))}")
            modules[name].register_forward_hook(self._mix)

    def _mix(self, module, inputs, output):
        """Online MixDistribution: the second half of the batch (a copy of the first) gets mixed
        channel statistics at this shallow layer."""
        if self._mix_from is None:
            return output
        head, tail = output[:self._mix_from], output[self._mix_from:]
        return torch.cat([head, mix_within_batch(tail, self.mix_alpha)])

    def forward(self, x, mix_from: int | None = None):
        self._mix_from = mix_from
        try:
            logits, features = self.student(x)
        finally:
            self._mix_from = None
        out = {"logits": logits, "features": features}
        if self.student.projector is not None:
            out["projected"] = self.student.projector(features)
        if self.contrast is not None:
            out["contrast"] = self.contrast(features)
        if self.head_cls is not None:
            out["head_cls"], out["head_kd"] = self.head_cls(features.detach()), self.head_kd(features.detach())
        if self.peer is not None:
            out |= factors(self.feature_map.take(), self.own_autoencoder, self.inherit, self.explore, "")
            out |= self.peer(x)
        elif self.inherit is not None:
            fmap = self.feature_map.take()
            half = fmap.shape[1] // 2
            out["inherit"], out["explore"] = self.inherit(fmap[:, :half]), self.explore(fmap[:, half:])
        return out
