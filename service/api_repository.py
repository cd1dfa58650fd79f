"""Triton's model repository extension: list, load and unload entries while the server runs.

`POST /v2/repository/index` lists every entry on disk with its state (READY, or UNAVAILABLE and why);
`POST /v2/repository/models/{name}/load` loads the entry's highest version, verifies it and swaps it in
without failing a request; `.../unload` stops serving it (404 from then on). The bodies and statuses
follow Triton's, so `tritonclient`'s `get_model_repository_index`, `load_model` and `unload_model` work
(over gRPC too: `service.grpc_server` calls the same lifecycle).
See `service.lifecycle` for what a load checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError

from service.dependencies import ready_state
from service.errors import APIError
from service.schemas import V2ErrorBody
from service.state import ServingState

router = APIRouter(prefix="/v2/repository", tags=["v2 repository"])
ERRORS = {s: {"model": V2ErrorBody} for s in (400, 404, 422, 503)}


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(False, description="List only the entries that are ready.")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY or UNAVAILABLE.")
    reason: str = Field(description="Why an entry is UNAVAILABLE: not loaded, unloaded, or a refusal.")


class ModelControlRequest(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict)


Body = TypeVar("Body", bound=BaseModel)


async def _body(request: Request, model: type[Body]) -> Body:
    """The optional JSON body: tritonclient sends none, an empty string or `{}` for the defaults."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise APIError(
            400, "invalid_request", f"invalid {request.url.path} body at {where}: {error['msg']}"
        ) from exc


# tritonclient's unload_model always sends it; vitserve has no ensembles, so there are no dependents.
IGNORED_PARAMETERS = {"unload_dependents"}


def refuse_overrides(parameters: Iterable[str]) -> None:
    """Triton can take a config or files in the request; vitserve loads only what the repository holds
    (the gRPC service checks its load and unload parameters here too)."""
    unsupported = sorted(set(parameters) - IGNORED_PARAMETERS)
    if unsupported:
        raise APIError(
            400,
            "unsupported_parameter",
            f"load/unload parameters {unsupported} are not supported: vitserve loads the repository's "
            "files; write a new version directory <entry>/<n>/ and load again",
        )


@router.post("/index", response_model=list[RepositoryIndexEntry], responses=ERRORS)
async def repository_index(
    request: Request, state: Annotated[ServingState, Depends(ready_state)]
) -> list[dict[str, str]]:
    body = await _body(request, RepositoryIndexRequest)
    return state.lifecycle.index(ready_only=body.ready)


@router.post("/models/{model}/load", responses=ERRORS)
async def load_model(
    model: str, request: Request, state: Annotated[ServingState, Depends(ready_state)]
) -> dict:
    refuse_overrides((await _body(request, ModelControlRequest)).parameters)
    await state.lifecycle.load(model)
    return {}


@router.post("/models/{model}/unload", responses=ERRORS)
async def unload_model(
    model: str, request: Request, state: Annotated[ServingState, Depends(ready_state)]
) -> dict:
    refuse_overrides((await _body(request, ModelControlRequest)).parameters)
    await state.lifecycle.unload(model)
    return {}
