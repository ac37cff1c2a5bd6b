"""The model identity in the KV handshake is the checkpoint's content: two checkpoints that differ in
one weight value get different fingerprints, and real workers of the two refuse to exchange KV
(FAILED_PRECONDITION naming model_id), as during a rolling upgrade to a fine-tune of the same shape."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from pdserve.engine.fingerprint import file_sha256, model_fingerprint
from tests.test_worker_auth import start
from tests.test_workers import RPC_TIMEOUT_S, assert_rpc_error, generate_request, greedy, prefill_request, reserve


def with_one_weight_changed(source: Path, target: Path) -> Path:
    """A copy of `source` whose weights differ in one value, in the middle of one tensor; the
    files keep their names and sizes."""
    shutil.copytree(source, target)
    [weights_file] = sorted(target.glob("*.safetensors"))
    tensors = load_file(weights_file)
    name = sorted(tensors)[len(tensors) // 2]
    flat = tensors[name].view(-1)
    flat[flat.numel() // 2] += 0.25
    save_file(tensors, weights_file, metadata={"format": "pt"})
    assert weights_file.stat().st_size == (source / weights_file.name).stat().st_size
    return target


@pytest.fixture(scope="module")
def changed(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_one_weight_changed(checkpoints["llama"], tmp_path_factory.mktemp("fingerprint") / "llama-changed")


def test_one_changed_weight_value_changes_the_fingerprint_and_a_copy_keeps_it(
    checkpoints: dict[str, Path], changed: Path, tmp_path: Path
) -> None:
    original = checkpoints["llama"]
    copy = shutil.copytree(original, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(original)
    assert model_fingerprint(changed) != model_fingerprint(original)
    assert model_fingerprint(original) != model_fingerprint(checkpoints["qwen2"])


def test_a_file_digest_is_the_sha256_of_its_content(checkpoints: dict[str, Path]) -> None:
    [weights_file] = sorted(checkpoints["llama"].glob("*.safetensors"))
    assert file_sha256(weights_file) == hashlib.sha256(weights_file.read_bytes()).hexdigest()


def test_a_hub_snapshot_is_identified_by_its_blob_hashes_and_agrees_with_a_plain_copy(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """In the Hub cache a weight file is a link to blobs/<its sha256>: the name is taken, the file
    is not read, and the fingerprint is the one a plain copy of the same files gets."""
    original = checkpoints["llama"]
    repo = tmp_path / "models--org--llama"
    snapshot = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in original.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert model_fingerprint(snapshot) == model_fingerprint(original)
    [weights_link] = sorted(snapshot.glob("*.safetensors"))
    weights_link.resolve().write_bytes(b"\0" * 8)  # the blob is not read: its name is the identity
    assert model_fingerprint(snapshot) == model_fingerprint(original)


def test_random_weights_are_identified_by_config_and_seed_without_reading_weights(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    config_only = tmp_path / "shape"
    config_only.mkdir()
    shutil.copy(checkpoints["llama"] / "config.json", config_only / "config.json")
    assert model_fingerprint(config_only, random_seed=0) == model_fingerprint(checkpoints["llama"], random_seed=0)
    assert model_fingerprint(config_only, random_seed=0) != model_fingerprint(config_only, random_seed=1)
    assert model_fingerprint(checkpoints["llama"], random_seed=0) != model_fingerprint(checkpoints["llama"])


def test_workers_of_checkpoints_differing_in_one_weight_refuse_to_exchange_kv(
    checkpoints: dict[str, Path], changed: Path
) -> None:
    prefill, decode = start("prefill", changed), start("decode", checkpoints["llama"])
    try:
        assert prefill.host.worker.core.model_id != decode.host.worker.core.model_id
        request = generate_request(list(range(5, 40)), greedy(4), uuid.uuid4().hex)
        stream, reservation = reserve(decode, request)
        error = assert_rpc_error(
            lambda: prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
            grpc.StatusCode.FAILED_PRECONDITION,
            "KV layout mismatch",
            "model_id: ours",
        )
        assert "dtype" not in error.details() and "num_layers" not in error.details()  # only the weights differ
        assert decode.status().kv_bytes_received == 0 and prefill.status().kv_bytes_sent == 0
        stream.cancel()
        decode.wait_idle()
        prefill.wait_idle()
    finally:
        for worker in (prefill, decode):
            worker.channel.close()
            worker.host.stop()
