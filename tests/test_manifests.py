import pandas as pd
import pytest

from manifests import CRAWL, ManifestError, read_manifest, uid_for, write_manifest


def crawl_rows(n=3):
    urls = [f"http://example.org/{i}.jpg" for i in range(n)]
    return pd.DataFrame({
        "uid": [uid_for(u) for u in urls], "url": urls, "status": ["success"] * n,
        "reason": [None] * n, "error": [None] * n, "shard": ["shards/00000.tar"] * n,
        "key": [f"{i:09d}" for i in range(n)], "sha256": ["0" * 64] * n,
        "width": [64] * n, "height": [64] * n, "original_width": [30] * n, "original_height": [40] * n,
        "caption": [None] * n,
    })


def test_uid_is_stable_and_distinct():
    assert uid_for("http://a/1.jpg") == uid_for("http://a/1.jpg")
    assert uid_for("http://a/1.jpg") != uid_for("http://a/2.jpg")
    assert len(uid_for("x")) == 20
    # the rule is part of the contract: a change here would break joins with old manifests
    assert uid_for("http://127.0.0.1:8765/img/000001.jpg") == "54944e7a39bbd49e0961"


def test_round_trip(tmp_path):
    df = crawl_rows()
    write_manifest(df, tmp_path / "m.parquet", CRAWL)
    back = read_manifest(tmp_path / "m.parquet", CRAWL)
    assert back["uid"].tolist() == df["uid"].tolist()
    assert back["width"].tolist() == [64, 64, 64]


def test_missing_column_duplicate_uid_and_empty_required_value(tmp_path):
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['sha256'\]"):
        write_manifest(crawl_rows().drop(columns="sha256"), tmp_path / "m.parquet", CRAWL)
    dup = pd.concat([crawl_rows(), crawl_rows(1)])
    with pytest.raises(ManifestError, match="appears more than once"):
        write_manifest(dup, tmp_path / "m.parquet", CRAWL)
    empty = crawl_rows()
    empty.loc[1, "url"] = None
    with pytest.raises(ManifestError, match="column 'url' .* has empty values"):
        write_manifest(empty, tmp_path / "m.parquet", CRAWL)
    assert not (tmp_path / "m.parquet").exists()  # nothing half-written


def test_truncated_file_gets_a_clear_message(tmp_path):
    path = write_manifest(crawl_rows(100), tmp_path / "m.parquet", CRAWL)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match=r"m.parquet: not a complete parquet file .* --force"):
        read_manifest(path, CRAWL)


def test_plain_parquet_and_missing_file_are_refused(tmp_path):
    crawl_rows().to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ManifestError, match="not a webdistill manifest"):
        read_manifest(tmp_path / "plain.parquet", CRAWL)
    with pytest.raises(ManifestError, match="crawl manifest not found"):
        read_manifest(tmp_path / "nope.parquet", CRAWL)
