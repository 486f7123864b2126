"""Images: read with Pillow (PNG, JPEG, ... in any mode), preprocessed into the vision tower's pixel values.

- A directory with `preprocessor_config.json` (CLIPImageProcessor, SiglipImageProcessor, LlavaImageProcessor) is
  preprocessed exactly as `transformers`' PIL backend does it (`image_processing_backends.PilBackend` and
  `image_transforms`): RGB conversion with transparency composited onto white, LLaVA's pad-to-square with the mean
  colour, Pillow resize on uint8, center crop, rescale in float64 then float32, normalize in float32. A key or value
  we do not implement is refused, naming it.
- Without one (our native "mote" format): nearest resize to the tower's size and scaling to [-1, 1], the
  preprocessing the example model was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import read_json
from .errors import InputError

# Class defaults of transformers 5.x's image processors (models/{clip,siglip,llava}/image_processing_pil_*.py);
# a key missing from (or null in) preprocessor_config.json takes these, as `_set_attributes` does.
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_CLIP = {"do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
         "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
         "do_pad": False, "default_to_square": False}
_DEFAULTS = {
    "CLIPImageProcessor": _CLIP,
    "LlavaImageProcessor": _CLIP,
    "SiglipImageProcessor": {**_CLIP, "size": {"height": 224, "width": 224}, "do_center_crop": False,
                             "crop_size": None, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
}
# Keys that do not change the pixel values of one image (naming, batching, output container).
_INERT = {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class",
          "disable_grouping", "return_tensors", "device", "image_seq_length"}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def open_image(path: str | Path):
    """A fully decoded Pillow image, turned upright by its EXIF orientation as transformers' `load_image` does."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable image ({why})") from None


def to_rgb(image):
    """transformers' `convert_to_rgb`: any mode to RGB, transparency composited onto a white background."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 [H, W, 3]."""
    return torch.from_numpy(np.array(to_rgb(open_image(path)), dtype=np.uint8))


def write_image(path: str | Path, rgb: torch.Tensor) -> None:
    """rgb: uint8 [H, W, 3]; the format follows the file suffix (PNG is lossless)."""
    from PIL import Image

    Image.fromarray(rgb.contiguous().numpy(), mode="RGB").save(path)


def preprocess_image(rgb: torch.Tensor, image_size: int) -> torch.Tensor:
    """Native format: uint8 [H, W, 3] -> pixel_values [1, 3, S, S] in [-1, 1] (nearest resize to the tower's size)."""
    h, w, _ = rgb.shape
    x = rgb.permute(2, 0, 1).to(torch.float32)[None] / 255.0
    if (h, w) != (image_size, image_size):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="nearest")
    return (x * 2.0 - 1.0).contiguous()


