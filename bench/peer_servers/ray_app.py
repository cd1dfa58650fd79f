"""Ray Serve with @serve.batch: POST /classify, multipart `image`, one replica."""

from __future__ import annotations

import signal
import sys
import time

import ray
from ray import serve
from starlette.requests import Request

from bench.peer_servers import common


@serve.deployment(max_ongoing_requests=256)
class Classifier:
    def __init__(self) -> None:
        self.model = common.session()

    @serve.batch(max_batch_size=common.MAX_BATCH, batch_wait_timeout_s=common.MAX_DELAY_MS / 1000)
    async def classify(self, images: list[bytes]) -> list[dict]:
        return common.top5(self.model, [common.decode(data) for data in images])

    async def __call__(self, request: Request) -> dict:
        form = await request.form()
        return await self.classify(await form["image"].read())


def _stop(*_: object) -> None:
    """Ray's actors live in their own sessions: shut them down, or they outlive the benchmark."""
    serve.shutdown()
    ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    ray.init(include_dashboard=False, num_cpus=common.cores())
    serve.start(http_options={"host": "127.0.0.1", "port": common.PORT})
    serve.run(Classifier.bind(), route_prefix="/classify")
    while True:
        time.sleep(3600)
