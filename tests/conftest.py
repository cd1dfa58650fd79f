"""Session fixtures shared across modules: the digits data set and the models trained on it once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from support.digits import DigitsData, load_digits_images, train_digits_model
from support.repos import DigitsRepository, build_digits_repository, build_photo_repository
from support.server import ServerProcess, running_server


@pytest.fixture(scope="session", autouse=True)
def prepacked_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default ORT_PREPACKED_CACHE (on) in a directory of this session, not the user's ~/.cache:
    every gateway and pool the tests start, in process or not, maps pre-packed weights from it."""
    directory = tmp_path_factory.mktemp("prepacked")
    before = os.environ.get("VITSERVE_ORT_PREPACKED_CACHE")
    os.environ["VITSERVE_ORT_PREPACKED_CACHE"] = str(directory)
    yield directory
    if before is None:
        del os.environ["VITSERVE_ORT_PREPACKED_CACHE"]
    else:
        os.environ["VITSERVE_ORT_PREPACKED_CACHE"] = before


@pytest.fixture(scope="session")
def digits_data() -> DigitsData:
    return load_digits_images()


@pytest.fixture(scope="session")
def digits_vit(digits_data: DigitsData) -> nn.Module:
    return train_digits_model("vit", digits_data)


@pytest.fixture(scope="session")
def digits_swin(digits_data: DigitsData) -> nn.Module:
    return train_digits_model("swin", digits_data)


# --- Service tests (tests/test_service_*.py): the photo repository and one gateway serving it. ---


@pytest.fixture(scope="session")
def photo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shallow global ViT (shapes 192x256, 224, 384) and windowed Swin (448, 896), exported once per session."""
    return build_photo_repository(tmp_path_factory.mktemp("photo_repository"))


@pytest.fixture(scope="session")
def photo_server(photo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`vitserve serve` on the photo repository: default settings, routing derived from the repository."""
    with running_server(tmp_path_factory.mktemp("photo_server"), repository=photo_repository) as server:
        yield server


# --- The trained digits models exported and served (test_service_digits.py, test_explain.py). ---


@pytest.fixture(scope="session")
def digits_repository(
    tmp_path_factory: pytest.TempPathFactory, digits_vit: nn.Module, digits_swin: nn.Module
) -> DigitsRepository:
    return build_digits_repository(tmp_path_factory.mktemp("digits"), digits_vit, digits_swin)


@pytest.fixture(scope="session")
def digits_server(
    digits_repository: DigitsRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`vitserve serve` on the digits repository with its routing file (digits go to the ViT)."""
    with running_server(
        tmp_path_factory.mktemp("digits_server"),
        repository=digits_repository.path,
        routing=digits_repository.routing,
    ) as server:
        yield server
