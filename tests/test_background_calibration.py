"""`VITSERVE_CALIBRATION_MODE=background`, the start-up `make serve` uses: the server is ready before any
entry is measured, routes on FLOP estimates (saying so) and batches up to config.pbtxt's limit until
then; once the background task has measured every entry, routes carry the measured costs, each
batcher the best measured batch, and VITSERVE_CALIBRATION_OUT holds what was measured. Costs from a
calibration file hold from the first request in either mode.

In-process on the real photo repository and ONNX Runtime, so "before any measurement" is exact: the
background task cannot run before `start()` returns control to the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from export.repository import read_repository
from service.calibration import ESTIMATED, FILE, MEASURED, EntryCost, read_calibration, write_calibration
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServingState

# Both backbones are candidates for a small landscape image.
HEIGHT, WIDTH = 240, 320
CALIBRATION_TIMEOUT_S = 300
# Every batch-1 run takes longer than this, so each entry is measured at batch 1 only and its best
# batch becomes 1: the re-planned batch limit differs from config.pbtxt's for every entry.
MAX_RUN_S = 1e-6


def candidate_sources(state: ServingState) -> set[str]:
    return {candidate.cost_source for candidate in state.router.route(HEIGHT, WIDTH).candidates}


async def start_and_calibrate(settings: Settings) -> None:
    state = ServingState(settings=settings, metrics=Metrics())
    await state.start()
    try:
        assert state.ready and state.costs == {}
        assert candidate_sources(state) == {ESTIMATED}
        for entry in state.entries.values():
            assert entry.max_batch_size > 1
            assert state.batcher(entry).rows == min(
                entry.max_batch_size, max(1, settings.max_batch_tokens // entry.tokens)
            ), entry.name

        await asyncio.wait_for(state.background_calibration, CALIBRATION_TIMEOUT_S)

        assert {name: cost.source for name, cost in state.costs.items()} == dict.fromkeys(
            state.entries, MEASURED
        )
        assert candidate_sources(state) == {MEASURED}
        assert {name: set(cost.seconds) for name, cost in state.costs.items()} == dict.fromkeys(
            state.entries, {1}
        )
        assert {name: state.batcher(entry).rows for name, entry in state.entries.items()} == dict.fromkeys(
            state.entries, 1
        )
        written = read_calibration(settings.calibration_out)
        assert {name: dict(cost.seconds) for name, cost in written.items()} == {
            name: dict(cost.seconds) for name, cost in state.costs.items()
        }
    finally:
        await state.stop()


def test_ready_on_estimates_then_measured_in_the_background(photo_repository: Path, tmp_path: Path) -> None:
    settings = Settings(
        repository=photo_repository,
        calibration_mode="background",
        calibration_out=tmp_path / "calibration.yaml",
        calibration_max_run_s=MAX_RUN_S,
    )
    asyncio.run(start_and_calibrate(settings))


async def start_on_file_costs(settings: Settings, expected: dict[str, EntryCost]) -> None:
    state = ServingState(settings=settings, metrics=Metrics())
    await state.start()
    try:
        if state.background_calibration is not None:
            await asyncio.wait_for(state.background_calibration, CALIBRATION_TIMEOUT_S)
        assert state.costs == expected
        assert candidate_sources(state) == {FILE}
        assert {name: state.batcher(entry).rows for name, entry in state.entries.items()} == dict.fromkeys(
            state.entries, 2
        )
    finally:
        await state.stop()


@pytest.mark.parametrize("mode", ["startup", "background"])
def test_calibration_file_costs_are_used_from_the_start_and_never_remeasured(
    photo_repository: Path, tmp_path: Path, mode: str
) -> None:
    """Entries in VITSERVE_CALIBRATION keep the file's costs in either mode; each batch limit is the
    file's best batch (batch 2 here: batch 4 does not pay for its latency)."""
    costs = {
        entry.name: EntryCost({1: 0.010, 2: 0.015, 4: 0.034}, FILE)
        for entry in read_repository(photo_repository)
    }
    path = tmp_path / "calibration.yaml"
    write_calibration(path, costs)
    settings = Settings(repository=photo_repository, calibration_mode=mode, calibration=path)
    asyncio.run(start_on_file_costs(settings, costs))
