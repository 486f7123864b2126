"""The loader keeps routed experts only as packed 2-bit codes + scales, computed from the file's own tensors.

Expected values come from the safetensors file read here directly and DESIGN.md section 1's absmean formula written
out in the test, not from the loader.
"""
import pytest
import torch
from safetensors import safe_open

from mote.export.loader import load_model
from mote.export.model import TernaryLinear

EXPERT = "model.layers.0.mlp.experts.1.up_proj"


def _file_tensor(d, name):
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def _trits_from_codes(packed, k):
    codes = torch.stack([(packed.long() >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(packed.shape[0], -1)
    return (codes[:, :k] - 2).float()


@pytest.mark.parametrize("per_channel", [False, True])
def test_latent_experts_are_ternarised_and_packed_as_read(make_model_dir, per_channel):
    d = make_model_dir(layers=1, per_channel=per_channel)
    model = load_model(d)
    w = _file_tensor(d, f"{EXPERT}.weight").float()
    scale = (w.abs().mean(-1, keepdim=True) if per_channel else w.abs().mean()).clamp(min=1e-5)
    trits = torch.clamp(torch.round(w / scale), -1, 1)

    module = model.get_submodule(EXPERT)
    assert module.packed and module.weight is None
    assert module.packed_trits.dtype == torch.uint8 and module.packed_trits.shape == (w.shape[0], (w.shape[1] + 3) // 4)
    assert torch.equal(_trits_from_codes(module.packed_trits, w.shape[1]), trits)
    assert torch.equal(module.trit_scale, scale.reshape(-1))
    # no float copy of any routed expert is held
    routed = {k: v for k, v in model.state_dict().items() if ".experts." in k}
    assert routed and all(v.dtype == torch.uint8 or v.dim() == 1 for v in routed.values())
    assert all(m.packed for m in model.modules() if isinstance(m, TernaryLinear))


def test_prequantized_trits_are_packed_as_read(make_model_dir):
    d = make_model_dir(layers=1, prequantize=True, per_channel=True)
    model = load_model(d)
    trits = _file_tensor(d, f"{EXPERT}.weight")
    assert trits.dtype == torch.int8
    module = model.get_submodule(EXPERT)
    assert torch.equal(_trits_from_codes(module.packed_trits, trits.shape[1]), trits.float())
    assert torch.equal(module.trit_scale, _file_tensor(d, f"{EXPERT}.weight_scale").reshape(-1))


def test_packed_model_computes_what_the_latent_one_does(make_model_dir):
    """The eager forward over packed experts (decoding only the experts a token chose) is bit-identical to the
    in-memory latent model the directory was written from."""
    from mote.tools.make_random_model import random_config, random_model

    cfg = random_config(layers=2, top_k=2, experts=4)
    latent = random_model(cfg, 5).eval()
    d = make_model_dir(layers=2, top_k=2, experts=4, seed=5)
    packed = load_model(d)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        a = latent.forward_full(latent.embed(tokens))
        b = packed.forward_full(packed.embed(tokens))
    assert torch.equal(a, b)


def test_saving_a_loaded_model_writes_prequantized_trits(make_model_dir, tmp_path):
    from mote.export.loader import save_model

    d = make_model_dir(layers=1)
    model = load_model(d)
    save_model(model, tmp_path / "again")
    assert _file_tensor(tmp_path / "again", f"{EXPERT}.weight").dtype == torch.int8
    again = load_model(tmp_path / "again")
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
