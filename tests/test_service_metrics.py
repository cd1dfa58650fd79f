"""/metrics after a known sequence of requests: parsed with prometheus_client's parser, every counter and
histogram count moved by exactly what was sent, and the gauges are back at rest."""

from __future__ import annotations

import httpx
import numpy as np

from support.server import MetricSamples, ServerProcess, encode_image, labels, scrape_metrics

ENTRIES = ("vit_global_192x256", "vit_global_224", "vit_global_384", "swin_windowed_448", "swin_windowed_896")


def _image(height: int, width: int) -> bytes:
    return encode_image(np.random.default_rng(height + width).integers(0, 256, (height, width, 3), np.uint8))


def _send_known_sequence(url: str) -> None:
    """Eight requests of known route, entry and status (see the expectations in the test).

    Cost policy on the photo repository: 200x150 and 120x160 are smaller than every shape that
    keeps their padding low and take the least upscaling (192x256); 300x300 fits 224 without
    upscaling; 880x896 fits 896 exactly; 640x480 keeps the most detail in Swin's 448 (padded 25%, as
    this repository has no 4:3 shape that keeps as much: 192x256 would keep a third of it)."""
    png = {"content-type": "image/png"}
    with httpx.Client(base_url=url, timeout=60) as client:
        answers = [
            client.post("/v1/classify", content=_image(150, 200), headers=png),
            client.post("/v1/classify", content=_image(160, 120), headers=png),
            client.post("/v1/embed", content=_image(300, 300), headers=png),
            client.post("/v1/classify", content=_image(896, 880), headers=png),
            client.post("/v1/embed", params={"bucket": 448}, content=_image(100, 100), headers=png),
            client.get("/v1/route", params={"width": 640, "height": 480}),
            client.post("/v1/classify", content=_image(100, 100), headers={"content-type": "text/plain"}),
            client.post(
                "/v2/models/vit_global_224/infer",
                json={
                    "inputs": [
                        {
                            "name": "pixel_values",
                            "shape": [2, 3, 224, 224],
                            "datatype": "FP32",
                            "data": np.zeros(2 * 3 * 224 * 224).tolist(),
                        }
                    ]
                },
            ),
        ]
    assert [a.status_code for a in answers] == [200] * 6 + [415, 200]


def test_counters_and_histograms_count_exactly_the_requests_sent(photo_server: ServerProcess) -> None:
    before = scrape_metrics(photo_server.url)
    _send_known_sequence(photo_server.url)
    after = scrape_metrics(photo_server.url)
    delta = after - before

    served = {
        ("classify", "global", "vit_global"): 2,
        ("embed", "global", "vit_global"): 1,
        ("classify", "windowed", "swin_windowed"): 1,
        ("embed", "windowed", "swin_windowed"): 1,
        ("route", "windowed", "swin_windowed"): 1,
        ("v2_infer", "global", "vit_global"): 1,
    }
    rejected = {("classify", "none", "none"): 1}
    assert delta.series("vitserve_requests_total") == {
        **{labels(endpoint=e, route=r, model=m, status="200"): n for (e, r, m), n in served.items()},
        **{labels(endpoint=e, route=r, model=m, status="415"): n for (e, r, m), n in rejected.items()},
    }
    assert delta.series("vitserve_request_duration_seconds_count") == {
        labels(endpoint=e, route=r, model=m): n for (e, r, m), n in {**served, **rejected}.items()
    }
    assert delta.series("vitserve_route_decisions_total") == {
        labels(route="global", bucket="192x256"): 2,
        labels(route="global", bucket="224"): 1,
        labels(route="windowed", bucket="448"): 1,
        labels(route="windowed", bucket="896"): 1,
    }
    assert delta.series("vitserve_preprocess_duration_seconds_count") == {
        labels(route="global"): 3,
        labels(route="windowed"): 2,
    }
    computed = {"vit_global_192x256": 2, "vit_global_224": 3, "swin_windowed_448": 1, "swin_windowed_896": 1}
    assert delta.series("vitserve_batch_size_sum") == {labels(model=m): n for m, n in computed.items()}
    assert delta.series("vitserve_queue_duration_seconds_count") == {
        labels(model=m): n for m, n in computed.items()
    }
    assert delta.series("vitserve_inference_duration_seconds_count") == delta.series(
        "vitserve_batch_size_count"
    )
    _assert_at_rest(after)


def _assert_at_rest(metrics: MetricSamples) -> None:
    """No request in flight, nothing queued or pending in either pool, every model loaded."""
    assert metrics.value("vitserve_inflight_requests") == 0
    for gauge in ("vitserve_queue_depth", "vitserve_pending_tokens"):
        assert {dict(ls)["pool"] for n, ls in metrics.samples if n == gauge} == {"global", "windowed"}
        assert metrics.value(gauge) == 0
    assert metrics.series("vitserve_model_ready") == {labels(model=m): 1 for m in ENTRIES}
