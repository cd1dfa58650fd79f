"""Export refuses bad requests with a clear error and leaves the repository exactly as it was.

Every failure is checked through the Python API (ExportError naming the problem) and the repository
is compared file by file before and after: no entry, no `.staging-*` leftovers, no directory created.
The CLI turns the same errors into `error: ...` and a non-zero exit; one test runs it as a real
subprocess end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import export.pipeline
import export.verify
from export import ExportError, ExportRequest, VerificationError, export_model, read_entry, read_repository
from models import build_model, save_checkpoint
from service.cli import main
from support.digits import digits_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VIT = "vit_tiny_patch16_224"
SMALL_VIT = {"embed_dim": 32, "num_heads": 2, "depth": 2, "num_classes": 10}
SWIN = "swin_tiny_patch4_window7_224"
SMALL_SWIN = {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "num_classes": 10}


def _quiet(_: str) -> None:
    """Export logs its verification numbers; these tests look at what it raised and wrote."""


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden `.staging-*` ones included) with file contents; {} if root is missing."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.fixture
def repository(tmp_path) -> Path:
    """A repository that already holds an unrelated entry, so 'unchanged' means more than 'still empty'."""
    root = tmp_path / "model_repository"
    (root / "other_224" / "1").mkdir(parents=True)
    (root / "other_224" / "config.pbtxt").write_text('name: "other_224"\n')
    (root / "other_224" / "1" / "model.onnx").write_bytes(b"\x08\x07")
    return root


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint with the digits ViT's architecture (patch 4, 64 wide, 3 deep), carrying its config."""
    return save_checkpoint(
        build_model(digits_config("vit")), tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    )


def _request(root: Path, **fields) -> ExportRequest:
    return ExportRequest(
        **{"model": VIT, "overrides": SMALL_VIT, "buckets": (32,), "repository": root, **fields}
    )


def _assert_refused(request: ExportRequest, match: str, error: type[ExportError] = ExportError) -> None:
    root = Path(request.repository)
    before = _snapshot(root)
    with pytest.raises(error, match=match):
        export_model(request, log=_quiet)
    assert _snapshot(root) == before


BAD_REQUESTS = {
    "unknown model": (
        {"model": "vit_gigantic_patch99_224", "overrides": {}},
        r"unknown model 'vit_gigantic_patch99_224'",
    ),
    "unknown config field": ({"overrides": {"depthh": 2}}, r"unknown vit config field\(s\) \['depthh'\]"),
    "bucket not divisible by the patch": (
        {"buckets": (32, 40)},
        r"bucket 40 is not a positive multiple of 16",
    ),
    "bucket not divisible by the window": (
        {"model": SWIN, "overrides": SMALL_SWIN, "buckets": (32,)},
        r"bucket 32 is not a positive multiple of 28 \(patch 4 x window 7\).*try 28 or 56",
    ),
    "non-positive bucket": ({"buckets": (0,)}, r"bucket 0 is not a positive multiple of 16"),
    "unknown format": ({"artifact_format": "tflite"}, r"unknown format 'tflite'"),
    "unknown precision": ({"precision": "int4"}, r"unknown precision 'int4'"),
    "unknown instance kind": (
        {"instance_kind": "tpu"},
        r"unknown instance kind 'tpu'; choose one of auto, cpu, gpu",
    ),
    "torchscript int8": (
        {"artifact_format": "torchscript", "precision": "int8"},
        r"TorchScript exports are fp32",
    ),
    "torchscript fp16": (
        {"artifact_format": "torchscript", "precision": "fp16"},
        r"TorchScript exports are fp32",
    ),
    "torchscript unfused": (
        {"artifact_format": "torchscript", "fused": False},
        r"--unfused applies to ONNX only",
    ),
    "entry name with a path": ({"name": "../escape"}, r"entry name '../escape'"),
    "hidden entry name": ({"name": ".staging-x"}, r"entry name '.staging-x'"),
    "max batch size": ({"max_batch_size": 0}, r"max batch size must be >= 1"),
    "queue delay": ({"max_queue_delay_us": -1}, r"max queue delay must be >= 0"),
    "missing checkpoint": ({"checkpoint": Path("/nonexistent/weights.safetensors")}, r"does not exist"),
}


