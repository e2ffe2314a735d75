"""The run configuration: typed sections with documented defaults, loaded from YAML.

Each section is a dataclass; every field carries its help text, so ``webdistill defaults``
prints the full, commented default config. Loading is strict: an unknown or misspelt key is an
error naming the key, the file and the closest valid key, and a value of the wrong type or
outside its choices is an error too. Relative paths are relative to the working directory.
"""

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import UserError


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its documentation (and allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the web images come from."""

    source: str = opt("urls", "'urls': crawl a URL list with img2dataset; 'folder': images already on disk",
                      choices=("urls", "folder"))
    url_list: str | None = opt("demo_data/web_urls.parquet",
                               "URL list (parquet, csv, tsv, txt, json, jsonl; as img2dataset reads) for source: urls")
    input_format: str | None = opt(None, "format of url_list; null: guessed from its extension")
    url_col: str = opt("url", "column of url_list that holds the URLs")
    caption_col: str | None = opt(None, "column of url_list kept as caption (e.g. alt text or a weak label)")
    folder: str | None = opt(None, "folder of images (searched recursively) for source: folder")
    serve_folder: str | None = opt(
        None, "serve this local folder on http://127.0.0.1:serve_port while crawling (the demo web, tests)")
    serve_port: int = opt(8765, "port of the loopback server for serve_folder")


@dataclass
class CrawlConfig:
    """img2dataset settings of the crawl stage (names as in img2dataset.download)."""

    image_size: int = opt(64, "side of the stored images, in pixels")
    resize_mode: str = opt("border", "how images are fitted to image_size",
                           choices=("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"))
    processes_count: int = opt(2, "download processes (use the number of cores)")
    thread_count: int = opt(32, "download threads per process")
    number_sample_per_shard: int = opt(1000, "URLs per WebDataset shard (the unit of resume)")
    timeout: int = opt(10, "seconds before a download gives up")
    retries: int = opt(0, "extra attempts for a failed download")
    encode_format: str = opt("jpg", "format images are re-encoded to", choices=("jpg", "png", "webp"))
    encode_quality: int = opt(95, "JPEG/WebP quality, or PNG compression")
    min_image_size: int = opt(0, "drop images whose smaller side is below this")
    distributor: str = opt(
        "multiprocessing",
        "'multiprocessing' (one machine); 'pyspark' or 'ray' to spread shards over a cluster "
        "(start the Spark session or Ray cluster first, as img2dataset documents)",
        choices=("multiprocessing", "pyspark", "ray"))
    img2dataset_args: dict = opt({}, "any other img2dataset.download() argument, passed through as is")


@dataclass
class TeacherConfig:
    """The teacher: a classifier trained on the private data, loaded from local files only."""

    spec_file: str | None = opt(
        None, "YAML file holding the keys of this section (`make teacher` writes the demo's); keys set here "
        "override it, and relative paths in it are relative to its folder")
    format: str = opt("webdistill", "how the teacher is stored: an architecture of webdistill's registry, timm or "
                      "torchvision + a state_dict; 'entrypoint': arch is module:function returning the model, + a "
                      "state_dict; 'torchscript': a TorchScript file; 'open_clip': a zero-shot CLIP classifier",
                      choices=("webdistill", "timm", "torchvision", "entrypoint", "torchscript", "open_clip"))
    arch: str | None = opt(None, "architecture name in the format's library (e.g. convnet5, resnet18, ViT-B-32), "
                           "or module:function for format entrypoint; unused for torchscript")
    arch_kwargs: dict = opt({}, "keyword arguments of the architecture or entry point (e.g. width: 64)")
    checkpoint: str | None = opt(None, "local weights file: a state_dict (.pt, .pth, .safetensors), the TorchScript "
                                 "file, or the open_clip checkpoint")
    sha256: str | None = opt(None, "expected sha256 of the checkpoint, checked at load (null: not checked)")
    class_names: list | str | None = opt(None, "class names in logit order, or a text file with one per line (required)")
    input_size: int | None = opt(None, "side of the square input in pixels; null: the architecture's own "
                                 "(timm, open_clip), required otherwise")
    channels: int = opt(3, "input channels: 1 (grey) or 3 (RGB)", choices=(1, 3))
    mean: list | None = opt(None, "per-channel normalisation mean on the 0–1 scale; null: the architecture's own, "
                            "else ImageNet's")
    std: list | None = opt(None, "per-channel normalisation std; null: as for mean")
    feature_layer: str = opt("auto", "module whose output (flattened) is the penultimate feature vector; auto: the "
                             "input of the last Linear layer. torchscript: a method the script exports (auto: "
                             "forward_features), unless forward returns (logits, features)")
    prompt_template: str = opt("a photo of a {}.", "prompt of each class name ({}) for an open_clip zero-shot teacher "
                               "and for the filter's clip_text reference")


@dataclass
class ScoreConfig:
    """The score stage: the teacher (and an optional open_clip embedder) over every crawled image."""

    batch_size: int = opt(256, "images per forward pass")
    num_workers: int = opt(2, "DataLoader processes decoding images (per torchrun rank); 0: decode in the main process")
    device: str = opt("auto", "auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU; or cpu, cuda, cuda:N")
    precision: str = opt("auto", "autocast dtype; auto: bf16 on CUDA (fp16 where bf16 is not supported), fp32 on CPU",
                         choices=("auto", "fp32", "bf16", "fp16"))
    top_k: int = opt(5, "classes kept per sample in the manifest's topk columns")
    feature_dtype: str = opt("float16", "dtype of the stored features and embeddings (logits are always float32)",
                             choices=("float16", "float32"))
    embedder_model: str | None = opt(None, "open_clip model (e.g. ViT-B-32) whose image embeddings are added; null: none")
    embedder_checkpoint: str | None = opt(
        None, "local open_clip checkpoint of embedder_model; 'random' for random weights (benchmarks only)")
    reference_shards: str | None = opt(
        None, "WebDataset shards (brace pattern or glob) of a few images like the private data, if you have some "
        "(with .cls labels if known): scored into score/reference.npz for the filter's reference_set reference")


@dataclass
class FilterConfig:
    """The filter stage: which scored web images the student learns from, and how much each counts."""

    reference: str = opt(
        "bn_stats", "what stands for the private distribution: bn_stats (feature mean/std the teacher's BatchNorm "
        "remembers; class-agnostic), prototypes (the teacher's classifier weights, one per class), centroids "
        "(faiss k-means of confidently scored samples, centroids_per_class per class), reference_set (images "
        "given in score.reference_shards), clip_text (open_clip embeddings of the class prompts)",
        choices=("bn_stats", "prototypes", "centroids", "reference_set", "clip_text"))
    vectors: str = opt("features", "what is matched: the teacher's penultimate features, or the open_clip "
                       "embeddings of score.embedder_model (clip_text needs these; bn_stats and prototypes need "
                       "features)", choices=("features", "embeddings"))
    policy: str = opt(
        "balanced", "balanced: the most similar samples with an equal quota per pseudo-class (a class short of "
        "samples gives its quota to the others); threshold: every sample that passes the gates; dfnd: the "
        "budget most confident samples (DFND); random: budget samples at random; none: keep everything",
        choices=("balanced", "threshold", "dfnd", "random", "none"))
    budget: float = opt(0.3, "samples to keep for balanced, dfnd and random: a share of the scored pool if ≤ 1, "
                        "else a count")
    min_similarity: float | None = opt(None, "gate: drop samples less similar to the reference than this "
                                       "(the scale depends on the reference: see filter/summary.txt); null: no gate")
    min_confidence: float = opt(0.0, "gate: drop samples whose teacher confidence is below this")
    require_agreement: bool = opt(False, "gate: drop samples whose nearest reference class is not the teacher's "
                                  "pseudo-label (references with classes only)")
    k: int = opt(10, "neighbours for the reference_set similarity, the density ratio and the local density")
    centroids_per_class: int = opt(4, "k-means centroids per pseudo-class for reference centroids")
    centroid_min_confidence: float = opt(0.9, "teacher confidence a sample needs to shape the centroids")
    temperature: float = opt(0.1, "softmax temperature turning similarities to the reference's classes into the "
                             "class probabilities the ipwd propensities compare with the teacher's")
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
                              "0.5 tempers it (a square root: less variance, less correction), 0 turns it off")
    weight_clip: list = opt([0.1, 10.0], "[min, max] of the normalised weights (their mean stays 1)")
    exact_search_max: int = opt(50000, "kNN over up to this many vectors is exact (faiss IndexFlat); an IVF index "
                                "is used above")
    density_max_points: int = opt(100000, "the local density is measured against at most this many kept "
                                  "samples (a random subset)")
    ivf_nprobe: int = opt(0, "inverted lists an IVF search visits; 0: the smallest power of two that reaches "
                          "target_recall on a sample")
    target_recall: float = opt(0.95, "recall@k against exact search that the IVF index must reach")
    seed: int = opt(0, "seed of the random policy, subsets and k-means")
    diagnostics_sources: str | None = opt(
        None, "the demo's side file of true sources (uid, source, label): used after selection to report the kept "
        "set's precision and class coverage, never to select")


@dataclass
class PerturbConfig:
    """The perturb stage: MixDistribution versions of every selected image (KD³ §3.4, reconstructed)."""

    variants: int = opt(1, "perturbed versions written per selected image; 0: the shards hold the originals only")
    alpha: float = opt(0.3, "λ ~ Beta(alpha, alpha) weighs the image's own channel statistics against its partner's")
    partner: str = opt("across", "where each image's partner comes from: another pseudo-class (across) or the same "
                       "one (within)", choices=("across", "within", "any"))
    encode_format: str = opt("png", "format of the perturbed images (png is lossless)", choices=("png", "jpg", "webp"))
    seed: int = opt(0, "seed of the partners and λ: the same seed gives the same shards")


@dataclass
class DistillConfig:
    """The distill stage: the student learns the teacher's outputs on the selected web images.

    Its preset fills every loss setting left null; a loss setting given here wins over the preset."""

    student: str = opt("resnet8", "student architecture (a name of student_library's registry)")
    student_library: str = opt("webdistill", "registry the student comes from",
                               choices=("webdistill", "timm", "torchvision"))
    student_kwargs: dict = opt({}, "keyword arguments of the student architecture (e.g. width_mult: 2)")
    preset: str = opt("kd", "loss recipe: kd (Hinton), dfnd (noise adaptation + per-batch confident half), ipwd "
                      "(KD weighted by the filter's inverse propensities), kd3 (dynamic selection, feature "
                      "alignment, shared classifier, InfoNCE with MixDistribution), iekd (inheritance and "
                      "exploration), kddm (sampling distribution favouring what the teacher knows), kd3_ipw (kd3 "
                      "with ipwd's weights), webdistill (the recipe the benchmark chose for the filtered set: "
                      "Hinton KD, as kd)",
                      choices=("kd", "dfnd", "ipwd", "kd3", "iekd", "kddm", "kd3_ipw", "webdistill"))
    epochs: int = opt(20, "passes over the selected images")
    batch_size: int = opt(128, "images per step and per torchrun rank")
    optimizer: str = opt("sgd", "sgd (Nesterov momentum) or adamw", choices=("sgd", "adamw"))
    lr: float = opt(0.05, "peak learning rate (per rank's batch; scale it with the number of ranks yourself)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay")
    schedule: str = opt("cosine", "learning-rate schedule over all steps: cosine, step (×0.1 at milestones), "
                        "onecycle, constant", choices=("cosine", "step", "onecycle", "constant"))
    milestones: list = opt([0.5, 0.75], "for schedule step: fractions of training where the rate drops ×0.1")
    warmup_epochs: float = opt(1.0, "linear warm-up (cosine, step, constant schedules)")
    augment_shift: int = opt(2, "random translation of up to this many pixels; 0: none")
    augment_hflip: bool = opt(False, "random horizontal flips (off: digits and text are not mirror-symmetric)")
    augment_rotate: float = opt(0.0, "random rotation of up to ± this many degrees; 0: none")
    augment_scale: float = opt(0.0, "random zoom by a factor in [1 − s, 1 + s]; 0: none")
    augment_elastic: float = opt(0.0, "elastic distortion (Simard et al. 2003): scale α in pixels of the smoothed "
                                 "random displacement field (their MNIST setting: 34); 0: none")
    augment_elastic_sigma: float = opt(4.0, "σ in pixels of the Gaussian that smooths the elastic displacement field")
    augment_mixup: float = opt(0.0, "mixup of each image with another of its batch, λ ~ Beta(a, a), the teacher "
                               "labelling the mixed image (function matching, Beyer et al. 2022); 0: none")
    teacher_logits: str = opt("auto", "online: run the teacher on every view; cached: the logits score wrote "
                              "(un-augmented views only); auto: cached when nothing is augmented",
                              choices=("auto", "online", "cached"))
    # loss settings: null takes the preset's value
    temperature: float | None = opt(None, "KD temperature T (preset: 4)")
    kd_weight: float | None = opt(None, "weight of T²·KL(teacher ‖ student) (preset: 0.9)")
    ce_weight: float | None = opt(None, "weight of the cross-entropy with the teacher's hard label (preset: 0.1)")
    sample_weights: str | None = opt(None, "per-sample loss weights: none, filter (the filter's inverse-propensity "
                                     "weights: IPWD), kddm (the learned sampling distribution)",
                                     choices=(None, "none", "filter", "kddm"))
    batch_select: float | None = opt(None, "keep only this share of each batch, most confident first (DFND as "
                                     "mmrazor; 1: all)")
    noise_adaptation_weight: float | None = opt(None, "weight of DFND's noise-adaptation loss NLL(log(p_s·Q), ŷ_t)")
    teacher_accuracy: float | None = opt(None, "diagonal of DFND's transition matrix Q: the teacher's known "
                                         "accuracy (preset: 0.95)")
    selection: str | None = opt(None, "KD³ dynamic selection each step from λ·p_teacher + (1−λ)·p_student: none, "
                                "threshold (max ≥ selection_tau) or top_k (the selection_ratio most confident)",
                                choices=(None, "none", "threshold", "top_k"))
    selection_tau: float | None = opt(None, "threshold of the combined confidence (preset: 0.5)")
    selection_ratio: float | None = opt(None, "share kept by top_k selection (preset: 0.7)")
    selection_lambda: list | None = opt(None, "[first, last] λ of the combined prediction, linear over epochs "
                                        "(preset: [1.0, 0.5])")
    feature_weight: float | None = opt(None, "weight of KD³'s weighted feature alignment ‖h(f_s) − f_t‖²")
    classifier: str | None = opt(None, "own: the student's classifier; shared: the teacher's frozen classifier on "
                                 "the projected student features (KD³); aligned: own, pulled towards it",
                                 choices=(None, "own", "shared", "aligned"))
    contrastive_weight: float | None = opt(None, "weight of the InfoNCE between each image and its perturbation")
    contrastive_temperature: float | None = opt(None, "InfoNCE temperature (preset: 0.1)")
    perturbation: str | None = opt(None, "the perturbed view: offline (the perturb stage's images), online "
                                   "(MixDistribution of a shallow student feature map, partner from the batch) "
                                   "or none", choices=(None, "none", "offline", "online"))
    mix_layer: str = opt("auto", "student module whose output online MixDistribution perturbs; auto: the first "
                         "child module (the stem)")
    mix_alpha: float = opt(0.3, "online MixDistribution: λ ~ Beta(mix_alpha, mix_alpha)")
    inherit_weight: float | None = opt(None, "IE-KD: weight of the inheritance loss (preset iekd: 1)")
    explore_weight: float | None = opt(None, "IE-KD: weight of the exploration loss (preset iekd: 1)")
    ae_epochs: int = opt(30, "IE-KD: epochs of the teacher-feature auto-encoder, on the features score cached")
    kddm_gamma: float | None = opt(None, "KDDM: temperature of the sampling distribution softmax(confidence/γ)")
    device: str = opt("auto", "auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU")
    precision: str = opt("auto", "autocast dtype; auto: bf16 on CUDA (fp16 where unsupported), fp32 on CPU",
                         choices=("auto", "fp32", "bf16", "fp16"))
    num_workers: int = opt(2, "DataLoader processes reading and decoding the shards (per rank)")
    split: str = opt("shard", "how torchrun ranks share the transfer set: whole shards (each rank reads its own), or "
                     "every world_size-th sample of every shard (equal shares when there are few shards)",
                     choices=("shard", "sample"))
    cache_mb: float = opt(1024.0, "decoded images each loader worker keeps in memory (MiB), so that epochs after the "
                          "first skip reading and decoding; 0: decode every epoch")
    shuffle_buffer: int = opt(2000, "samples in the shuffle buffer (shard order is shuffled too)")
    seed: int = opt(0, "seed of initialisation, data order and augmentation: the same seed gives the same weights")
    keep_checkpoints: int = opt(2, "epoch checkpoints kept (the newest); training resumes from the last one")


@dataclass
class EvaluateConfig:
    """The evaluate stage: student and teacher on a labelled test set."""

    test_set: str | None = opt(None, "labelled test images: WebDataset shards with .cls labels (brace pattern or "
                               "glob) or a folder with one subfolder per class name")
    batch_size: int = opt(256, "images per forward pass")
    ece_bins: int = opt(15, "confidence bins of the expected calibration error")
    device: str = opt("auto", "auto: CUDA when available, else CPU")


@dataclass
class DemoConfig:
    """The embedded demo: private MNIST split and a synthetic web pool (``webdistill demo-data``)."""

    dir: str = opt("demo_data", "where the demo data is built")
    pool_size: int = opt(10000, "images in the web pool (broken entries come on top)")
    broken_fraction: float = opt(0.02, "share of broken entries in the URL list (404, truncated, non-image, refused)")
    seed: int = opt(0, "seed of the demo data and of the demo teacher's training")
    teacher_arch: str = opt("convnet5", "webdistill architecture of the demo teacher (`make teacher`)")
    teacher_epochs: int = opt(24, "training epochs of the demo teacher on the private train split")
    teacher_min_accuracy: float = opt(0.985, "`make teacher` fails if the teacher's top-1 on the private test split is lower")


@dataclass
class BenchConfig:
    """`webdistill bench`: a student per method and seed on this config's web pool, scored on evaluate.test_set."""

    methods: list = opt(["upper_bound", "oracle_filter", "pool_kd", "random_kd", "dfnd", "filter_kd", "filter_ipw",
                         "kd3", "iekd", "kd3_ipw", "webdistill"],
                        "methods compared (pipeline/bench.py METHODS: name, what it trains on, its config overrides; "
                        "`webdistill bench --list`)")
    ablations: bool = opt(True, "also train kd3_ipw with one component removed at a time (pipeline/bench.py "
                          "ABLATIONS); the ablation table adds the methods that differ from webdistill by one part")
    seeds: list = opt([0, 1, 2], "seeds of every method (distill.seed; the random subset's filter.seed)")
    train_images: int = opt(60000, "training images every student sees: epochs = train_images / its transfer set "
                            "(rounded, at least 1), so every method gets the same compute")
    upper_bound_data: str | None = opt(None, "labelled private training images (WebDataset shards with .cls, or a "
                                       "folder per class) for the upper_bound method: KD on the private data itself")
    pool_sizes: list = opt([], "smaller pools (URL-list rows, a seeded sample) run end to end with webdistill to "
                           "time each stage against pool size; the full pool is always timed")
    work_dir: str = opt("bench/work", "where each method's run directories go (runs/<method>/seed<k>)")
    results_dir: str = opt("bench/results", "where the tables and plots go")


@dataclass
class Config:
    run_dir: str = opt("runs/demo", "run directory: one folder per stage, completion records, resolved config")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    crawl: CrawlConfig = field(default_factory=CrawlConfig, metadata={"help": CrawlConfig.__doc__})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": TeacherConfig.__doc__})
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata={"help": ScoreConfig.__doc__})
    filter: FilterConfig = field(default_factory=FilterConfig, metadata={"help": FilterConfig.__doc__})
    perturb: PerturbConfig = field(default_factory=PerturbConfig, metadata={"help": PerturbConfig.__doc__})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": DistillConfig.__doc__})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"help": EvaluateConfig.__doc__})
    demo: DemoConfig = field(default_factory=DemoConfig, metadata={"help": DemoConfig.__doc__})
    bench: BenchConfig = field(default_factory=BenchConfig, metadata={"help": BenchConfig.__doc__})


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _check_type(value, hint, where: str, origin: str):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UserError(f"{origin}: {where} must not be empty")
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, bool):
            continue
        if isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise UserError(f"{origin}: {where} must be {names}, got {value!r}")


