"""A checkpoint's identity for KV hand-offs: SHA-256 over its config.json and the SHA-256 of every
weight file's whole content, so that it changes whenever any weight does. A Hub snapshot's weight
files are links to blobs named by that very hash (the Hub's LFS object id), which is taken as is;
other files are hashed, in parallel across files (about 1.4 GB/s per core: `bench/fingerprint.py`)."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.engine.loader import safetensors_files

READ_BYTES = 16 * 2**20
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def model_fingerprint(model_dir: Path, random_seed: int | None = None) -> str:
    """Two workers may exchange KV only when these agree. `random_seed`: the weights are random
    (`--load-format dummy`), made from the config and this seed; the files are not read."""
    digest = hashlib.sha256(b"pdserve-model-v2\n")
    digest.update(hashlib.sha256((model_dir / "config.json").read_bytes()).digest())
    if random_seed is not None:
        digest.update(f"random weights, seed {random_seed}".encode())
        return digest.hexdigest()[:32]
    files = safetensors_files(model_dir)
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
        file_digests = list(pool.map(file_sha256, files))  # hashlib releases the GIL on large reads
    for file, file_digest in zip(files, file_digests):
        digest.update(f"{file.name}\0{file_digest}\n".encode())
    return digest.hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """`sha256sum path`; for a Hub cache link to `blobs/<sha256>`, that name."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256_NAME.fullmatch(target.name):
        return target.name
    digest = hashlib.sha256()
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with open(target, "rb", buffering=0) as file:
        while num_read := file.readinto(buffer):
            digest.update(view[:num_read])
    return digest.hexdigest()
