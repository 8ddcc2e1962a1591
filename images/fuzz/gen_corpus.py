#!/usr/bin/env python3
"""Writes the seed corpus of the `unpack` fuzz target into corpus/unpack/.

Each seed is one mode byte (0: plain tar, 1: tar to gzip, 2: gzip bytes as they are; see
fuzz_targets/unpack.rs) followed by a layer: a few valid tiny layers covering every entry kind
the unpacker handles, and hostile ones aiming outside the layer root. Run from anywhere:
    python3 images/fuzz/gen_corpus.py
Needs GNU tar (for its sparse formats). Deterministic: same seeds every run.
"""

import gzip
import io
import os
import subprocess
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "unpack")
MTIME = 1_700_000_000


def info(name, kind=tarfile.REGTYPE, data=b"", mode=None, link="", uid=0, gid=0, pax=None):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    ti.uid, ti.gid, ti.mtime = uid, gid, MTIME
    ti.linkname = link
    ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    if pax:
        ti.pax_headers = pax
    return ti, data


def tar(entries, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if ti.size else None)
    return trim(buf.getvalue())


def gnu_tar(fmt, build):
    """A tar written by GNU tar itself, of a tree `build(dir)` makes."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src")
        os.mkdir(src)
        build(src)
        out = os.path.join(d, "out.tar")
        subprocess.run(
            ["tar", f"--format={fmt}", "--sparse", "--blocking-factor=1", "--numeric-owner", "--owner=0", "--group=0",
             f"--mtime=@{MTIME}", "--sort=name", "-cf", out, "-C", src, "."],
            check=True,
        )
        with open(out, "rb") as f:
            return f.read()


def sparse_tree(src):
    with open(os.path.join(src, "sparse.img"), "wb") as f:
        f.write(b"HEAD")
        f.seek(300_000)
        f.write(b"MIDDLE")
        f.truncate(1 << 20)


def seeds():
    basic = tar([
        info("./", tarfile.DIRTYPE),
        info("etc/", tarfile.DIRTYPE),
        info("etc/hostname", data=b"box\n"),
        info("bin/", tarfile.DIRTYPE),
        info("bin/busybox", data=b"\x7fELF", mode=0o4755),
        info("bin/sh", tarfile.SYMTYPE, link="busybox"),
        info("bin/ls", tarfile.LNKTYPE, link="bin/busybox"),
        info("tmp/", tarfile.DIRTYPE, mode=0o1777),
        info("home/user/", tarfile.DIRTYPE, uid=1000, gid=1000),
    ])
    yield "valid-basic", 0, basic
    yield "valid-basic-gzip-here", 1, basic
    yield "valid-basic-gzip-stream", 2, gzip.compress(basic, mtime=0)
    yield "valid-whiteouts", 0, tar([
        info("dir/", tarfile.DIRTYPE),
        info("dir/.wh..wh..opq"),
        info("dir/new", data=b"new"),
        info(".wh.gone"),
        info("dir/.wh.old"),
    ])
    yield "valid-pax", 0, tar([
        info("x" * 150 + "/", tarfile.DIRTYPE),
        info("x" * 150 + "/" + "y" * 120, data=b"long path",
             pax={"SCHILY.xattr.user.note": "hi", "uid": "4000000", "mtime": "1700000000.5"}),
        info("long-link", tarfile.SYMTYPE, link="z" * 200),
    ], fmt=tarfile.PAX_FORMAT)
    yield "valid-gnu-longname", 0, tar([
        info("n" * 180, data=b"gnu long name"),
        info("l" * 160, tarfile.LNKTYPE, link="n" * 180),
    ])
    yield "valid-special", 0, tar([
        info("dev/", tarfile.DIRTYPE),
        info("dev/fifo", tarfile.FIFOTYPE),
    ])
    yield "valid-gnu-sparse", 0, gnu_tar("gnu", sparse_tree)
    yield "valid-pax-sparse", 0, gnu_tar("posix", sparse_tree)

    yield "hostile-dotdot", 0, tar([info("../escape", data=b"x"), info("a/../../escape2", data=b"x")])
    yield "hostile-absolute", 0, tar([info("/tmp/deliverous-fuzz-abs", data=b"x")])
    yield "hostile-symlink-parent", 0, tar([
        info("out", tarfile.SYMTYPE, link="../outside"),
        info("out/canary", data=b"overwritten"),
    ])
    yield "hostile-symlink-abs-parent", 0, tar([
        info("etc", tarfile.SYMTYPE, link="/etc"),
        info("etc/deliverous-fuzz", data=b"x"),
    ])
    yield "hostile-hardlink-escape", 0, tar([
        info("up", tarfile.SYMTYPE, link=".."),
        info("h", tarfile.LNKTYPE, link="up/outside/canary"),
        info("h2", tarfile.LNKTYPE, link="../outside/canary"),
    ])
    yield "hostile-hardlink-to-symlink-then-write", 0, tar([
        info("s", tarfile.SYMTYPE, link="../outside/canary"),
        info("h", tarfile.LNKTYPE, link="s"),
        info("h", data=b"through the link?"),
    ])
    yield "hostile-dir-swapped-for-symlink", 0, tar([
        info("d/", tarfile.DIRTYPE),
        info("d", tarfile.SYMTYPE, link="../outside"),
        info("d/dir/inner", data=b"x"),
    ])
    yield "hostile-whiteout-outside", 0, tar([info("../.wh.outside"), info("up", tarfile.SYMTYPE, link=".."), info("up/.wh.outside")])
    yield "hostile-overlay-xattr", 0, tar([
        info("d/", tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.redirect": "/../outside"}),
    ], fmt=tarfile.PAX_FORMAT)
    truncated = tar([info("big", data=b"A" * 5000)])
    yield "hostile-truncated", 0, truncated[:1536]
    huge = bytearray(tar([info("huge", data=b"")]))
    # size field (offset 124, 12 bytes) set to the largest octal value, checksum fixed.
    huge[124:136] = b"77777777777\0"
    huge[148:156] = b"        "
    huge[148:156] = (b"%06o\0 " % sum(huge[:512]))
    yield "hostile-huge-size", 0, bytes(huge)
    yield "hostile-gzip-bomb-ish", 2, gzip.compress(b"\0" * (1 << 20), mtime=0)


def trim(layer):
    """Drops the tar's record padding: what follows the end-of-archive marker only makes seeds
    larger, and libFuzzer's inputs as long as the longest seed."""
    end = len(layer.rstrip(b"\0"))
    end = (end + 511) // 512 * 512
    return layer[:end] + b"\0" * 1024 if end + 1024 < len(layer) else layer


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, mode, layer in seeds():
        with open(os.path.join(OUT, name + ".bin"), "wb") as f:
            f.write(bytes([mode]) + layer)
        print(f"{name}.bin: {1 + len(layer)} bytes")


if __name__ == "__main__":
    main()
