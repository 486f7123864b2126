"""Images (export.images): Pillow reading, transformers-exact preprocessing, the native preprocessing kept as it
was, and one-line errors. The reference is transformers' own PIL-backend image processors (torchvision is not
installed, and the PIL backend is what runs without it)."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mote.export.errors import InputError
from mote.export.images import load_pixel_values, read_image, write_image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"


def cfg(image_size):
    return SimpleNamespace(vision=SimpleNamespace(image_size=image_size))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A JPEG (wider than tall), an RGBA PNG with varied transparency (taller than wide), a palette PNG with a
    transparent index and a grayscale PNG: the modes a user's files come in."""
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:45, 0:70]
    rgb = np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)
    rgb += rng.integers(0, 20, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "photo.jpg", quality=85)
    rgba = rng.integers(0, 256, (61, 38, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    pal = Image.fromarray(rng.integers(0, 8, (30, 30), dtype=np.uint8), "P")
    pal.putpalette(list(rng.integers(0, 256, 8 * 3, dtype=np.uint8)))
    pal.save(d / "palette.png", transparency=2)
    Image.fromarray(rng.integers(0, 256, (20, 33), dtype=np.uint8), "L").save(d / "gray.png")
    return d


CONFIGS = {
    # openai/clip-vit-large-patch14-336 style (int sizes, old feature-extractor name), shrunk to 24 pixels
    "clip": ("CLIPImageProcessorPil", {"feature_extractor_type": "CLIPFeatureExtractor", "crop_size": 24,
                                       "do_center_crop": True, "do_normalize": True, "do_resize": True,
                                       "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                       "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                                       "size": 24}),
    # google/siglip-* style: squash to height x width, mean/std 0.5, no crop
    "siglip": ("SiglipImageProcessorPil", {"image_processor_type": "SiglipImageProcessor", "do_normalize": True,
                                           "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                                           "image_std": [0.5, 0.5, 0.5], "resample": 3,
                                           "rescale_factor": 0.00392156862745098,
                                           "size": {"height": 24, "width": 24}, "processor_class": "SiglipProcessor"}),
    # llava-hf style with pad-to-square in the mean colour, bilinear
    "llava-pad": ("LlavaImageProcessorPil", {"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                                             "crop_size": {"height": 24, "width": 24}, "resample": 2,
                                             "size": {"shortest_edge": 24}, "do_convert_rgb": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("image", ["photo.jpg", "alpha.png", "palette.png", "gray.png"])
def test_pixel_values_match_transformers(tmp_path, images, name, image):
    import transformers

    cls_name, config = CONFIGS[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = getattr(transformers, cls_name).from_pretrained(tmp_path)
    with Image.open(images / image) as im:
        expected = reference(im, return_tensors="pt")["pixel_values"]
    got = load_pixel_values(images / image, tmp_path, cfg(24))
    assert got.shape == expected.shape == (1, 3, 24, 24) and got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 1e-6


def test_native_preprocessing_is_unchanged():
    """No preprocessor_config.json (our format): pixels / 255 * 2 - 1, nearest resize; the example's sample is
    already at the tower's 32x32."""
    pixels = load_pixel_values(EXAMPLE / "sample.png", EXAMPLE, cfg(32))
    with Image.open(EXAMPLE / "sample.png") as im:
        expected = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0 * 2.0 - 1.0
    assert torch.equal(pixels, torch.from_numpy(expected)[None])


def test_native_preprocessing_resizes_nearest(tmp_path):
    blocks = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_image(tmp_path / "big.png", torch.from_numpy(blocks.repeat(4, 0).repeat(4, 1)))   # each pixel a 4x4 block
    pixels = load_pixel_values(tmp_path / "big.png", tmp_path, cfg(8))
    expected = blocks.astype(np.float32).transpose(2, 0, 1) / 255.0 * 2.0 - 1.0
    assert torch.equal(pixels, torch.from_numpy(expected)[None])


@pytest.mark.parametrize("image", ["alpha.png", "palette.png", "gray.png", "photo.jpg"])
def test_any_mode_reads_as_rgb_like_transformers(images, image):
    from transformers.image_transforms import convert_to_rgb

    with Image.open(images / image) as im:
        expected = convert_to_rgb(im, return_numpy=True)
    got = read_image(images / image)
    assert got.dtype == torch.uint8 and got.shape[-1] == 3
    assert np.array_equal(got.numpy(), expected)


def test_write_image_round_trips(tmp_path):
    rgb = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    write_image(tmp_path / "x.png", rgb)
    with Image.open(tmp_path / "x.png") as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), rgb.numpy())


def test_bad_image_files_are_one_input_error_line(tmp_path):
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(InputError, match=r"not-an-image.png: not a readable image") as e:
        load_pixel_values(tmp_path / "not-an-image.png", tmp_path, cfg(8))
    assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(InputError, match="truncated.jpg: not a readable image"):
        load_pixel_values(truncated, tmp_path, cfg(8))
    with pytest.raises(InputError, match="missing.png: image not found"):
        load_pixel_values(tmp_path / "missing.png", tmp_path, cfg(8))


@pytest.mark.parametrize("change, message", [
    ({"image_processor_type": "BlipImageProcessor"}, "image_processor_type 'BlipImageProcessor' is not supported"),
    ({"image_grid_pinpoints": [[336, 672]]}, "'image_grid_pinpoints' is not supported"),
    ({"size": {"shortest_edge": 24, "longest_edge": 48}}, "'size' = .* is not supported"),
    ({"do_pad": True}, "'do_pad' = true is not supported"),
    ({"resample": 7}, "'resample' = 7 is not supported"),
    ({"crop_size": {"height": 20, "width": 20}}, "preprocessing gives 20x20 pixels, the vision tower takes 24x24"),
])
def test_unsupported_preprocessor_keys_are_refused(tmp_path, images, change, message):
    config = {**CONFIGS["clip"][1], **change}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message) as e:
        load_pixel_values(images / "photo.jpg", tmp_path, cfg(24))
    assert "preprocessor_config.json" in str(e.value)
