"""What trains in distill: the student and the small modules some losses add.

``DistillModel`` holds them all so that one DDP wrapper synchronises every gradient: the student
(with KD³'s projector and shared head), IE-KD's two factor encoders, DFND's transition logits θ,
IPWD's two propensity heads, KD³'s contrastive projection head.
The teacher-feature auto-encoder of IE-KD is trained before the student, on the teacher
features score cached, and then frozen.
"""

import torch
from torch import nn

from pipeline.errors import UserError
from stages.common.mixing import mix_within_batch
from stages.common.student import Student
from stages.distill import losses


def mlp_encoder(d_in: int, d_out: int) -> nn.Sequential:
    """IE-KD's encoder on pooled feature vectors: the code's 3 conv-BN-LeakyReLU(0.1) layers,
    as linear layers (our features are vectors)."""
    hidden = max(d_out, d_in // 2)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, d_out))


class AutoEncoder(nn.Module):
    """IE-KD stage 1: teacher features → factor (half their size) → reconstruction."""

    def __init__(self, dim: int):
        super().__init__()
        self.encoder = mlp_encoder(dim, max(1, dim // 2))
        self.decoder = mlp_encoder(max(1, dim // 2), dim)

    def forward(self, x):
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def train_autoencoder(features: torch.Tensor, epochs: int, seed: int, batch_size: int = 256) -> tuple[AutoEncoder, list]:
    """Fit the auto-encoder with IE-KD's reconstruction loss (Adam, as the code's stage 1)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(features.shape[1])
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order, total = torch.randperm(len(features), generator=generator), 0.0
        for i in range(0, len(features), batch_size):
            batch = features[order[i:i + batch_size]]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = losses.reconstruction_loss(ae(batch)[1], batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        history.append(total / len(features))
    return ae.eval().requires_grad_(False), history


class DistillModel(nn.Module):
    def __init__(self, student: Student, num_classes: int, factor_dim: int | None, learn_transition: bool,
                 mix_layer: str | None, mix_alpha: float, propensity_heads: bool = False, contrast_head: bool = False):
        super().__init__()
        self.student = student
        # KD³'s instance alignment on a projection of its own (SimCLR's 2-layer MLP to 128 dimensions)
        d = student.feature_dim
        self.contrast = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 128)) if contrast_head else None
        # IPWD's two heads: CE on the labels, KD on the teacher (on detached features: they only estimate)
        self.head_cls = nn.Linear(student.feature_dim, num_classes) if propensity_heads else None
        self.head_kd = nn.Linear(student.feature_dim, num_classes) if propensity_heads else None
        half = student.feature_dim // 2
        self.inherit = mlp_encoder(half, factor_dim) if factor_dim else None
        self.explore = mlp_encoder(student.feature_dim - half, factor_dim) if factor_dim else None
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
        if self.inherit is not None:
            half = self.student.feature_dim // 2
            out["inherit"], out["explore"] = self.inherit(features[:, :half]), self.explore(features[:, half:])
        return out
