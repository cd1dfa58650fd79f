"""The embedded runtime's memory settings reach its ONNX Runtime sessions (README "Memory").

The service runs without the CPU arena and without ONNX Runtime's memory pattern by default: with
one session per shape, either would keep a session's largest activations planned or held beyond a
run, and bench/mem_pattern.py measured the pattern no faster where the service runs. The
`VITSERVE_ORT_*` settings turn each back on; outputs do not depend on either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import read_repository
from service.runtimes import load_runtime
from service.settings import Settings


@pytest.mark.parametrize(
    ("environment", "arena", "pattern"),
    [({}, False, False), ({"VITSERVE_ORT_MEM_PATTERN": "1", "VITSERVE_ORT_CPU_ARENA": "1"}, True, True)],
    ids=["defaults", "both-on"],
)
def test_memory_settings_reach_the_sessions(
    photo_repository: Path, monkeypatch: pytest.MonkeyPatch, environment: dict, arena: bool, pattern: bool
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    entry = min(read_repository(photo_repository), key=lambda e: e.tokens)
    runtime = load_runtime("onnxruntime", entry, 2, settings=Settings(ort_spinning="off"))
    options = runtime.session.get_session_options()
    assert (options.enable_cpu_mem_arena, options.enable_mem_pattern) == (arena, pattern)


def test_outputs_do_not_depend_on_the_memory_pattern(photo_repository: Path) -> None:
    entry = max(read_repository(photo_repository), key=lambda e: e.tokens)
    image = np.random.default_rng(3).standard_normal((2, *entry.input_shape), dtype=np.float32)
    runtimes = [
        load_runtime("onnxruntime", entry, 2, settings=Settings(ort_spinning="off", ort_mem_pattern=on))
        for on in (False, True)
    ]
    results = [runtime.run(image) for runtime in runtimes]
    for name in ("logits", "embedding"):
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-5)
