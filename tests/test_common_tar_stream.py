"""stages/common/tar_stream.py: the same samples as webdataset's tarfile reader, and damage found."""

import io
import tarfile

import pytest
import webdataset as wds

from stages.common.tar_stream import DamagedTar, tar_members, tar_samples


def write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    """A tar of (name, bytes) members; a name ending in / is a directory."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size, info.pax_headers = len(data), {"comment": "é"}  # a PAX record before the member
            tar.addfile(info, io.BytesIO(data))
    return path


def wds_samples(paths):
    return list(wds.tarfile_to_samples()(iter({"url": str(p)} for p in paths)))


def our_samples(paths, handler=None):
    return list(tar_samples(({"url": str(p)} for p in paths), handler or (lambda e: False)))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_samples_are_webdatasets_own(tmp_path, fmt):
    long_key = "sub/" + "k" * 120  # past ustar's 100 characters: a PAX path or a GNU long name
    members = [("000.jpg", b"\xff\xd8one"), ("000.json", b"{}"), ("dir/", b""), ("__meta__", b"skip"),
               ("001.jpg", b"\xff\xd8two"), ("001.cls", b"3"), ("001.txt", b""),
               (f"{long_key}.png", b"\x89PNGthree")]
    if fmt == tarfile.USTAR_FORMAT:
        members = members[:-1]  # ustar cannot hold the long name
    shards = [write_tar(tmp_path / "a.tar", members, fmt), write_tar(tmp_path / "b.tar", [("x.jpg", b"four")], fmt)]
    ours = our_samples(shards)
    assert ours == wds_samples(shards)
    assert [s["__key__"] for s in ours][:2] == ["000", "001"] and ours[1]["cls"] == b"3"
    assert [name for name, _ in tar_members(shards[0], select=lambda n: n.endswith(".jpg"))] == ["000.jpg", "001.jpg"]


def damaged_copies(tmp_path):
    good = write_tar(tmp_path / "good.tar", [(f"{i:03d}.jpg", bytes([i]) * 700) for i in range(6)])
    data = good.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:data.index(b"\x03" * 700) + 300])  # inside the fourth image
    header_hit = tmp_path / "header.tar"
    second = data.index(b"001.jpg")  # the second member's ustar header (after its PAX header)
    header_hit.write_bytes(data[:second + 130] + b"\x07" + data[second + 131:])  # a byte of its mode field
    return good, truncated, header_hit


def test_damage_ends_the_shard_with_an_error_after_what_was_readable(tmp_path):
    good, truncated, header_hit = damaged_copies(tmp_path)
    seen = []
    samples = our_samples([truncated, header_hit, good], handler=lambda e: seen.append(e) or True)
    keys = [(s["__url__"].rsplit("/", 1)[1], s["__key__"]) for s in samples]
    assert [k for s, k in keys if s == "truncated.tar"] == ["000", "001", "002"]
    assert ("header.tar", "000") in keys and ("header.tar", "001") not in keys  # stops at the bad checksum
    assert [k for s, k in keys if s == "good.tar"] == [f"{i:03d}" for i in range(6)]  # the next shard is whole
    assert len(seen) == 2 and all(isinstance(e, DamagedTar) for e in seen)
    assert "runs past the end" in str(seen[0]) and "checksum" in str(seen[1])
    with pytest.raises(DamagedTar, match="truncated"):  # without a handler that goes on, the error surfaces
        our_samples([truncated])


def test_a_header_that_is_not_one_is_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all " * 64)
    with pytest.raises(DamagedTar, match="not a tar header|checksum"):
        list(tar_members(junk))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert list(tar_members(empty)) == []
