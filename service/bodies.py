"""Request bodies read under a byte limit and the request's deadline, whatever their framing.

Content-Length is a hint, not a promise: chunked uploads declare nothing, so the limit is enforced
on the bytes as they arrive, and multipart bodies are parsed only after the whole body passed the
same limit (Starlette's `request.form()` would spool an uncapped file part to disk first). A body
that has not arrived by the request's deadline is answered 408, so a slow upload (slowloris) holds
one coroutine until then, never a thread, and every other request keeps being served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import APIError

# A rejected body is read and discarded up to this multiple of the limit, so the client (still
# sending) receives the error instead of a connection reset; past it the connection is dropped.
DRAIN_FACTOR = 4
# Room for the multipart boundaries and part headers around an image of the full byte limit.
MULTIPART_OVERHEAD = 64 * 1024
IMAGE_FIELD = "image"


def _too_large(limit: int) -> APIError:
    return APIError(
        413, "payload_too_large", f"request body exceeds the {limit}-byte limit; send a smaller image"
    )


async def read_body(request: Request, limit: int, deadline: float | None = None) -> bytes:
    """The body; 413 once it passes `limit` bytes (never holding more), 408 if it is not in by `deadline`.

    `deadline` is a `time.monotonic()` instant (the request's own deadline).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    budget = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        async with asyncio.timeout(budget):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > DRAIN_FACTOR * limit:
                    raise _too_large(limit)
    except TimeoutError:
        raise APIError(
            408,
            "body_timeout",
            f"the request body did not arrive within the request's deadline ({size} bytes received); "
            "send it faster or raise timeout_ms",
        ) from None
    if size > limit:
        raise _too_large(limit)
    return b"".join(chunks)


async def image_part(headers: Headers, body: bytes, limit: int) -> tuple[bytes, str | None]:
    """The file field `image` of a multipart body already read under the limit, and its content type."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise APIError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get(IMAGE_FIELD)
        if not isinstance(upload, UploadFile):
            raise APIError(400, "missing_image", f"multipart body needs a file field named {IMAGE_FIELD!r}")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, "payload_too_large", f"image exceeds the {limit}-byte limit")
        return data, upload.content_type
    finally:
        await form.close()
