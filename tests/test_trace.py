"""torch.export of the three programs: dynamic sequence length, no data-dependent ops, equal to eager."""
import pytest
import torch

from mote.export.errors import InputError
from mote.export.programs import KVCacheStyle, export_programs
from mote.tools.make_random_model import random_config, random_model

DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten.index.Tensor", "aten.unique.default",
                  "aten._local_scalar_dense.default", "aten.item.default"}


@pytest.fixture(scope="module")
def model():
    return random_model(random_config(layers=2, top_k=2, shared_expert_gate=True), 31)


@pytest.fixture(scope="module")
def programs(model):
    return {kv: export_programs(model, 24, kv) for kv in KVCacheStyle}


def test_no_data_dependent_ops(programs):
    for kv, eps in programs.items():
        for name, ep in eps.items():
            ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
            assert not ops & DATA_DEPENDENT, (kv, name, ops & DATA_DEPENDENT)


@pytest.mark.parametrize("seq_len", [1, 5, 17])
def test_decoder_equals_eager_at_several_lengths(model, programs, seq_len):
    x = torch.randn(1, seq_len, 64)
    pos = torch.tensor([24 - seq_len])          # also a non-zero start position
    k, v = model.new_cache(24)
    ref, ref_k, ref_v = model.decode(x, pos, k, v)
    out = programs[KVCacheStyle.IO]["text_decoder"].module()(x, pos, *model.new_cache(24))
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref_k[0], rtol=1e-6, atol=1e-6)
    stateful = programs[KVCacheStyle.STATE]["text_decoder"].module()
    torch.testing.assert_close(stateful(x, pos), ref, rtol=1e-5, atol=1e-5)
    # the in-place cache of the stateful program was written at the right slots
    torch.testing.assert_close(stateful.k_cache_0[:, :, 24 - seq_len:], ref_k[0][:, :, 24 - seq_len:])


@pytest.mark.parametrize("seq_len", [1, 9])
def test_embedding_and_vision_equal_eager(model, programs, seq_len):
    tokens = torch.randint(0, 260, (1, seq_len))
    ep = programs[KVCacheStyle.IO]
    assert torch.equal(ep["token_embedding"].module()(tokens), model.embed(tokens))
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ep["vision_encoder"].module()(pixels), model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_text_only_model_has_no_vision_program():
    eps = export_programs(random_model(random_config(vision=False), 1), 8, KVCacheStyle.IO)
    assert sorted(eps) == ["text_decoder", "token_embedding"]


def test_max_seq_len_is_validated(model):
    with pytest.raises(InputError, match="max-seq-len"):
        export_programs(model, 10_000, KVCacheStyle.IO)