@pytest.mark.parametrize("fields, match", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_refused_and_writes_nothing(repository, fields, match):
    _assert_refused(_request(repository, **fields), match)


def test_checkpoint_of_another_size_is_refused(repository, digits_checkpoint):
    """A digits ViT checkpoint exported as a ViT of another size names the fields that disagree."""
    request = _request(repository, checkpoint=digits_checkpoint)
    _assert_refused(
        request,
        r"cannot build vit_tiny_patch16_224 with checkpoint .*digits.safetensors.*depth: checkpoint 3, requested 2",
    )


def test_checkpoint_of_another_family_is_refused(repository, digits_checkpoint):
    request = _request(
        repository, model=SWIN, overrides=SMALL_SWIN, buckets=(56,), checkpoint=digits_checkpoint
    )
    _assert_refused(request, r"architecture mismatch: family: checkpoint 'vit', requested 'swin'")


def test_repository_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file")
    _assert_refused(
        _request(blocker / "model_repository"),
        r"model repository .*not_a_directory/model_repository is not writable",
    )
    assert blocker.read_text() == "a file"


def test_repository_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "model_repository"
    target.write_text("a file")
    _assert_refused(_request(target), r"is a file, not a directory")


@contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """`directory` made unwritable: by its mode for users; root ignores modes, so for root by the
    immutable attribute (chattr, from e2fsprogs: apt-get install e2fsprogs)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_read_only_repository_is_refused(repository):
    with _read_only(repository):
        _assert_refused(
            _request(repository), r"is not writable \((Permission denied|Operation not permitted)\)"
        )


def test_verification_failure_fails_the_export_and_writes_nothing(tmp_path, monkeypatch):
    """With a zero tolerance the export's own PyTorch comparison fails; neither the entry nor the
    repository directory it would have created are left behind."""
    monkeypatch.setitem(export.verify.REL_TOLERANCE, "fp32", 0.0)
    root = tmp_path / "model_repository"
    _assert_refused(
        _request(root, buckets=(32, 64)),
        r"onnx/fp32 export at bucket 32 failed verification: logits relative error",
        VerificationError,
    )
    assert not root.exists()


def test_graph_without_fused_attention_fails_verification(repository, monkeypatch):
    """A fused export whose graph lost its Attention nodes (here: really exported unfused) is rejected."""
    real_export = export.pipeline.export_onnx
    monkeypatch.setattr(
        export.pipeline, "export_onnx", lambda *a, fused, **kw: real_export(*a, fused=not fused, **kw)
    )
    _assert_refused(
        _request(repository),
        r"graph has 0 fused attention and 2 Softmax nodes, expected 2 and 0",
        VerificationError,
    )


def test_exporter_crash_at_second_bucket_publishes_neither(repository, monkeypatch):
    """Buckets are staged and verified before any is published: a crash at 64 leaves 32 unpublished too,
    and surfaces as an ExportError naming the bucket rather than a bare exporter traceback."""
    real_export = export.pipeline.export_onnx

    def crash_at_64(model, bucket, path, **kw):
        if bucket == 64:
            raise RuntimeError("unsupported operator")
        real_export(model, bucket, path, **kw)

    monkeypatch.setattr(export.pipeline, "export_onnx", crash_at_64)
    request = _request(repository, buckets=(32, 64))
    _assert_refused(
        request,
        r"onnx/fp32 export of vit_tiny_patch16_224 at bucket 64 failed \(RuntimeError: unsupported operator\)",
    )


def test_reexport_replaces_an_entry_and_a_failed_one_keeps_it(repository, monkeypatch):
    (first,) = export_model(_request(repository, max_batch_size=4), log=_quiet)
    (second,) = export_model(_request(repository, max_batch_size=8), log=_quiet)
    assert second.path == first.path and read_entry(second.path).max_batch_size == 8
    assert sorted(p.name for p in repository.iterdir()) == ["other_224", "vit_tiny_patch16_224_32"]
    monkeypatch.setitem(export.verify.REL_TOLERANCE, "fp32", 0.0)
    _assert_refused(_request(repository, max_batch_size=16), r"failed verification", VerificationError)
    assert read_entry(second.path).max_batch_size == 8


def test_cli_reports_errors_and_exits_non_zero(repository, capsys):
    before = _snapshot(repository)
    cases = {
        ("--model", "vit_gigantic_patch99_224"): "error: unknown model 'vit_gigantic_patch99_224'",
        ("--model", VIT, "--buckets", "40"): "error: bucket 40 is not a positive multiple of 16",
        (
            "--model",
            VIT,
            "--format",
            "torchscript",
            "--precision",
            "int8",
        ): "error: TorchScript exports are fp32",
    }
    for flags, message in cases.items():
        assert main(["export", *flags, "--repository", str(repository)]) != 0
        assert capsys.readouterr().err.startswith(message)
    assert _snapshot(repository) == before


def test_cli_export_runs_end_to_end_as_a_subprocess(tmp_path):
    root = tmp_path / "model_repository"
    command = [sys.executable, "-m", "service.cli", "export", "--model", VIT]
    done = subprocess.run(
        [*command, "--buckets", "32", "--repository", str(root), "--max-batch-size", "4"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {root / 'vit_tiny_patch16_224_32'}" in done.stdout
    assert "fused attention ops 12/12, softmax 0" in done.stdout
    (entry,) = read_repository(root)
    assert entry.max_batch_size == 4 and entry.input_shape == (3, 32, 32)
    session = ort.InferenceSession(str(entry.artifact), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(None, {"pixel_values": np.zeros((4, 3, 32, 32), np.float32)})
    assert logits.shape == (4, 1000) and embedding.shape == (4, 192)
