"""Artifacts made by the project's own export code, and callables that run them on a fixed batch.

Every artifact goes through `export.export_model` (which verifies it against PyTorch) and is read
back with `export.read_repository`, so the benchmarks measure exactly what the service would load.
Eager models are built as the export builds them (`export.pipeline.seeded_model`), so eager and
exported variants share weights.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.timing import Runner
from export import ExportRequest, ModelEntry, export_model, read_repository
from export.onnx_export import export_onnx
from export.pipeline import seeded_model
from export.shapes import ShapeSpec, as_shape, shape_name

SEED = 0


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def export_entry(
    model: str, repository: Path, bucket: ShapeSpec, artifact_format: str = "onnx", precision: str = "fp32"
) -> ModelEntry:
    """Export `model` at `bucket` (a side or (height, width)) into `repository` and return the entry
    as the service reads it."""
    name = f"{model}-{artifact_format}-{precision}"
    request = ExportRequest(
        model=model,
        repository=repository,
        buckets=(bucket,),
        artifact_format=artifact_format,
        precision=precision,
        name=name,
    )
    export_model(request, log=_log)
    entries = [e for e in read_repository(repository) if e.backbone == name and e.shape == as_shape(bucket)]
    if len(entries) != 1:
        raise RuntimeError(
            f"expected one entry {name} at bucket {shape_name(bucket)} in {repository}, found {len(entries)}"
        )
    return entries[0]


def eager_model(model: str) -> torch.nn.Module:
    """The registry model with the same seeded weights the exports use."""
    return seeded_model(model).eval()


def random_batch(batch: int, size: ShapeSpec) -> np.ndarray:
    """Seeded normal pixels, (batch, 3, H, W) for a side or an (H, W) shape."""
    return np.random.default_rng(SEED).standard_normal((batch, 3, *as_shape(size)), dtype=np.float32)


def torch_runner(module: torch.nn.Module | torch.jit.ScriptModule, pixels: np.ndarray) -> Runner:
    """Forward `pixels` through an eager or TorchScript module without autograd bookkeeping."""
    tensor = torch.from_numpy(pixels)

    def run() -> object:
        with torch.inference_mode():
            return module(tensor)

    return run


def load_torchscript(entry: ModelEntry) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(entry.artifact)).eval()


def named_entries(repository: Path, names: list[str]) -> dict[str, ModelEntry]:
    """The entries of `repository` called `names`; exits naming the ones it lacks and what it has."""
    entries = {entry.name: entry for entry in read_repository(repository)}
    missing = sorted(set(names) - set(entries))
    if missing:
        raise SystemExit(f"{repository} has no entries {missing}; it has {sorted(entries)}")
    return {name: entries[name] for name in names}


def setting_cells(
    repository: Path,
    names: list[str],
    batches: list[int],
    settings: Callable[[ModelEntry], Mapping[str, Callable[[np.ndarray], Runner]]],
) -> dict[tuple, Runner]:
    """(entry, batch, setting) -> runner, for each named entry of `repository` and each batch.

    `settings(entry)` maps each setting to what makes its runner from a batch of random pixels; it
    is called once per entry, so the sessions it builds serve every batch."""
    cells: dict[tuple, Runner] = {}
    for name, entry in named_entries(repository, names).items():
        makers = settings(entry)
        for batch in batches:
            pixels = np.ascontiguousarray(random_batch(batch, entry.shape))
            for setting, make in makers.items():
                cells[(name, batch, setting)] = make(pixels)
    return cells


def ort_session(
    artifact: Path, threads: int, lean: bool = False, mem_pattern: bool | None = None
) -> ort.InferenceSession:
    """CPU session configured as the embedded runtime serves: all graph optimizations, `threads` intra-op.

    `lean` turns off the CPU memory arena and the memory pattern, trading speed for a smaller
    resident set at high resolution (bench.peak_memory measures both); `mem_pattern` overrides the
    memory pattern alone (bench.mem_pattern compares it on and off).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if lean:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    if mem_pattern is not None:
        options.enable_mem_pattern = mem_pattern
    return ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])


def session_runner(session: ort.InferenceSession, pixels: np.ndarray) -> Runner:
    """Every output of `session` on `pixels`, fed to its one input (artifacts outside a repository too)."""
    feed = {session.get_inputs()[0].name: pixels}
    return lambda: session.run(None, feed)


def unverified_onnx(model: str, bucket: ShapeSpec, path: Path) -> Path:
    """`model` (seeded weights) exported by the project's exporter at `bucket`, without the verification
    `export_entry` runs: verifying at batch 3 in PyTorch and ONNX Runtime is out of reach for a global
    model at 2048 (three 16384-token score matrices per head in ONNX Runtime, over 18 GiB)."""
    export_onnx(eager_model(model), bucket, path)
    return path


def ort_runner(session: ort.InferenceSession, entry: ModelEntry, pixels: np.ndarray) -> Runner:
    feed = {entry.input_name: pixels}
    outputs = [entry.logits_name, entry.embedding_name]
    return lambda: session.run(outputs, feed)
