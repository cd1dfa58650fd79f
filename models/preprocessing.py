"""A checkpoint's own image preprocessing, translated into config fields.

Checkpoints say how their training images were prepared in two dialects: a transformers
`preprocessor_config.json` (ViTImageProcessor: `do_resize`, `size`, `resample`, `do_center_crop`,
`crop_size`, `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`) and timm's
`pretrained_cfg` (`interpolation`, `crop_pct`, `crop_mode`, `mean`, `std`). Both become the config
fields `interpolation`, `resize`, `crop_pct`, `mean` and `std`, which export records in the entry's
config.pbtxt and the gateway applies (service/preprocess.py). A processor step the gateway cannot
reproduce is an error here, at load time, rather than a silent difference in serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import INTERPOLATIONS

# Pillow's Image.Resampling values, as transformers stores `resample`.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
HF_RESCALE = 1 / 255
TIMM_CROP_MODES = ("center", "squash")
# ViTImageProcessor's default `size` (the processor of both ViT and Swin), when the config leaves it out.
VIT_PROCESSOR_SIZE = {"height": 224, "width": 224}


def from_hf_processor(processor: Mapping[str, Any], in_chans: int) -> dict[str, Any]:
    """Config overrides for a transformers image processor config (ViTImageProcessor and alike)."""
    if (
        processor.get("do_rescale", True)
        and abs(processor.get("rescale_factor", HF_RESCALE) - HF_RESCALE) > 1e-12
    ):
        raise ValueError(
            f"rescale_factor {processor['rescale_factor']} is not supported: the gateway scales pixels by 1/255"
        )
    overrides: dict[str, Any] = {"interpolation": PIL_RESAMPLE[int(processor.get("resample", 2))]}
    if processor.get("do_normalize", True):
        if "image_mean" in processor and "image_std" in processor:
            overrides["mean"] = tuple(float(v) for v in processor["image_mean"])
            overrides["std"] = tuple(float(v) for v in processor["image_std"])
    else:
        overrides["mean"], overrides["std"] = (0.0,) * in_chans, (1.0,) * in_chans
    if not processor.get("do_resize", True):
        return overrides
    size = processor.get("size") or VIT_PROCESSOR_SIZE
    crop = processor.get("crop_size") or {} if processor.get("do_center_crop", False) else {}
    if "height" in size and "width" in size and not crop:
        return {**overrides, "resize": "squash"}
    if "shortest_edge" in size:
        crop_side = crop.get("height", size["shortest_edge"]) if crop else size["shortest_edge"]
        if crop and crop.get("width", crop_side) != crop_side:
            raise ValueError(f"non-square crop_size {dict(crop)} is not supported")
        return {**overrides, "resize": "crop", "crop_pct": crop_side / size["shortest_edge"]}
    raise ValueError(
        f"image processor resizing size={dict(size)} with do_center_crop={bool(crop)} is not supported: "
        "the gateway resizes to {height, width} (squash) or resizes the shortest edge and center-crops"
    )


def from_timm_pretrained_cfg(pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides for timm's `pretrained_cfg` (eval transform: resize, center crop, normalize)."""
    interpolation = pretrained_cfg.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"timm interpolation {interpolation!r} is not supported; choose one of {INTERPOLATIONS}"
        )
    crop_mode = pretrained_cfg.get("crop_mode", "center")
    crop_pct = float(pretrained_cfg.get("crop_pct", 0.875))
    if crop_mode not in TIMM_CROP_MODES or (crop_mode == "squash" and crop_pct != 1.0):
        raise ValueError(
            f"timm crop_mode {crop_mode!r} with crop_pct {crop_pct} is not supported: the gateway does "
            "'center' (short side to size / crop_pct, center crop) or 'squash' with crop_pct 1"
        )
    overrides: dict[str, Any] = {
        "interpolation": interpolation,
        "resize": "crop" if crop_mode == "center" else "squash",
        "crop_pct": crop_pct,
    }
    if "mean" in pretrained_cfg and "std" in pretrained_cfg:
        overrides["mean"] = tuple(float(v) for v in pretrained_cfg["mean"])
        overrides["std"] = tuple(float(v) for v in pretrained_cfg["std"])
    return overrides


__all__ = ["from_hf_processor", "from_timm_pretrained_cfg"]
