"""Real photographs and synthetic large images, classified over HTTP by a running gateway.

Every image must be served on the route GET /v1/route predicts for its size (the cost policy's
choice among the repository's shapes), and every answer must be what the served ONNX model gives:
the reference decodes and preprocesses in-process (the unit-tested imaging and preprocess modules)
and runs ONNX Runtime directly. One image is also checked against an independent numpy/Pillow
reference, so a wrong normalization or channel order shared by both paths would still be caught.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from PIL import Image
from pydantic import BaseModel
from sklearn.datasets import load_sample_images

from export import read_entry
from service.imaging import decode_image
from service.preprocess import preprocess
from service.schemas import ClassifyResponse, EmbedResponse, RouteResponse
from support.server import ServerProcess, encode_image

LIMITS = {"max_bytes": 1 << 30, "max_pixels": 1 << 30}


def _synthetic(height: int, width: int) -> np.ndarray:
    """A colour gradient with coarse noise, upscaled: compressible like a photograph, varied in every region."""
    rng = np.random.default_rng(height * width)
    small_h, small_w = max(2, height // 16), max(2, width // 16)
    y, x = np.mgrid[0:small_h, 0:small_w]
    gradient = np.stack([x / small_w, y / small_h, (x + y) / (small_w + small_h)], axis=-1) * 200
    small = (gradient + rng.normal(0, 25, (small_h, small_w, 3))).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def _sample_jpeg(name: str) -> bytes:
    """scikit-learn's sample photographs as their original JPEG files."""
    return next(Path(f).read_bytes() for f in load_sample_images().filenames if Path(f).name == name)


# name -> (encoded image, content type).
PHOTOS: dict[str, tuple[Callable[[], bytes], str]] = {
    "astronaut 512x512 png": (lambda: encode_image(skimage.data.astronaut()), "image/png"),
    "coffee 600x400 jpeg": (lambda: encode_image(skimage.data.coffee(), "JPEG"), "image/jpeg"),
    "camera 512x512 grayscale png": (lambda: encode_image(skimage.data.camera()), "image/png"),
    "retina 1411x1411 jpeg": (lambda: encode_image(skimage.data.retina(), "JPEG"), "image/jpeg"),
    "hubble 1000x872 jpeg": (lambda: encode_image(skimage.data.hubble_deep_field(), "JPEG"), "image/jpeg"),
    "china 640x427 jpeg": (lambda: _sample_jpeg("china.jpg"), "image/jpeg"),
    "flower 640x427 jpeg": (lambda: _sample_jpeg("flower.jpg"), "image/jpeg"),
    "synthetic 2048x2048 jpeg": (lambda: encode_image(_synthetic(2048, 2048), "JPEG"), "image/jpeg"),
    "synthetic 4000x600 png": (lambda: encode_image(_synthetic(600, 4000)), "image/png"),
    "synthetic 256x192 (4:3) png": (lambda: encode_image(_synthetic(192, 256)), "image/png"),
}
# Everything but expected_ms/wait (live queues) and the reason that quotes them.
ROUTE_FIELDS = (
    "model",
    "entry",
    "pool",
    "shape",
    "bucket",
    "tokens",
    "image_tokens",
    "resized",
    "resize_mode",
    "padding",
    "detail",
    "degraded",
    "policy",
)


@cache
def _session(artifact: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])


