"""Config section of the distill stage."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class DistillConfig:
    """The distill stage: the student learns the teacher's outputs on the selected web images.

    Its preset fills every loss setting left null; a loss setting given here wins over the preset."""

    student: str = opt("resnet8", "student architecture (a name of student_library's registry)")
    student_library: str = opt("webdistill", "registry the student comes from",
                               choices=("webdistill", "timm", "torchvision"))
    student_kwargs: dict = opt({}, "keyword arguments of the student architecture (e.g. width_mult: 2)")
    preset: str = opt("webdistill", "loss recipe: kd (Hinton), dfnd (noise adaptation + per-batch confident "
                      "half), ipwd (KD weighted by two-head inverse propensities), kd3 (dynamic selection, feature "
                      "alignment, shared classifier, InfoNCE with MixDistribution), iekd (inheritance and "
                      "exploration), kddm (batches drawn from a learned distribution favouring what the teacher knows), kd3_ipw (kd3 "
                      "with the filter's inverse-propensity weights), iedml (two students learning from each other "
                      "with inheritance and exploration, no teacher), pskd (self-distillation without the teacher "
                      "from the student's previous-epoch predictions, on human labels), pskd_ipwd (pskd with ipwd's "
                      "weights), webdistill (the recipe the benchmark chose for the filtered set: "
                      "Hinton KD, as kd)",
                      choices=("kd", "pskd", "dfnd", "ipwd", "kd3", "iekd", "iedml", "kddm", "pskd_ipwd", "kd3_ipw",
                               "webdistill"))
    transfer_set: str = opt("both", "what the student learns from: web (perturb's shards: the filter's kept images "
                            "and their perturbations), synthetic (the synthesize stage's images alone), both "
                            "(web plus whatever synthesize wrote; web alone when synthesize.start is none)",
                            choices=("web", "synthetic", "both"))
    epochs: int = opt(5, "passes over the transfer set (the default recipe: 5 over 3,000 kept web images and their "
                      "3,000 refined versions, 30,000 images)", valid=">= 1")
    batch_size: int = opt(32, "images per step and per torchrun rank (on a few thousand images more steps beat "
                          "bigger batches: 92% against 67% at 128 on the digits)", valid="> 0")
    optimizer: str = opt("adamw", "adamw, or sgd (Nesterov momentum; lr 0.05 and weight_decay 5e-4 suit it): chosen "
                         "on the validation splits, where SGD fails to train the textile student in the budget",
                         choices=("sgd", "adamw"))
    lr: float = opt(0.003, "peak learning rate (per rank's batch; scale it with the number of ranks yourself)", valid="> 0")
    momentum: float = opt(0.9, "SGD momentum", valid="[0, 1)")
    weight_decay: float = opt(0.05, "weight decay (decoupled for adamw)", valid=">= 0")
    schedule: str = opt("cosine", "learning-rate schedule over all steps: cosine, step (×0.1 at milestones), "
                        "onecycle, constant", choices=("cosine", "step", "onecycle", "constant"))
    milestones: list = opt([0.5, 0.75], "for schedule step: fractions of training where the rate drops ×0.1")
    warmup_epochs: float = opt(1.0, "linear warm-up (cosine, step, constant schedules)", valid=">= 0")
    augment_shift: int = opt(2, "random translation of up to this many pixels; 0: none", valid=">= 0")
    augment_hflip: bool = opt(False, "random horizontal flips (off: digits and text are not mirror-symmetric)")
    augment_rotate: float = opt(0.0, "random rotation of up to ± this many degrees; 0: none", valid=">= 0")
    augment_scale: float = opt(0.0, "random zoom by a factor in [1 − s, 1 + s]; 0: none", valid="[0, 1)")
    augment_elastic: float = opt(0.0, "elastic distortion (Simard et al. 2003): scale α in pixels of the smoothed "
                                 "random displacement field (their MNIST setting: 34); 0: none", valid=">= 0")
    augment_elastic_sigma: float = opt(4.0, "σ in pixels of the Gaussian that smooths the elastic displacement field", valid="> 0")
    augment_mixup: float = opt(0.0, "mixup of each image with another of its batch, λ ~ Beta(a, a), the teacher "
                               "labelling the mixed image (function matching, Beyer et al. 2022); 0: none", valid=">= 0")
    teacher_logits: str = opt("auto", "online: run the teacher on every view; cached: the logits score wrote "
                              "(un-augmented views only); auto: cached when nothing is augmented",
                              choices=("auto", "online", "cached"))
    # loss settings: null takes the preset's value
    temperature: float | None = opt(None, "KD temperature T (preset: 4)", valid="> 0")
    kd_weight: float | None = opt(None, "weight of T²·KL(teacher ‖ student) (preset: 0.9)", valid=">= 0")
    ce_weight: float | None = opt(None, "weight of the cross-entropy with the teacher's hard label (preset: 0.1)", valid=">= 0")
    labels: str | None = opt(None, "the labels of the CE term (and of IPWD's and PS-KD's label terms): teacher (its "
                             "hard labels; preset) or folder (each image's class folder: a labelled transfer set crawled "
                             "with data.source: folder, one sub-folder per class name)", choices=(None, "teacher", "folder"))
    sample_weights: str | None = opt(None, "per-sample weights of every term: none, or filter (the filter's "
                                     "class-frequency or density inverse-propensity weights, filter.propensity)",
                                     choices=(None, "none", "filter"))
    propensity: str | None = opt(None, "IPWD: none, or two_head (the inverse propensity 1/P(machine | x, y) from two "
                                 "heads on the student, CE on the labels and KD on the teacher, weights the KD term)",
                                 choices=(None, "none", "two_head"))
    ipwd_formula: str | None = opt(None, "IPWD's weight: bayes (1 + p_cls(y|x)/p_kd(y|x); preset) or literal "
                                   "(1 + CE_cls/CE_kd)", choices=(None, "bayes", "literal"))
    ipwd_tau: float | None = opt(None, "IPWD: LogitNorm temperature of the two heads' logits (preset: 0.04)", valid="> 0")
    ipwd_clip: float | None = opt(None, "IPWD: weights (mean 1 per batch) are clipped at this (preset: 10)", valid="> 0")
    ipwd_start: float | None = opt(None, "IPWD: share of training before the weights apply (preset: 0)", valid="[0, 1]")
    batch_select: float | None = opt(None, "keep only this share of each batch, most confident first (DFND as "
                                     "mmrazor; 1: all)", valid="(0, 1]")
    noise_adaptation_weight: float | None = opt(None, "weight of DFND's noise-adaptation loss NLL(log(p_s·Q), ŷ_t)", valid=">= 0")
    teacher_accuracy: float | None = opt(None, "diagonal of DFND's transition matrix Q (null: "
                                         "teacher.accuracy, the owner's figure; 0.95 when it is unknown)", valid="(0, 1]")
    selection: str | None = opt(None, "KD³ dynamic selection each step from λ·p_teacher + (1−λ)·p_student: none, "
                                "threshold (max ≥ selection_tau) or top_k (the selection_ratio most confident)",
                                choices=(None, "none", "threshold", "top_k"))
    selection_tau: float | None = opt(None, "threshold of the combined confidence (preset: 0.5)", valid="[0, 1]")
    selection_ratio: float | None = opt(None, "share kept by top_k selection (preset: 0.7)", valid="(0, 1]")
    selection_lambda: list | None = opt(None, "[first, last] λ of the combined prediction, linear over epochs "
                                        "(preset: [1.0, 0.5])")
    feature_weight: float | None = opt(None, "weight of KD³'s weighted feature alignment ‖h(f_s) − f_t‖²", valid=">= 0")
    classifier: str | None = opt(None, "own: the student's classifier; shared: the teacher's frozen classifier on "
                                 "the projected student features (KD³); aligned: own, pulled towards it",
                                 choices=(None, "own", "shared", "aligned"))
    contrastive_weight: float | None = opt(None, "weight of the InfoNCE between each image and its perturbation", valid=">= 0")
    contrastive_head: str | None = opt(None, "KD³'s InfoNCE on: separate (a projection head of its own, SimCLR's MLP; "
                                       "preset) or projector (h, the projection that feeds the shared classifier)",
                                       choices=(None, "separate", "projector"))
    contrastive_temperature: float | None = opt(None, "InfoNCE temperature (preset: 0.1)", valid="> 0")
    perturbation: str | None = opt(None, "the perturbed view: offline (the perturb stage's images), online "
                                   "(MixDistribution of a shallow student feature map, partner from the batch) "
                                   "or none", choices=(None, "none", "offline", "online"))
    mix_layer: str = opt("auto", "student module whose output online MixDistribution perturbs; auto: the first "
                         "child module (the stem)")
    mix_alpha: float = opt(0.3, "online MixDistribution: λ ~ Beta(mix_alpha, mix_alpha)", valid="> 0")
    inherit_weight: float | None = opt(None, "IE-KD: weight of the inheritance loss (preset iekd: 1)", valid=">= 0")
    explore_weight: float | None = opt(None, "IE-KD: weight of the exploration loss (preset iekd: 1)", valid=">= 0")
    mutual: str | None = opt(None, "IE-DML: none, or iedml (a second student of the same architecture learns with this "
                             "one: CE, mutual KL, inheritance and exploration towards each other's factor)",
                             choices=(None, "none", "iedml"))
    mutual_weight: float | None = opt(None, "IE-DML: weight of the mutual KL (preset: 1)", valid=">= 0")
    ae_epochs: int = opt(30, "IE-KD: epochs of the teacher-feature auto-encoder, on the features score cached", valid=">= 1")
    sampler: str | None = opt(None, "how batches are drawn: none (the shuffled stream) or kddm (resampled from KDDM's "
                              "learned distribution over clusters of the transfer set, favouring what the teacher "
                              "classifies confidently)", choices=(None, "none", "kddm"))
    self_distill: str | None = opt(None, "none, or pskd: the target is (1 − α_t)·one-hot(label) + α_t·(the student's "
                                   "own prediction of the previous epoch), no teacher (needs labels: folder)",
                                   choices=(None, "none", "pskd"))
    pskd_alpha: float | None = opt(None, "PS-KD: α_T, the final weight of the previous predictions (preset: 0.8)",
                                   valid="[0, 1]")
    kddm_gamma: float | None = opt(None, "KDDM: weight γ of the distribution's entropy in its objective "
                                   "Σ π·confidence + γ·H(π) (preset: 0.1)", valid=">= 0")
    kddm_entropy_floor: float | None = opt(None, "KDDM: the distribution's entropy never falls below this share of "
                                           "the uniform's (preset: 0.5)", valid="[0, 1]")
    kddm_clusters: int | None = opt(None, "KDDM: k-means clusters of the teacher's features the distribution is "
                                    "over; 0: one parameter per image (preset: 64)", valid=">= 0")
    kddm_lr: float | None = opt(None, "KDDM: Adam learning rate of the distribution's logits (preset: 0.05)", valid="> 0")
    kddm_loss: str | None = opt(None, "KDDM's loss, reconstructed: kd (Hinton KD) or confidence (each sample's "
                                "terms weighted by the teacher's confidence, mean 1 per batch)",
                                choices=(None, "kd", "confidence"))
    device: str = opt("auto", "auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU")
    precision: str = opt("auto", "autocast dtype; auto: bf16 on CUDA (fp16 where unsupported), fp32 on CPU",
                         choices=("auto", "fp32", "bf16", "fp16"))
    num_workers: int = opt(2, "DataLoader processes reading and decoding the shards (per rank)", valid=">= 0")
    split: str = opt("shard", "how torchrun ranks share the transfer set: whole shards (each rank reads its own), or "
                     "every world_size-th sample of every shard (equal shares when there are few shards)",
                     choices=("shard", "sample"))
    cache_mb: float = opt(1024.0, "decoded images each loader worker keeps in memory (MiB), so that epochs after the "
                          "first skip reading and decoding; 0: decode every epoch", valid=">= 0")
    shuffle_buffer: int = opt(2000, "samples in the shuffle buffer (shard order is shuffled too)", valid="> 0")
    seed: int = opt(0, "seed of initialisation, data order and augmentation: the same seed gives the same weights")
    keep_checkpoints: int = opt(2, "epoch checkpoints kept (the newest); training resumes from the last one", valid=">= 1")
