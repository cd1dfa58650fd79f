"""The Triton-layout model repository: atomic writes by export, typed reads by the service.

Layout (one entry per backbone and input shape; `<entry>` is `<backbone>_<S>` for a square S x S,
`<backbone>_<H>x<W>` otherwise, see export/shapes.py):
    <repository>/<entry>/config.pbtxt
    <repository>/<entry>/labels.txt
    <repository>/<entry>/<version>/model.onnx | model.pt (+ model.pt2)
Entries are assembled in a hidden staging directory and renamed into place, so a failed export
leaves no half-written entry and a reader never sees one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.text_format import ParseError

from export.errors import ExportError
from export.shapes import Shape, as_shape, parse_shape
from export.triton_config import LABELS_FILENAME, parse_text
from models.config import BackboneConfig

STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class ModelEntry:
    """One servable entry as the gateway and runtimes see it.

    `shape` is the (height, width) the artifact takes; `bucket` is its long side (the side of a
    square bucket), kept for the square-bucket routing policy and metrics.
    """

    name: str
    path: Path
    version: int
    artifact: Path
    platform: str
    backbone: str
    arch: str
    config: BackboneConfig
    shape: Shape
    tokens: int
    precision: str
    attention: tuple[str, ...]
    max_batch_size: int
    max_queue_delay_us: int
    input_name: str
    input_shape: tuple[int, ...]
    logits_name: str
    embedding_name: str
    labels: tuple[str, ...]

    @property
    def bucket(self) -> int:
        return max(self.shape)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.config.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.config.std

    @property
    def pt2_artifact(self) -> Path | None:
        """The torch.export program beside a TorchScript artifact, when export wrote one."""
        candidate = self.artifact.with_suffix(".pt2")
        return candidate if candidate.exists() else None


def read_entry(path: Path) -> ModelEntry:
    """Parse one entry directory; errors name the file and what is wrong with it."""
    config_path = path / "config.pbtxt"
    try:
        config = parse_text(config_path.read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"{path} is not a model entry: config.pbtxt is missing") from exc
    except ParseError as exc:
        raise ExportError(f"{config_path} is not a valid Triton ModelConfig: {exc}") from exc
    params = {k: v.string_value for k, v in config.parameters.items()}
    if "model_config" not in params:
        raise ExportError(f"{config_path} was not written by vitserve export (no model_config parameter)")
    versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ExportError(f"{path} has no numeric version directory")
    artifact = path / str(versions[-1]) / (config.default_model_filename or "model.onnx")
    if not artifact.exists():
        raise ExportError(f"{path}: version {versions[-1]} has no {artifact.name}")
    labels_path = path / params.get("labels_file", LABELS_FILENAME)
    labels = tuple(labels_path.read_text().splitlines()) if labels_path.exists() else ()
    logits, embedding = (o.name for o in config.output)
    dynamic = config.dynamic_batching
    return ModelEntry(
        name=config.name,
        path=path,
        version=versions[-1],
        artifact=artifact,
        platform=config.platform,
        backbone=params["backbone"],
        arch=params["arch"],
        config=BackboneConfig.from_dict(json.loads(params["model_config"])),
        shape=as_shape(parse_shape(params["bucket"])),
        tokens=int(params["tokens"]),
        precision=params.get("precision", "fp32"),
        attention=tuple(params["attention"].split(",")),
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=dynamic.max_queue_delay_microseconds,
        input_name=config.input[0].name,
        input_shape=tuple(config.input[0].dims),
        logits_name=logits,
        embedding_name=embedding,
        labels=labels,
    )


def read_repository(root: Path) -> list[ModelEntry]:
    """Every entry under `root`, sorted by (backbone, shape); staging directories are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise ExportError(
            f"model repository {root} does not exist; build it with `make export` or `vitserve export`"
        )
    entries = [read_entry(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return sorted(entries, key=lambda e: (e.backbone, e.shape))


def ensure_writable(root: Path) -> list[Path]:
    """Create the repository if needed and prove it accepts new directories, before any work is done.

    Returns the directories it created (deepest first), so a failed export can remove them again
    and leave the filesystem as it found it.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ExportError(f"model repository {root} is a file, not a directory; choose --repository DIR")
    created = [path for path in (root, *root.parents) if not path.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f"{STAGING_PREFIX}probe-{uuid.uuid4().hex}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        remove_created(created)
        raise ExportError(
            f"model repository {root} is not writable ({exc.strerror}); choose --repository DIR"
        ) from exc
    return created


def remove_created(created: list[Path]) -> None:
    """Remove directories `ensure_writable` created, deepest first, if they are still empty."""
    for path in created:
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


@contextmanager
def staging(root: Path, entry: str) -> Iterator[Path]:
    """A hidden directory to assemble an entry in; removed if the body fails."""
    path = root / f"{STAGING_PREFIX}{entry}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def publish(staged: Path, root: Path, entry: str) -> Path:
    """Move a staged entry into place, replacing an older one with two renames (never half-visible)."""
    final = root / entry
    retired = None
    if final.exists():
        retired = root / f"{STAGING_PREFIX}retired-{entry}-{uuid.uuid4().hex[:8]}"
        os.replace(final, retired)
    os.replace(staged, final)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return final
