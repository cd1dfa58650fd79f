"""Served preprocessing follows the checkpoint: what transformers' image processor does to a photo,
the gateway does too.

A small ViTForImageClassification is saved with its ViTImageProcessor (`save_pretrained` of both,
as a hub folder holds them), exported, and served. The processor's resampling, resize, mean and std
must be recorded in the entry's config.pbtxt, `service.preprocess` driven by that record must
reproduce the processor's `pixel_values` to 1e-5 on real photos (skimage's), bilinear and bicubic,
and a request over real HTTP must return the embedding transformers computes from the processor's
own pixels. (transformers' ViTImageProcessor here is its Pillow backend: torchvision cannot be
imported on this machine, see tests/test_checkpoint_layouts.py.)
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from skimage import data as skdata
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from export import ExportRequest, ModelEntry, export_model, read_entry, read_repository
from export.triton_config import parse_text
from service.preprocess import preprocess, served_mode
from support.server import encode_image, running_server

BUCKET = 224
ARCH = "vit_tiny_patch16_224"
OURS = {"embed_dim": 48, "depth": 1, "num_heads": 3, "mlp_ratio": 2.0}
MEAN, STD = (0.52, 0.47, 0.41), (0.27, 0.26, 0.28)
RESAMPLE = {"bilinear": 2, "bicubic": 3}
PHOTOS = {
    "astronaut": skdata.astronaut,
    "coffee": skdata.coffee,
    "chelsea": skdata.chelsea,
    "rocket": skdata.rocket,
}


def save_hf_checkpoint(folder: Path, resample: int) -> ViTImageProcessor:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96, num_labels=4
    )
    ViTForImageClassification(config).eval().save_pretrained(folder)
    processor = ViTImageProcessor(
        size={"height": BUCKET, "width": BUCKET},
        resample=resample,
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    processor.save_pretrained(folder)
    return processor


@pytest.fixture(scope="module", params=sorted(RESAMPLE))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(interpolation, checkpoint folder, processor, published entry) for one resampling filter."""
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    processor = save_hf_checkpoint(root / "checkpoint", RESAMPLE[request.param])
    export_request = ExportRequest(
        model=ARCH,
        repository=root / "repository",
        buckets=(BUCKET,),
        checkpoint=root / "checkpoint",
        name=f"hf_{request.param}",
        overrides=OURS,
    )
    (entry,) = export_model(export_request, log=lambda _: None)
    return request.param, root / "checkpoint", processor, entry


def test_processor_is_recorded_in_the_entry(exported) -> None:
    interpolation, _, _, entry = exported
    params = {
        k: v.string_value for k, v in parse_text((entry.path / "config.pbtxt").read_text()).parameters.items()
    }
    assert (params["interpolation"], params["resize"], params["crop_pct"]) == (interpolation, "squash", "1.0")
    assert params["mean"] == ",".join(repr(v) for v in MEAN) and params["std"] == ",".join(
        repr(v) for v in STD
    )
    config = read_entry(entry.path).config
    assert (config.interpolation, config.resize, config.mean, config.std) == (
        interpolation,
        "squash",
        MEAN,
        STD,
    )


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_served_pixels_match_the_image_processor(exported, photo: str) -> None:
    _, _, processor, entry = exported
    image = PHOTOS[photo]()
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    recipe = entry.config
    actual = preprocess(
        image,
        BUCKET,
        recipe.mean,
        recipe.std,
        served_mode("pad", recipe.resize),
        interpolation=recipe.interpolation,
        crop_pct=recipe.crop_pct,
    )
    assert actual.shape == expected.shape == (3, BUCKET, BUCKET)
    assert np.abs(actual - expected).max() <= 1e-5


def serving_repository(root: Path, entry: ModelEntry, photo_repository: Path) -> Path:
    """The exported entry as the global backbone beside the session's windowed photo backbone
    (links, nothing copied or exported again): the gateway serves one backbone of each kind."""
    root.mkdir()
    (root / entry.name).symlink_to(entry.path)
    for other in read_repository(photo_repository):
        if other.config.family == "swin":
            (root / other.name).symlink_to(other.path)
    return root


@pytest.mark.parametrize("exported", ["bicubic"], indirect=True)
def test_gateway_serves_the_processors_pixels(exported, photo_repository: Path, tmp_path: Path) -> None:
    """Over HTTP: the embedding of a PNG photo equals transformers' on its own processor's pixels."""
    _, checkpoint, processor, entry = exported
    model = ViTForImageClassification.from_pretrained(checkpoint).eval()
    photos = {name: PHOTOS[name]() for name in ("coffee", "chelsea")}
    repository = serving_repository(tmp_path / "repository", entry, photo_repository)
    with running_server(tmp_path, repository=repository) as server:
        for name, image in photos.items():
            pixels = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"])
            with torch.no_grad():
                expected = model.vit(pixel_values=pixels).last_hidden_state[0, 0]
            response = httpx.post(
                f"{server.url}/v1/embed",
                params={"model": entry.backbone, "bucket": BUCKET},
                content=encode_image(image),
                headers={"Content-Type": "image/png"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["route"]["resize_mode"] == "squash"
            actual = torch.tensor(body["embedding"])
            assert ((actual - expected).norm() / expected.norm()).item() < 1e-4, name
