"""Pre-packed weights saved once and mapped by every session: shared and pre-packed at once.

`SharedWeights` gives the sessions of a backbone one copy of its weights but must turn pre-packing
off, which costs 1.05-1.21x the time per run (README "Memory"). ONNX Runtime can instead write an
optimized model whose external data file holds every initializer and, next to it, the blocked
layout its MatMul/Gemm kernels pack it into (`session.save_external_prepacked_constant_initializers`);
a session loading that model maps the file and packs nothing. `PrepackedCache` does that once per
artifact and then splits the written data file by content: each initializer and its packed layouts
go into one file named by their digest, in one directory shared by every artifact. The shapes of a
backbone hold the same weights (their packed layouts are the same bytes too), so their models point
at the same files, and every session of every process maps one copy of them from the page cache:
file-backed, not private, memory.

The optimized model and the packed layout are specific to the ONNX Runtime build and the CPU that
wrote them, so the cache directory is keyed by both, and an artifact by its content.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
import onnxruntime as ort

# ONNX Runtime writes initializers at least this large to the external data file (and maps them).
MIN_EXTERNAL_BYTES = 1024
# Each layout starts on its own page so a mapped tensor never shares a page with another.
PAGE = 4096
PACKED_PREFIX = "prepacked_"
SAVE_CONFIG = {
    "session.optimized_model_external_initializers_file_name": "model.data",
    "session.optimized_model_external_initializers_min_size_in_bytes": str(MIN_EXTERNAL_BYTES),
    "session.save_external_prepacked_constant_initializers": "1",
}


@dataclass(frozen=True)
class Slice:
    """`length` bytes at `offset` of an external data file."""

    offset: int
    length: int


class PrepackedCache:
    """Optimized, pre-packed models under `root`, one per artifact, over content-addressed weights."""

    def __init__(self, root: Path):
        self.directory = root / _build_key()

    def model_for(self, artifact: Path) -> Path:
        """The optimized model for `artifact`, written on first use; loading it packs nothing."""
        model = self.directory / f"{_file_digest(artifact)}.onnx"
        if not model.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.directory, prefix=".build-") as scratch:
                self._build(artifact, Path(scratch), model)
        return model

    def _build(self, artifact: Path, scratch: Path, model: Path) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.optimized_model_filepath = str(scratch / "model.onnx")
        for key, value in SAVE_CONFIG.items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
        with open(scratch / "model.data", "rb") as data:
            for tensor in optimized.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    self._store(tensor, data)
        written = scratch / model.name
        onnx.save(optimized, str(written))
        os.replace(written, model)

    def _store(self, tensor: onnx.TensorProto, data: BinaryIO) -> None:
        """Move `tensor`'s bytes and packed layouts into their content-addressed file and point it there."""
        fields = {entry.key: entry.value for entry in tensor.external_data}
        packed = {key: _parse_packed(value) for key, value in fields.items() if key.startswith(PACKED_PREFIX)}
        slices = [Slice(int(fields["offset"]), int(fields["length"]))]
        slices += [where for _, parts in packed.values() for where, _ in parts]
        chunks = [_read(data, where) for where in slices]
        layout, blob = _pack(chunks)
        lengths = ",".join(str(len(chunk)) for chunk in chunks).encode()
        name = hashlib.blake2b(lengths + b"|" + blob, digest_size=16).hexdigest() + ".bin"
        if not (self.directory / name).exists():
            fd, partial = tempfile.mkstemp(dir=self.directory, prefix=".blob-")
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
            os.replace(partial, self.directory / name)
        fields.update(location=name, offset=str(layout[0].offset), length=str(layout[0].length))
        moved = iter(layout[1:])
        for key, (kernel, parts) in packed.items():
            placed = [next(moved) for _ in parts]
            fields[key] = kernel + "".join(
                f"|{s.offset};{s.length};{flag}" for s, (_, flag) in zip(placed, parts, strict=True)
            )
        del tensor.external_data[:]
        for key, value in fields.items():
            tensor.external_data.add(key=key, value=value)


def _parse_packed(value: str) -> tuple[str, list[tuple[Slice, str]]]:
    """A `prepacked_N` entry, 'kernel|offset;length;flag|...', as the kernel and its (slice, flag)s."""
    kernel, *parts = value.split("|")
    slices = []
    for part in parts:
        offset, length, flag = part.split(";")
        slices.append((Slice(int(offset), int(length)), flag))
    return kernel, slices


def _read(data: BinaryIO, where: Slice) -> bytes:
    data.seek(where.offset)
    return data.read(where.length)


def _pack(chunks: list[bytes]) -> tuple[list[Slice], bytes]:
    """Concatenate `chunks`, each starting on a page; their slices in the result."""
    layout, parts, offset = [], [], 0
    for chunk in chunks:
        layout.append(Slice(offset, len(chunk)))
        padding = -len(chunk) % PAGE
        parts += [chunk, b"\0" * padding]
        offset += len(chunk) + padding
    return layout, b"".join(parts)


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _build_key() -> str:
    """ONNX Runtime version and CPU: what the optimized graph and the packed layouts depend on."""
    cpu = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu += "".join(
            next((line for line in lines if line.startswith(key)), "") for key in ("flags", "model name")
        )
    except OSError:
        cpu += platform.processor()
    return f"ort-{ort.__version__}-{hashlib.blake2b(cpu.encode(), digest_size=6).hexdigest()}"


__all__ = ["PrepackedCache"]
