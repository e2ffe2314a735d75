"""Config section of the synthesize stage."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class SynthesizeConfig:
    """The synthesize stage: images optimised so that the teacher's BatchNorm layers see the statistics of its
    private data (DeepInversion, Yin et al. CVPR 2020), from noise or from the filter's kept web images."""

    start: str = opt("auto", "kept: the hybrid, each kept web image refined toward the teacher's statistics; "
                     "noise: DeepInversion from Gaussian noise (the data-free peers' transfer set); none: no "
                     "synthesis; auto: kept when the teacher has BatchNorm layers (the default recipe, chosen on "
                     "the validation splits of both demos), else none", choices=("auto", "none", "noise", "kept"))
    images: int = opt(0, "images to synthesise; 0: 1,000 from noise, every kept image for kept", valid=">= 0")
    targets: str = opt("balanced", "the class each image is optimised toward. balanced: equal counts per class "
                       "(from noise: cycling through the classes; kept: the teacher's pseudo-label, except that "
                       "images of over-full classes move to the class they score highest among those short of "
                       "their share, which fills classes the web lacks); pseudo_label: the teacher's top class "
                       "(kept only)", choices=("balanced", "pseudo_label"))
    steps: int = opt(0, "optimisation steps per batch; 0: 2,000 from noise (the official CIFAR setting), 50 "
                     "for kept (what the benchmark ran)", valid=">= 0")
    lr: float = opt(0.05, "Adam learning rate on the pixels (normalised scale; the official CIFAR setting)", valid="> 0")
    bn_weight: float = opt(10.0, "weight of the BatchNorm-statistics loss (the official CIFAR r_feature)", valid=">= 0")
    first_bn_weight: float = opt(1.0, "extra factor on the first BatchNorm layer's term (the official ImageNet "
                                 "code uses 10)", valid=">= 0")
    ce_weight: float = opt(1.0, "weight of the cross-entropy toward the target class", valid=">= 0")
    tv_weight: float = opt(2.5e-5, "weight of the total-variation prior (the official CIFAR di_var_scale)", valid=">= 0")
    l2_weight: float = opt(0.0, "weight of the L2 prior on the pixels", valid=">= 0")
    jitter: int = opt(2, "random shift of up to this many pixels at each step", valid=">= 0")
    flip: bool = opt(False, "random horizontal flips at each step (off for digits and text, on for photos)")
    batch_size: int = opt(128, "images optimised together: BatchNorm statistics are matched over the batch, so a "
                          "batch should hold every class (the official code: 256)", valid=">= 2")
    images_per_shard: int = opt(512, "images per shard: the unit of resume", valid="> 0")
    device: str = opt("auto", "auto: CUDA when available, else CPU; or cpu, cuda, cuda:N")
    seed: int = opt(0, "seed of the noise and the jitter: the same seed gives the same shards")
