"""The standalone loader's copies of file hashing (it imports nothing of precompile) agree with `hashed_copy`."""

from __future__ import annotations

import hashlib

import pytest

from precompile import loader
from precompile.io.hashed_copy import blob_sha256, file_sha256


@pytest.mark.parametrize("size", [0, 1, (16 << 20) + 3])  # empty, tiny, and across the 16 MiB read block
def test_loader_hashes_a_file_as_files_does(tmp_path, size):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    want = hashlib.sha256(p.read_bytes()).hexdigest()
    assert loader._sha256(p) == file_sha256(p) == want


def test_loader_reads_a_hub_blob_name_as_files_does(tmp_path):
    """A hub cache's snapshot file links to a blob named by its sha256: both copies take the name; a plain
    file, a link to a file named otherwise, or a blob name that is not a sha256 gives None in both."""
    blobs = tmp_path / "models--org--name" / "blobs"
    snap = tmp_path / "models--org--name" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    sha = hashlib.sha256(b"weights").hexdigest()
    cases = {sha: True, sha.upper(): False, sha[:-1]: False, "not-a-hash": False}
    for name, named in cases.items():
        (blobs / name).write_bytes(b"weights")
        link = snap / f"link-{len(name)}-{name[:4]}"
        link.symlink_to(blobs / name)
        assert loader._blob_sha256(link) == blob_sha256(link) == (name if named else None)
    plain = snap / "plain"
    plain.write_bytes(b"weights")
    assert loader._blob_sha256(plain) is None and blob_sha256(plain) is None
    (blobs / sha).write_bytes(b"edited in the cache")  # files trusts the name; the loader's _sha256 reads the bytes
    assert file_sha256(snap / f"link-64-{sha[:4]}") == sha
    assert loader._sha256(snap / f"link-64-{sha[:4]}") == hashlib.sha256(b"edited in the cache").hexdigest()
