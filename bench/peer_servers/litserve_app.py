"""LitServe with dynamic batching (max_batch_size, batch_timeout): POST /predict, multipart `image`."""

from __future__ import annotations

import litserve as ls

from bench.peer_servers import common


class Classifier(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = common.session()

    def decode_request(self, request):
        return common.decode(request["image"].file.read())

    def batch(self, inputs):
        return inputs

    def predict(self, tensors):
        return common.top5(self.model, tensors)

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    api = Classifier(max_batch_size=common.MAX_BATCH, batch_timeout=common.MAX_DELAY_MS / 1000)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(host="127.0.0.1", port=common.PORT)