def _build(cls, values: dict, prefix: str, origin: str):
    if not isinstance(values, dict):
        raise UserError(f"{origin}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(f"{origin}: unknown key {prefix + str(key)!r}{_closest(str(key), list(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint, where = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, where + ".", origin)
            continue
        value = _check_type(value, hint, where, origin)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{origin}: {where} = {value!r} is not one of {list(choices)}{_closest(str(value), list(choices))}")
        kwargs[name] = value
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a raw config mapping."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. crawl.processes_count=4")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config (defaults for what it leaves out) with ``KEY=VALUE`` overrides."""
    raw, origin = {}, "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found (the demo's is configs/demo.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from e
    for assignment in overrides:
        _apply_override(raw, assignment)
    if isinstance(raw.get("teacher"), dict) and raw["teacher"].get("spec_file"):
        raw["teacher"] = _with_spec_file(raw["teacher"], origin)
    return _build(Config, raw, "", origin)


_SPEC_PATHS = ("checkpoint", "class_names")  # keys of a teacher spec file that hold a path when a string


def _with_spec_file(teacher: dict, origin: str) -> dict:
    """The teacher section with the keys of its spec file underneath (the section's own keys win).

    A spec file that does not exist yet (the demo's, before `make teacher`) is left for the teacher
    loader to report, so that the config still loads for stages that do not need the teacher.
    """
    path = Path(teacher["spec_file"])
    if not path.is_file():
        return teacher
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} (teacher.spec_file of {origin}): not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise UserError(f"{path} (teacher.spec_file of {origin}): must be a mapping of teacher keys")
    for key in _SPEC_PATHS:
        value = spec.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            spec[key] = str(path.parent / value)
    return {**spec, **teacher}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def fingerprint(cfg: Config, sections: typing.Iterable[str], files: typing.Iterable[str | None] = (),
                derived: dict | None = None) -> str:
    """Hash of the named config sections, of the size and modification time of ``files`` and of
    ``derived`` settings: a stage is stale when the config it reads, what the code makes of it,
    or one of its input files changes."""
    d = to_dict(cfg)
    stamps = {}
    for f in files:
        if f and Path(f).is_file():
            st = Path(f).stat()
            stamps[str(f)] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps({**{s: d[s] for s in sections}, "_files": stamps, **({"_derived": derived} if derived else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def commented_defaults(cls=Config, indent: str = "") -> str:
    """The default config as YAML, each key preceded by its help text."""
    lines = []
    for f in dataclasses.fields(cls):
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        if choices:
            help_text += f" (one of: {', '.join(map(str, choices))})"
        lines.extend(f"{indent}# {line.strip()}" for line in help_text.splitlines() if line.strip())
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines.append(f"{indent}{f.name}:")
            lines.append(commented_defaults(type(default), indent + "  "))
        else:
            lines.append(f"{indent}{f.name}: {json.dumps(default)}")
    return "\n".join(lines)