def _run_entry(repository: Path, entry_name: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime on one preprocessed (3, H, W) image of a repository entry."""
    entry = read_entry(repository / entry_name)
    logits, embedding = _session(entry.artifact).run(
        [entry.logits_name, entry.embedding_name], {entry.input_name: pixels[None]}
    )
    return {"logits": logits[0], "embedding": embedding[0]}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


@pytest.mark.parametrize("name", list(PHOTOS))
def test_photo_is_classified_on_the_route_that_v1_route_predicts(
    name: str, photo_server: ServerProcess, photo_repository: Path
) -> None:
    encode, content_type = PHOTOS[name]
    data = encode()
    with Image.open(BytesIO(data)) as image:
        width, height = image.size
    predicted = httpx.get(f"{photo_server.url}/v1/route", params={"width": width, "height": height}).json()

    response = httpx.post(
        f"{photo_server.url}/v1/classify",
        params={"top_k": 3},
        content=data,
        headers={"content-type": content_type},
        timeout=60,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body["route"][k] for k in ROUTE_FIELDS} == {k: predicted[k] for k in ROUTE_FIELDS}
    assert predicted["policy"] == "cost" and not predicted["degraded"]
    assert body["image"] == {"format": content_type.split("/")[1].upper(), "width": width, "height": height}
    decoded = decode_image(
        data, **LIMITS, target_side=max(predicted["resized"]), mode=predicted["resize_mode"]
    )
    entry = read_entry(photo_repository / predicted["entry"])
    assert list(entry.shape) == predicted["shape"]
    pixels = preprocess(
        decoded.pixels,
        tuple(predicted["shape"]),
        entry.mean,
        entry.std,
        predicted["resize_mode"],
        original_size=decoded.original_size,
    )
    probabilities = _softmax(_run_entry(photo_repository, entry.name, pixels)["logits"])
    top = np.argsort(-probabilities)[:3]
    assert [p["index"] for p in body["predictions"]] == top.tolist()
    assert [p["label"] for p in body["predictions"]] == [entry.labels[i] for i in top]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], probabilities[top], atol=1e-5)


def test_embedding_matches_an_independent_pillow_numpy_reference(
    photo_server: ServerProcess, photo_repository: Path
) -> None:
    """512x512 astronaut forced to bucket 384: Pillow bilinear resize, (x/255 - mean)/std, CHW, RGB order."""
    astronaut = skimage.data.astronaut()
    response = httpx.post(
        f"{photo_server.url}/v1/embed",
        params={"bucket": 384},
        files={"image": ("astronaut.png", encode_image(astronaut), "image/png")},
        timeout=60,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["route"]["entry"], body["route"]["resized"]) == ("vit_global_384", [384, 384])
    entry = read_entry(photo_repository / "vit_global_384")
    resized = np.asarray(Image.fromarray(astronaut).resize((384, 384), Image.Resampling.BILINEAR))
    normalized = (resized / 255.0 - np.array(entry.mean)) / np.array(entry.std)
    reference = _run_entry(photo_repository, entry.name, normalized.transpose(2, 0, 1).astype(np.float32))
    assert body["dim"] == reference["embedding"].size == len(body["embedding"])
    np.testing.assert_allclose(body["embedding"], reference["embedding"], atol=1e-4)


def test_models_lists_every_entry_ready(photo_server: ServerProcess) -> None:
    body = httpx.get(f"{photo_server.url}/v1/models").json()

    assert body["ready"] is True
    assert body["backbones"] == {"swin_windowed": ["448", "896"], "vit_global": ["192x256", "224", "384"]}
    assert {(m["name"], m["pool"], m["ready"]) for m in body["models"]} == {
        ("vit_global_192x256", "global", True),
        ("vit_global_224", "global", True),
        ("vit_global_384", "global", True),
        ("swin_windowed_448", "windowed", True),
        ("swin_windowed_896", "windowed", True),
    }
    assert all(m["runtime"].startswith("onnxruntime") for m in body["models"])
    # Batch limits are measured: the best throughput found at start-up, within config.pbtxt's cap.
    for model in body["models"]:
        assert model["cost_source"] == "measured at start-up"
        measured = {int(b): s for b, s in model["batch_seconds"].items()}
        assert model["max_batch_size"] in measured and 1 in measured


def test_serving_onnx_never_loads_torch(photo_server: ServerProcess) -> None:
    """The gateway reads configs, routes by cost and runs ONNX Runtime without importing torch, whose
    libraries alone hold 176 MiB resident (README "Memory")."""
    image = encode_image(_synthetic(600, 800), "JPEG")
    for route in ("global", "windowed"):
        for endpoint in ("classify", "embed"):
            response = httpx.post(
                f"{photo_server.url}/v1/{endpoint}",
                params={"route": route},
                content=image,
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
    assert httpx.get(f"{photo_server.url}/v1/route", params={"width": 4000, "height": 600}).status_code == 200
    assert httpx.get(f"{photo_server.url}/metrics").status_code == 200

    mapped = Path(f"/proc/{photo_server.process.pid}/maps").read_text()
    assert "libtorch" not in mapped, "the serving process loaded torch"
    assert "onnxruntime" in mapped


def test_server_threads_carry_their_names_in_the_os(photo_server: ServerProcess) -> None:
    """Decode and batch threads are told apart in top -H and /proc (service/threads.py)."""
    response = httpx.post(
        f"{photo_server.url}/v1/classify",
        params={"route": "global"},
        content=encode_image(_synthetic(224, 224), "JPEG"),
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    tasks = Path(f"/proc/{photo_server.process.pid}/task").iterdir()
    names = {(task / "comm").read_text().strip() for task in tasks}
    assert "decode-global_0" in names, names
    assert any(name.startswith("infer-global") for name in names), names


def _astronaut_as(mode: str, fmt: str) -> bytes:
    """The astronaut at 200x200 in Pillow `mode` ("I;16": 16-bit grayscale), encoded as `fmt`."""
    image = Image.fromarray(skimage.data.astronaut()).resize((200, 200))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    else:
        image = image.convert(mode)
    buffer = BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
    ],
)
def test_every_accepted_format_and_mode_is_classified(
    photo_server: ServerProcess, mode: str, fmt: str
) -> None:
    response = httpx.post(
        f"{photo_server.url}/v1/classify",
        content=_astronaut_as(mode, fmt),
        headers={"content-type": f"image/{fmt.lower()}"},
        timeout=60,
    )

    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"format": fmt, "width": 200, "height": 200}
    assert response.json()["route"]["entry"] == "vit_global_224"


def test_exif_orientation_decides_the_route_and_the_reported_size(photo_server: ServerProcess) -> None:
    """A 600x300 JPEG with EXIF orientation 6 (rotate 90) is a 300x600 portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(_synthetic(300, 600), "JPEG", exif=exif.tobytes())
    predicted = httpx.get(f"{photo_server.url}/v1/route", params={"width": 300, "height": 600}).json()

    response = httpx.post(
        f"{photo_server.url}/v1/embed", content=data, headers={"content-type": "image/jpeg"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"format": "JPEG", "width": 300, "height": 600}
    resized = response.json()["route"]["resized"]
    assert resized == predicted["resized"] and resized[0] == 2 * resized[1]  # portrait, as oriented


def test_openapi_schema_describes_the_typed_api(photo_server: ServerProcess) -> None:
    schema = httpx.get(f"{photo_server.url}/openapi.json").json()

    paths = schema["paths"]
    for path in ("/v1/classify", "/v1/embed", "/v1/route", "/v1/models", "/v2/models/{model}/infer"):
        assert path in paths
    classify = paths["/v1/classify"]["post"]
    assert classify["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ClassifyResponse"
    )
    assert {"413", "415", "422", "429", "503", "504"} <= set(classify["responses"])
    assert {p["name"] for p in classify["parameters"]} >= {"top_k", "model", "route", "bucket", "timeout_ms"}
    infer_errors = paths["/v2/models/{model}/infer"]["post"]["responses"]["429"]
    assert infer_errors["content"]["application/json"]["schema"]["$ref"].endswith("V2ErrorBody")


@pytest.mark.parametrize(
    ("method", "path", "model"),
    [
        ("post", "/v1/classify", ClassifyResponse),
        ("post", "/v1/embed", EmbedResponse),
        ("get", "/v1/route", RouteResponse),
    ],
)
def test_pre_serialized_answers_match_their_declared_model(
    photo_server: ServerProcess, method: str, path: str, model: type[BaseModel]
) -> None:
    """These routes return JSON that pydantic-core serialized (api_v1.json_response), so FastAPI no
    longer checks it against `response_model`: the schema still names the model, and every answer
    validates against it field for field, with nothing left over."""
    schema = httpx.get(f"{photo_server.url}/openapi.json").json()
    declared = schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    assert declared["$ref"].endswith(model.__name__)
    if method == "post":
        response = httpx.post(
            f"{photo_server.url}{path}",
            content=encode_image(skimage.data.coffee(), "JPEG"),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
    else:
        response = httpx.get(f"{photo_server.url}{path}", params={"width": 640, "height": 480}, timeout=60)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    parsed = model.model_validate_json(response.content)
    assert parsed.model_dump(mode="json") == response.json()
