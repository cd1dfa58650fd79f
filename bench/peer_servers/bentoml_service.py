"""BentoML batchable API: POST /classify, multipart `image` (BentoML decodes it with Pillow)."""

from __future__ import annotations

import bentoml
from PIL.Image import Image

from bench.peer_servers import common


@bentoml.service(workers=1)
class Classifier:
    def __init__(self) -> None:
        self.model = common.session()

    @bentoml.api(batchable=True, max_batch_size=common.MAX_BATCH, max_latency_ms=60_000)
    def classify(self, image: list[Image]) -> list[dict]:
        return common.top5(self.model, [common.tensor(i) for i in image])
