"""Config section of the perturb stage."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class PerturbConfig:
    """The perturb stage: MixDistribution versions of every selected image (KD³ §3.4, reconstructed)."""

    variants: int = opt(1, "perturbed versions written per selected image; 0: the shards hold the originals only", valid=">= 0")
    alpha: float = opt(0.3, "λ ~ Beta(alpha, alpha) weighs the image's own channel statistics against its partner's", valid="> 0")
    partner: str = opt("across", "where each image's partner comes from: another pseudo-class (across) or the same "
                       "one (within)", choices=("across", "within", "any"))
    encode_format: str = opt("png", "format of the perturbed images (png is lossless)", choices=("png", "jpg", "webp"))
    seed: int = opt(0, "seed of the partners and λ: the same seed gives the same shards")
