"""Config sections of the crawl stage: where the web images come from, and img2dataset's settings."""

from dataclasses import dataclass

from pipeline.config import opt


@dataclass
class DataConfig:
    """Where the web images come from."""

    source: str = opt("urls", "'urls': crawl a URL list with img2dataset; 'folder': images already on disk",
                      choices=("urls", "folder"))
    url_list: str | None = opt("demo_data/web_urls.parquet",
                               "URL list (parquet, csv, tsv, txt, json, jsonl; as img2dataset reads) for source: urls", path=True)
    input_format: str | None = opt(None, "format of url_list; null: guessed from its extension")
    url_col: str = opt("url", "column of url_list that holds the URLs")
    caption_col: str | None = opt(None, "column of url_list kept as caption (e.g. alt text or a weak label)")
    folder: str | None = opt(None, "folder of images (searched recursively) for source: folder", path=True)
    serve_folder: str | None = opt(
        None, "serve this local folder on http://127.0.0.1:serve_port while crawling (the demo web, tests)", path=True)
    serve_port: int = opt(8765, "port of the loopback server for serve_folder", valid="port")


@dataclass
class CrawlConfig:
    """img2dataset settings of the crawl stage (names as in img2dataset.download)."""

    image_size: int | None = opt(None, "side of the stored images, in pixels; null: the teacher's input side "
                                 "(teacher.input_size, else what its spec or architecture says; 64 with no teacher configured)",
                                 valid="> 0")
    resize_mode: str = opt("center_crop", "how images are fitted to image_size (center_crop: the centred square, "
                           "as the teacher's and the student's transforms take it; border pads with white)",
                           choices=("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"))
    processes_count: int = opt(2, "download processes (use the number of cores)", valid="> 0")
    thread_count: int = opt(32, "download threads per process", valid="> 0")
    number_sample_per_shard: int = opt(1000, "URLs per WebDataset shard (the unit of resume)", valid="> 0")
    timeout: int = opt(10, "seconds a download may take, wall clock (connecting, headers and body: a server "
                       "that drips bytes is cut)", valid="> 0")
    retries: int = opt(0, "extra attempts for a failed download", valid=">= 0")
    encode_format: str = opt("jpg", "format images are re-encoded to", choices=("jpg", "png", "webp"))
    encode_quality: int = opt(95, "JPEG/WebP quality, or PNG compression", valid=">= 0")
    min_image_size: int = opt(0, "drop images whose smaller side is below this", valid=">= 0")
    max_image_area: int = opt(25_000_000, "refuse images of more pixels than this (a decompression bomb is a "
                              "small file); 0: no limit", valid=">= 0")
    max_download_mb: float = opt(50.0, "stop reading a download past this many MiB and count it failed "
                                 "(too_large)", valid="> 0")
    allowed_schemes: list = opt(["http", "https"], "URL schemes fetched for source: urls; a row of another "
                                "scheme (file://, data:, ftp://) is counted failed (refused_scheme), never read: "
                                "a URL list is data from the web. source: folder reads its own files")
    distributor: str = opt(
        "multiprocessing",
        "'multiprocessing' (one machine); 'pyspark' or 'ray' to spread shards over a cluster "
        "(start the Spark session or Ray cluster first, as img2dataset documents)",
        choices=("multiprocessing", "pyspark", "ray"))
    img2dataset_args: dict = opt({}, "any other img2dataset.download() argument, passed through as is")
