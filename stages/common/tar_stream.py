"""A shard's samples read from a memory map: what webdataset's ``tarfile_to_samples`` yields, without
Python's ``tarfile``.

``tarfile`` parses every header in Python, the PAX record img2dataset writes before each member
included: on the demo's small images that was half of the score loader's CPU time (profiled: 0.66 of
1.34 s for 977 images), and on a CPU the loader shares its cores with the forward pass. wids,
webdataset's indexed reader, parses ustar headers with one ``struct`` call on a memory map
(``wids.wids_mmtar.parse_tar_header``); this walks the members that way, in order, keeping the checks
``tarfile`` makes so that a damaged shard still ends in an error, not in garbage: each header's
checksum, a size in octal, data inside the file. PAX ``path`` records and GNU long names give the
member's name as ``tarfile`` would; other member kinds (directories, links) are skipped as
webdataset skips them. Samples are grouped by webdataset's own ``group_by_keys``.
"""

import mmap
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from webdataset.tariterators import group_by_keys
from wids.wids_mmtar import parse_tar_header

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips members named like __meta__


class DamagedTar(ValueError):
    """The shard is not a readable tar from this point on."""


def tar_members(path: str | Path, select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of the tar at ``path`` that ``select`` accepts, in order;
    raises ``DamagedTar`` where the archive stops making sense (after yielding what came before)."""
    with open(path, "rb") as f:
        if not (length := f.seek(0, 2)):
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as tar:
            offset, long_name = 0, None
            while offset + BLOCK <= length:
                block = tar[offset:offset + BLOCK]
                if not any(block):  # end-of-archive marker
                    return
                header = parse_tar_header(block[:500])
                _check_sum(block, header.chksum, path, offset)
                size = _octal(header.size, path, offset)
                start = offset + BLOCK
                if start + size > length:
                    raise DamagedTar(f"{path}: the member at byte {offset} runs past the end of the file (truncated)")
                kind = header.typeflag
                if kind == b"x":  # PAX record of the next member: its path, if it gives one
                    long_name = _pax_path(tar[start:start + size], path, offset) or long_name
                elif kind == b"L":  # GNU long name of the next member
                    long_name = tar[start:start + size].rstrip(b"\0").decode("utf-8", "replace")
                else:
                    if kind in (b"0", b"\0", b"7"):  # a regular file
                        name = long_name or _ustar_name(header)
                        if not _META.match(name) and (select is None or select(name)):
                            yield name, tar[start:start + size]
                    long_name = None
                offset = start + -(-size // BLOCK) * BLOCK


def tar_samples(shards: Iterable[dict], handler: Callable[[Exception], bool],
                select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """A webdataset pipeline stage: shard dicts (``{"url": path}``) in, samples (``__key__``,
    ``__url__`` and one entry per member suffix) out. A damaged shard goes to ``handler`` after its
    readable samples; the stream goes on with the next shard if the handler returns True."""
    for shard in shards:
        url, damage = shard["url"], []

        def members():  # ends at the damage, so that the sample read before it is still yielded
            try:
                for name, data in tar_members(url, select):
                    yield {"fname": name, "data": data, "__url__": url}
            except (DamagedTar, OSError) as e:
                damage.append(e)

        try:
            yield from group_by_keys(members())
        except ValueError as e:  # a member name twice in one sample
            damage.append(e)
        for e in damage:
            if not handler(e):
                raise e


def _octal(field: bytes, path, offset: int) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise DamagedTar(f"{path}: the header at byte {offset} is not a tar header") from None


def _check_sum(block: bytes, field: bytes, path, offset: int) -> None:
    stored = _octal(field, path, offset)
    if stored == sum(block[:148]) + 8 * 32 + sum(block[156:]):  # the checksum field counts as spaces
        return
    signed = sum(struct.unpack("148b8x356b", block)) + 8 * 32  # tarfile accepts it too: old tars wrote it
    if stored != signed:
        raise DamagedTar(f"{path}: the header at byte {offset} fails its checksum")


def _ustar_name(header) -> str:
    name = header.name.split(b"\0", 1)[0].decode("utf-8", "replace")
    if header.magic.startswith(b"ustar") and (prefix := header.prefix.split(b"\0", 1)[0]):
        name = prefix.decode("utf-8", "replace") + "/" + name
    return name


def _pax_path(records: bytes, path, offset: int) -> str | None:
    """The ``path`` of a PAX extended header (records ``"<length> <key>=<value>\\n"``), if any."""
    found, position = None, 0
    while position < len(records) and records[position:position + 1] != b"\0":
        space = records.find(b" ", position)
        try:
            length = int(records[position:space])
        except ValueError:
            raise DamagedTar(f"{path}: the PAX header at byte {offset} is malformed") from None
        key, _, value = records[space + 1:position + length - 1].partition(b"=")
        if key == b"path":
            found = value.decode("utf-8", "replace")
        position += length
    return found
