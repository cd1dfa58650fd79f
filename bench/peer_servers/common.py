"""What every peer server does with an image, kept identical across frameworks: Pillow decode,
resize to the model's side, normalize, run a batch in ONNX Runtime, answer the top-5 indices.

Imported inside each framework's own virtual environment, so it needs only numpy, Pillow and
onnxruntime. Configured by environment: PEER_ONNX (model file), PEER_SIDE, PEER_MEAN, PEER_STD,
PEER_THREADS, PEER_MAX_BATCH, PEER_MAX_DELAY_MS, PEER_PORT.
"""

from __future__ import annotations

import io
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

SIDE = int(os.environ.get("PEER_SIDE", "224"))
MEAN = np.array([float(x) for x in os.environ.get("PEER_MEAN", "0.5,0.5,0.5").split(",")], np.float32)
STD = np.array([float(x) for x in os.environ.get("PEER_STD", "0.5,0.5,0.5").split(",")], np.float32)
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "8"))
MAX_DELAY_MS = float(os.environ.get("PEER_MAX_DELAY_MS", "2"))
PORT = int(os.environ.get("PEER_PORT", "8000"))


def cores() -> int:
    return int(os.environ.get("PEER_THREADS", str(os.cpu_count() or 1)))


def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"])


def tensor(image: Image.Image) -> np.ndarray:
    """(3, SIDE, SIDE) float32 of a decoded image: RGB, bilinear resize, (x / 255 - mean) / std."""
    rgb = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.float32)
    return ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def decode(data: bytes) -> np.ndarray:
    return tensor(Image.open(io.BytesIO(data)))


def top5(model: ort.InferenceSession, tensors: list[np.ndarray]) -> list[dict]:
    """Run one batch and answer each row's five best class indices."""
    name = model.get_inputs()[0].name
    logits = model.run(None, {name: np.stack(tensors)})[0]
    best = np.argsort(-logits, axis=1)[:, :5]
    return [{"top5": row.tolist()} for row in best]
