"""Config section of the filter stage."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class FilterConfig:
    """The filter stage: which scored web images the student learns from, and how much each counts."""

    reference: str = opt(
        "bn_layers", "what stands for the private distribution: bn_layers (distance of each image's channel "
        "statistics from every BatchNorm layer's running ones: DeepInversion's loss as a score; class-agnostic; the "
        "best AUROC in-domain vs not on both demo scenarios), bn_stats (feature mean/std the last BatchNorm feeding "
        "the features remembers; class-agnostic), prototypes (the teacher's "
        "classifier weights, one per class), centroids "
        "(faiss k-means of confidently scored samples, centroids_per_class per class), reference_set (images "
        "given in score.reference_shards), clip_text (open_clip embeddings of the class prompts)",
        choices=("bn_stats", "bn_layers", "prototypes", "centroids", "reference_set", "clip_text"))
    vectors: str = opt("features", "what is matched: the teacher's penultimate features, or the open_clip "
                       "embeddings of score.embedder_model (clip_text needs these; bn_stats and prototypes need "
                       "features)", choices=("features", "embeddings"))
    policy: str = opt(
        "balanced", "balanced: the most similar samples with an equal quota per pseudo-class (a class short of "
        "samples gives its quota to the others); threshold: every sample that passes the gates; dfnd: the "
        "budget most confident samples (DFND); random: budget samples at random; none: keep everything",
        choices=("balanced", "threshold", "dfnd", "random", "none"))
    budget: float = opt(0.3, "samples to keep for balanced, dfnd and random: a share of the scored pool if ≤ 1, "
                        "else a count", valid="share or count")
    min_similarity: float | None = opt(None, "gate: drop samples less similar to the reference than this "
                                       "(the scale depends on the reference: see filter/summary.txt); null: no gate")
    min_confidence: float = opt(0.0, "gate: drop samples whose teacher confidence is below this", valid="[0, 1]")
    require_agreement: bool = opt(False, "gate: drop samples whose nearest reference class is not the teacher's "
                                  "pseudo-label (references with classes only)")
    k: int = opt(10, "neighbours for the reference_set similarity, the density ratio and the local density", valid="> 0")
    centroids_per_class: int = opt(4, "k-means centroids per pseudo-class for reference centroids", valid="> 0")
    centroid_min_confidence: float = opt(0.9, "teacher confidence a sample needs to shape the centroids", valid="[0, 1]")
    temperature: float = opt(0.1, "softmax temperature turning similarities to the reference's classes into the "
                             "class probabilities the ipwd propensities compare with the teacher's", valid="> 0")
    propensity: str = opt(
        "class_frequency", "how P(machine domain | x) is estimated (IPWD; weight = 1/propensity): class_frequency "
        "(share of the sample's pseudo-class among the kept samples, over class_prior); density (local kNN "
        "density among the kept samples, relative to its median); class_frequency_x_density (both); ipwd_bayes "
        "(p_teacher / (p_teacher + p_reference) of the pseudo-label); ipwd_literal (1 / (1 + CE_reference / "
        "CE_teacher), the formula as summarised); none (all weights 1)",
        choices=("class_frequency", "density", "class_frequency_x_density", "ipwd_bayes", "ipwd_literal", "none"))
    class_prior: str = opt("uniform", "prior of class_frequency: uniform, or the labels of the reference set",
                           choices=("uniform", "reference"))
    weight_power: float = opt(1.0, "weight = (1/propensity)^weight_power before normalising: 1 is IPW as published, "
                              "0.5 tempers it (a square root: less variance, less correction), 0 turns it off", valid=">= 0")
    weight_clip: list = opt([0.1, 10.0], "[min, max] of the normalised weights (their mean stays 1)", valid="[min, max] > 0")
    exact_search_max: int = opt(50000, "kNN over up to this many vectors is exact (faiss IndexFlat); above, the "
                                "first of IVF-PQ fast-scan re-ranked exactly, IVF-Flat, exact search that reaches "
                                "target_recall probing at most 1/16 of its lists", valid="> 0")
    density_max_points: int = opt(100000, "the local density is measured against at most this many kept "
                                  "samples (a random subset)", valid="> 0")
    ivf_nprobe: int = opt(0, "inverted lists an IVF search visits; 0: the smallest power of two that reaches "
                          "target_recall on a sample", valid=">= 0")
    target_recall: float = opt(0.95, "recall@k against exact search (measured on 1,000 sampled queries) that an approximate index must reach", valid="(0, 1]")
    seed: int = opt(0, "seed of the random policy, subsets and k-means")
    diagnostics_sources: str | None = opt(
        None, "the demo's side file of true sources (uid, source, label): used after selection to report the kept "
        "set's precision and class coverage, never to select", path=True)
