"""Dynamic batching over HTTP: concurrent requests share batches, yet each gets its own image's result,
and batches are formed per (model, bucket) so requests of different buckets never share one."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from support.server import ServerProcess, encode_image, scrape_metrics

# Image sizes the cost policy sends to the two global square buckets: 200x180 is smaller than every
# shape and takes the least upscaling (224); 384x370 fits 384 exactly and keeps all its detail.
SIZES = {"vit_global_224": (180, 200), "vit_global_384": (370, 384)}
IMAGES_PER_ENTRY = 12
COPIES = 2  # each image is sent twice in the concurrent run


def _images() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(7)
    return [
        (entry, encode_image(rng.integers(0, 256, (*size, 3), np.uint8)))
        for entry, size in SIZES.items()
        for _ in range(IMAGES_PER_ENTRY)
    ]


async def _embed_all(url: str, bodies: list[bytes]) -> list[dict]:
    """POST every body to /v1/embed at once, one connection each."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/embed", content=b, headers={"content-type": "image/png"}) for b in bodies)
        )
    assert [a.status_code for a in answers] == [200] * len(bodies), [
        a.text for a in answers if a.status_code != 200
    ]
    return [a.json() for a in answers]


def test_concurrent_requests_are_batched_per_bucket_and_each_gets_its_own_result(
    photo_server: ServerProcess,
) -> None:
    images = _images()
    with httpx.Client(base_url=photo_server.url, timeout=60) as client:
        alone = [
            client.post("/v1/embed", content=body, headers={"content-type": "image/png"}).json()
            for _, body in images
        ]
    assert [a["route"]["entry"] for a in alone] == [entry for entry, _ in images]

    before = scrape_metrics(photo_server.url)
    together = asyncio.run(_embed_all(photo_server.url, [body for _, body in images] * COPIES))
    delta = scrape_metrics(photo_server.url) - before

    for index, answer in enumerate(together):
        reference = alone[index % len(images)]
        assert answer["route"]["entry"] == reference["route"]["entry"]
        np.testing.assert_allclose(answer["embedding"], reference["embedding"], atol=1e-4)
    batches = {entry: delta.value("vitserve_batch_size_count", model=entry) for entry in SIZES}
    rows = {entry: delta.value("vitserve_batch_size_sum", model=entry) for entry in SIZES}
    # Every request was computed exactly once, in a batch of its own entry (model and bucket) ...
    assert rows == {entry: IMAGES_PER_ENTRY * COPIES for entry in SIZES}
    assert delta.value("vitserve_batch_size_sum") == len(images) * COPIES
    # ... and fewer batches than requests ran: some batches held more than one request.
    assert sum(batches.values()) < len(images) * COPIES
    assert delta.value("vitserve_batch_size_bucket", le="1.0") < sum(batches.values())


def test_rows_of_one_v2_request_run_as_one_batch(photo_server: ServerProcess) -> None:
    """Rows submitted together are queued before the batcher looks, so they form as few batches as the
    entry's measured batch limit allows."""
    pixels = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    before = scrape_metrics(photo_server.url)

    response = httpx.post(
        f"{photo_server.url}/v2/models/vit_global_224/infer",
        json={
            "inputs": [
                {
                    "name": "pixel_values",
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "data": pixels.ravel().tolist(),
                }
            ]
        },
        timeout=60,
    )

    assert response.status_code == 200, response.text
    delta = scrape_metrics(photo_server.url) - before
    models = httpx.get(f"{photo_server.url}/v1/models").json()["models"]
    limit = next(m["max_batch_size"] for m in models if m["name"] == "vit_global_224")
    assert delta.value("vitserve_batch_size_count", model="vit_global_224") == -(-4 // limit)
    assert delta.value("vitserve_batch_size_sum", model="vit_global_224") == 4
    assert delta.value("vitserve_batch_size_sum") == 4