class HFImageProcessor:
    """One image -> pixel_values, as transformers' PIL-backend CLIP / SigLIP / LLaVA image processors compute them."""

    def __init__(self, data: dict, where: str):
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object")
        kind = data.get("image_processor_type") or data.get("feature_extractor_type") or ""
        kind = kind.removesuffix("Fast").removesuffix("Pil").replace("FeatureExtractor", "ImageProcessor")
        if kind not in _DEFAULTS:
            raise InputError(f"{where}: image_processor_type {kind or None!r} is not supported "
                             f"(supported: {', '.join(sorted(_DEFAULTS))})")
        self.where, self.kind = where, kind
        unknown = [k for k in data if k not in _DEFAULTS[kind] and k not in _INERT
                   and k not in ("data_format", "input_data_format", "pad_size")]
        if unknown:
            raise InputError(f"{where}: '{unknown[0]}' is not supported")
        p = {k: (data[k] if data.get(k) is not None else v) for k, v in _DEFAULTS[kind].items()}
        self._refuse(data.get("data_format") not in (None, "channels_first"), "data_format", data.get("data_format"))
        self._refuse(data.get("input_data_format") is not None, "input_data_format", data.get("input_data_format"))
        # CLIP / SigLIP pad a batch to its largest image (or to pad_size): LLaVA's do_pad is pad-to-square instead
        self._refuse(kind != "LlavaImageProcessor" and p["do_pad"], "do_pad", p["do_pad"])
        self._refuse(data.get("pad_size") is not None, "pad_size", data.get("pad_size"))
        for key in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad",
                    "default_to_square"):
            self._refuse(not isinstance(p[key], bool), key, p[key])
        self._refuse(p["resample"] not in _RESAMPLE, "resample", p["resample"])
        self._refuse(isinstance(p["rescale_factor"], bool) or not isinstance(p["rescale_factor"], (int, float)),
                     "rescale_factor", p["rescale_factor"])
        self.size = self._size(p["size"], "size", p["default_to_square"], ({"shortest_edge"}, {"height", "width"}))
        # transformers converts crop_size with default_to_square=True (get_size_dict's default)
        self.crop = None if p["crop_size"] is None else self._size(p["crop_size"], "crop_size", True,
                                                                   ({"height", "width"},))
        self._refuse(p["do_center_crop"] and self.crop is None, "crop_size", None)
        self.mean, self.std = (self._channels(p[k], k) for k in ("image_mean", "image_std"))
        self.p = p

    def _refuse(self, bad: bool, key: str, value) -> None:
        if bad:
            raise InputError(f"{self.where}: '{key}' = {json.dumps(value)} is not supported")

    def _size(self, value, key, default_to_square, allowed) -> dict:
        if isinstance(value, int) and not isinstance(value, bool):
            value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            value = {"height": value[0], "width": value[1]}
        ok = (isinstance(value, dict) and set(value) in allowed
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()))
        self._refuse(not ok, key, value)
        return value

    def _channels(self, value, key) -> tuple:
        values = value if isinstance(value, (list, tuple)) else [value] * 3
        ok = len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        self._refuse(not ok, key, value)
        return tuple(float(v) for v in values)

    def __call__(self, image) -> torch.Tensor:
        """Pillow image -> pixel_values [1, 3, H, W] float32."""
        from PIL import Image

        p = self.p
        # RGB whatever do_convert_rgb says: without it transformers feeds a non-RGB image's 1, 2 or 4 channels to
        # the 3-channel normalization and fails, so converting only changes images it cannot process at all.
        x = np.array(to_rgb(image), dtype=np.uint8)                            # [H, W, 3]
        if self.kind == "LlavaImageProcessor" and p["do_pad"]:
            x = self._pad_to_square(x, tuple(int(m * 255) for m in self.mean))
        if p["do_resize"]:
            h, w = x.shape[:2]
            if "shortest_edge" in self.size:
                s = self.size["shortest_edge"]
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = s, int(s * long / short)
                h, w = (new_long, new_short) if w <= h else (new_short, new_long)
            else:
                h, w = self.size["height"], self.size["width"]
            x = np.array(Image.fromarray(x).resize((w, h), resample=p["resample"]))
        if p["do_center_crop"]:
            x = self._center_crop(x, self.crop["height"], self.crop["width"])
        x = x.transpose(2, 0, 1)                                               # [3, H, W]
        if p["do_rescale"]:
            x = (x.astype(np.float64) * p["rescale_factor"]).astype(np.float32)
        if p["do_normalize"]:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean, std = np.array(self.mean, dtype=x.dtype), np.array(self.std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]

    @staticmethod
    def _pad_to_square(x: np.ndarray, color: tuple) -> np.ndarray:
        """LlavaImageProcessorPil.pad_to_square: centred on a square canvas of the mean colour (uint8, truncated)."""
        h, w, c = x.shape
        if h == w:
            return x
        n = max(h, w)
        out = np.empty((n, n, c), dtype=x.dtype)
        out[:] = np.array(color, dtype=x.dtype)
        if w > h:
            out[(n - h) // 2:(n - h) // 2 + h] = x
        else:
            out[:, (n - w) // 2:(n - w) // 2 + w] = x
        return out

    @staticmethod
    def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
        """image_transforms.center_crop: a crop larger than the image pads it with zeros first."""
        h, w, c = x.shape
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return x[top:top + ch, left:left + cw]
        nh, nw = max(ch, h), max(cw, w)
        canvas = np.zeros((nh, nw, c), dtype=x.dtype)
        tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)                        # ceil, as transformers
        canvas[tp:tp + h, lp:lp + w] = x
        top, left = top + tp, left + lp
        return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def image_processor(model_dir: Path, cfg):
    """A callable Pillow image -> pixel_values [1, 3, S, S] for this model directory."""
    path = Path(model_dir) / "preprocessor_config.json"
    size = cfg.vision.image_size
    if not path.is_file():
        return lambda image: preprocess_image(torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)), size)
    proc = HFImageProcessor(read_json(path), str(path))

    def run(image):
        x = proc(image)
        if tuple(x.shape[-2:]) != (size, size):
            raise InputError(f"{path}: preprocessing gives {x.shape[-2]}x{x.shape[-1]} pixels, the vision tower "
                             f"takes {size}x{size}")
        return x

    return run


def load_pixel_values(image_path: str | Path, model_dir: Path, cfg) -> torch.Tensor:
    """An image file preprocessed for the model in `model_dir` (its preprocessor_config.json, else the native way)."""
    return image_processor(model_dir, cfg)(open_image(image_path))
