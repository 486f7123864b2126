from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-mote"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def make_model_dir(tmp_path):
    """Write a random model directory: make_model_dir(name, **random_config kwargs) -> Path."""
    from mote.export.loader import save_model
    from mote.tools.make_random_model import random_config, random_model

    def make(name="m", seed=0, prequantize=False, **kw):
        out = tmp_path / name
        save_model(random_model(random_config(**kw), seed), out, prequantize=prequantize)
        return out

    return make
