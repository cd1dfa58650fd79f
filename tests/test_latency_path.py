"""The concurrency-1 path adds no avoidable hops (issue 8, item 6; timings are in bench/serving.py).

- Every FastAPI dependency of the inference routes is a coroutine function: FastAPI runs a sync
  dependency in the threadpool, one thread hop (and a wake-up of the event loop) per request.
- The ONNX Runtime spinning policy reaches the session: "run" spins between operators but stops at
  the end of every run, "off" never spins, "always" keeps ONNX Runtime's default, and "idle" (the
  default) runs a batch that is all the work in flight on an always-spinning session and any other
  batch on one that stops spinning when its run ends ("run"), both built at load.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import ValidationError

from export import read_repository
from service import api_repository, api_v1, api_v2
from service.runtimes.ort import SPINNING_CONFIG, OnnxRuntime
from service.settings import Settings

ROUTERS = (api_v1.router, api_v2.router, api_repository.router)
ROUTES = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for child in dependant.dependencies:
        yield child
        yield from _dependencies(child)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{sorted(r.methods)[0]} {r.path}")
def test_routes_have_only_async_dependencies(route: APIRoute) -> None:
    sync = [
        d.call.__name__ for d in _dependencies(route.dependant) if not inspect.iscoroutinefunction(d.call)
    ]
    assert not sync, f"{route.path} has sync dependencies {sync}: each costs a threadpool hop per request"
    assert inspect.iscoroutinefunction(route.endpoint)


def test_inference_routes_declare_dependencies() -> None:
    """The check above is not vacuous: the inference routes do resolve state and deadline as dependencies."""
    classify = next(r for r in ROUTES if r.path == "/v1/classify")
    names = {d.call.__name__ for d in _dependencies(classify.dependant)}
    assert {"ready_state", "get_state", "deadline", "route_overrides"} <= names


@pytest.mark.parametrize("policy", sorted(SPINNING_CONFIG))
def test_spinning_policy_reaches_the_session(photo_repository: Path, policy: str) -> None:
    entry = min(read_repository(photo_repository), key=lambda e: e.tokens)
    options = OnnxRuntime(entry, threads=2, spinning=policy).session.get_session_options()
    read = options.get_session_config_entry
    assert read("session.intra_op.allow_spinning") == ("0" if policy == "off" else "1")
    if policy == "run":
        assert read("session.force_spinning_stop") == "1"
        assert int(read("session.intra_op.spin_duration_us")) > 0
    else:
        with pytest.raises(RuntimeError):
            read("session.force_spinning_stop")


def _stops_spinning(session: ort.InferenceSession) -> bool:
    """Whether the workers stop spinning at the end of each run ("run"); "always" has no such entry."""
    try:
        return session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    except RuntimeError:
        return False


def test_idle_spinning_spins_only_for_a_batch_that_is_all_the_work_in_flight(photo_repository: Path) -> None:
    entry = min(read_repository(photo_repository), key=lambda e: e.tokens)
    in_flight = [1]
    runtime = OnnxRuntime(entry, threads=2, spinning="idle", demand=lambda: in_flight[0])
    assert runtime.busy_session is not None, "the busy session is built at load, not on the first overlap"
    assert not _stops_spinning(runtime.session)
    assert _stops_spinning(runtime.busy_session)
    image = np.random.default_rng(0).standard_normal((2, *entry.input_shape), dtype=np.float32)
    in_flight[0] = 2
    assert runtime.session_for(2) is runtime.session, "a batch holding every request in flight spins"
    alone = runtime.run(image)
    in_flight[0] = 3
    assert runtime.session_for(2) is runtime.busy_session
    beside = runtime.run(image)
    for role in ("logits", "embedding"):
        np.testing.assert_allclose(beside[role], alone[role], rtol=1e-5, atol=1e-5)
    assert OnnxRuntime(entry, threads=2, spinning="always").busy_session is None
    with pytest.raises(ValueError, match="demand"):
        OnnxRuntime(entry, threads=2, spinning="idle")


def test_spinning_policy_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().ort_spinning == "idle"
    monkeypatch.setenv("VITSERVE_ORT_SPINNING", "always")
    assert Settings().ort_spinning == "always"
    monkeypatch.setenv("VITSERVE_ORT_SPINNING", "true")
    with pytest.raises(ValidationError, match="'idle', 'off', 'run' or 'always'"):
        Settings()
