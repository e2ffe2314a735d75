"""Config section of the score stage."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class ScoreConfig:
    """The score stage: the teacher (and an optional open_clip embedder) over every crawled image."""

    batch_size: int = opt(256, "images per forward pass", valid="> 0")
    num_workers: int = opt(2, "DataLoader processes decoding images (per torchrun rank); 0: decode in the main process", valid=">= 0")
    device: str = opt("auto", "auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU; or cpu, cuda, cuda:N")
    precision: str = opt("auto", "autocast dtype; auto: bf16 on CUDA (fp16 where bf16 is not supported), fp32 on CPU",
                         choices=("auto", "fp32", "bf16", "fp16"))
    top_k: int = opt(5, "classes kept per sample in the manifest's topk columns", valid="> 0")
    feature_dtype: str = opt("float16", "dtype of the stored features and embeddings (logits are always float32)",
                             choices=("float16", "float32"))
    bn_distance: bool = opt(True, "also write each image's distance from every BatchNorm layer's running statistics "
                            "(score/bn_distance.npy, the filter's bn_layers reference; teachers with BatchNorm "
                            "only); off saves its cost, 6–9% of the demo's score throughput on 2 CPU cores")
    embedder_model: str | None = opt(None, "open_clip model (e.g. ViT-B-32) whose image embeddings are added; null: none")
    embedder_checkpoint: str | None = opt(
        None, "local open_clip checkpoint of embedder_model; 'random' for random weights (benchmarks only)", path=True)
    reference_shards: str | None = opt(
        None, "WebDataset shards (brace pattern or glob) of a few images like the private data, if you have some "
        "(with .cls labels if known): scored into score/reference.npz for the filter's reference_set reference", path=True)
