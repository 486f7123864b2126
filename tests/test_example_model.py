"""The shipped example model (examples/tiny-mote) is a real MoTE that captions its sample image correctly."""
import json
from pathlib import Path

import pytest
import torch

from mote.export.generate import EagerRunner, greedy_generate
from mote.export.images import load_pixel_values, read_image
from mote.export.loader import load_model
from mote.export.model import MoteBlock, TernaryExpert
from mote.export.tokenizer import require_tokenizer
from mote.tools.train_example import COLORS, POSITIONS, SHAPES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"


@pytest.fixture(scope="module")
def model():
    return load_model(EXAMPLE)


@pytest.fixture
def one_thread():
    """Decode single-threaded: 48 tiny decode steps gain nothing from a second thread, and on a busy 2-core machine
    spinning OpenMP workers made this test ~100x slower (13 s instead of 0.15 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def labels_from_pixels(rgb: torch.Tensor) -> dict:
    """Colour, shape and quadrant of the single shape in a sample image, read off the pixels themselves."""
    img = rgb.to(torch.float32)
    fg = img.amax(dim=-1) >= 100            # background is dark (< 60), every shape colour has a channel >= 170
    assert fg.sum() >= 20, "no shape found in the sample image"
    mean = img[fg].mean(dim=0)
    color = min(COLORS, key=lambda c: float(((mean - torch.tensor(COLORS[c], dtype=torch.float32)) ** 2).sum()))
    ys, xs = torch.nonzero(fg, as_tuple=True)
    h, w = fg.shape
    vert = "upper" if ys.float().mean() < h / 2 else "lower"
    horiz = "left" if xs.float().mean() < w / 2 else "right"
    bbox = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
    fill = float(fg.sum()) / bbox            # square ~1.0, circle ~pi/4, triangle ~1/2
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return {"color": color, "shape": shape, "position": f"{vert} {horiz}"}


def test_sample_labels_match_the_pixels():
    info = json.loads((EXAMPLE / "sample.json").read_text())
    got = labels_from_pixels(read_image(EXAMPLE / "sample.png"))
    assert got == {k: info[k] for k in ("color", "shape", "position")}


def test_example_is_a_top1_mote_with_4_ternary_experts(model):
    cfg = model.config
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 1
    assert len(cfg.moe.moe_layers) >= 2
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoteBlock)]
    assert len(blocks) == len(cfg.moe.moe_layers)
    for block in blocks:
        assert block.top_k == 1 and len(block.experts) == 4
        assert all(isinstance(e, TernaryExpert) for e in block.experts)
        assert block.gate.weight.shape == (4, cfg.hidden_size)
    assert cfg.vision is not None and cfg.image_token_id is not None


def test_example_captions_its_sample_image(model, one_thread):
    info = json.loads((EXAMPLE / "sample.json").read_text())
    truth = labels_from_pixels(read_image(EXAMPLE / "sample.png"))
    prompt = (EXAMPLE / "prompt.txt").read_text().strip()
    pixels = load_pixel_values(EXAMPLE / "sample.png", EXAMPLE, model.config)
    tokenizer = require_tokenizer(EXAMPLE, model.config)
    tokenized = tokenizer.prompt(prompt, with_image=True)
    tokens, _ = greedy_generate(EagerRunner(model, 128), tokenized.ids, pixels, 48, tokenized.special)
    caption = tokenizer.decode(tokens)
    assert tokens[-1] in tokenized.special.eos, f"no EOS within 48 tokens: {caption!r}"
    assert f"{truth['color']} {truth['shape']}" in caption, caption
    assert truth["position"] in caption, caption
    # it names exactly one colour, one shape and one position
    assert sum(c in caption for c in COLORS) == 1, caption
    assert sum(s in caption for s in SHAPES) == 1, caption
    assert sum(p in caption for p in POSITIONS) == 1, caption
    assert caption == info["caption"]
