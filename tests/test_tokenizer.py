"""Tokenizer, special ids and prompts (export.tokenizer) against transformers / tokenizers as the reference, and
mote-run decoding through a model's own (non-byte) tokenizer."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mote.export.errors import InputError
from mote.export.generate import greedy_generate
from mote.export.tokenizer import (SpecialIds, load_tokenizer, require_tokenizer, resolve_special_ids,
                                   verification_prompt)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["Describe the image in one sentence.", "hello world, this is a tiny corpus", "the cat sat on the mat",
          "a red circle in the upper left corner"] * 4
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
            "<|{{ m['role'] }}|>\n"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def bpe_tokenizer(vocab_size=300):
    """A small byte-level BPE trained on the spot (deterministic), with special and image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def save_hf_tokenizer(d: Path, chat_template=TEMPLATE, **special) -> Path:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) as transformers writes them."""
    from transformers import PreTrainedTokenizerFast

    kw = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", **special}
    PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(), chat_template=chat_template,
                            **{k: v for k, v in kw.items() if v is not None}).save_pretrained(d)
    return d


def fake_cfg(vision=True, vocab_size=300, **ids):
    """The parts of a MoteConfig the tokenizer reads."""
    base = {"bos_token_id": None, "eos_token_ids": (), "pad_token_id": None, "image_token_id": 3 if vision else None}
    return SimpleNamespace(vocab_size=vocab_size, vision=SimpleNamespace(image_size=16) if vision else None,
                           **{**base, **ids})


def hf_chat_ids(d, messages):
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# -- the byte vocabulary of the shipped example ------------------------------------------------------------------

def test_example_prompt_is_bos_image_then_utf8_bytes():
    from mote.export.config import load_config

    cfg = load_config(EXAMPLE)
    tok = require_tokenizer(EXAMPLE, cfg)
    assert tok.source == "tokenizer.json"          # shipped with the example
    text = "Describe the image: é"
    prompt = tok.prompt(text, with_image=True)
    assert prompt.ids == [256, 259] + list(text.encode("utf-8"))
    assert prompt.source == "tokenizer"
    assert tok.prompt(text, with_image=False).ids == [256] + list(text.encode("utf-8"))
    assert prompt.special.eos == (257,) and prompt.special.image == 259


def test_shipped_byte_tokenizer_reads_the_same_in_transformers():
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(EXAMPLE / "tokenizer.json"))
    text = "one yellow triangle, ünïcode ✓"
    assert hf.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    ids = [256, 259] + list(text.encode("utf-8")) + [257]
    tok = require_tokenizer(EXAMPLE, fake_cfg(vocab_size=260, bos_token_id=256, eos_token_ids=(257,),
                                              image_token_id=259))
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


# -- a real (BPE) tokenizer with a chat template -------------------------------------------------------------------

@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_prompt_matches_transformers_apply_chat_template(tmp_path, where):
    d = save_hf_tokenizer(tmp_path / "tok")
    if where == "tokenizer_config.json":   # the older place of the template
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = (d / "chat_template.jinja").read_text()
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        (d / "chat_template.jinja").unlink()
    text = "Describe the image in one sentence."
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    tok = load_tokenizer(d, fake_cfg())
    prompt = tok.prompt(text, with_image=True)
    assert prompt.source == "chat_template"
    assert prompt.ids == hf_chat_ids(d, with_image)
    assert prompt.ids.count(3) == 1                     # "<image>" became the config's image token id
    # a multimodal model without an image: typed text content; a text-only model: plain string content
    assert tok.prompt(text, with_image=False).ids == hf_chat_ids(
        d, [{"role": "user", "content": [{"type": "text", "text": text}]}])
    text_only = load_tokenizer(d, fake_cfg(vision=False))
    assert text_only.prompt(text, with_image=False).ids == hf_chat_ids(d, [{"role": "user", "content": text}])


def test_no_chat_template_prompt_is_bos_image_text(tmp_path):
    from transformers import AutoTokenizer

    d = save_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(d, fake_cfg())
    text = "hello world"
    plain = AutoTokenizer.from_pretrained(d).encode(text, add_special_tokens=False)
    prompt = tok.prompt(text, with_image=True, use_chat_template=False)
    assert prompt.source == "tokenizer" and prompt.ids == [1, 3] + plain      # <s> is 1, <image> is 3
    (d / "chat_template.jinja").unlink()
    assert tok.prompt(text, with_image=False).ids == [1] + plain


def test_chat_template_errors_are_one_input_error_line(tmp_path):
    d = save_hf_tokenizer(tmp_path / "tok", chat_template="{{ raise_exception('no images here') }}")
    with pytest.raises(InputError, match="chat_template.jinja: chat template failed: no images here"):
        load_tokenizer(d, fake_cfg()).prompt("x", with_image=True)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'][1]['text'] }}{% endfor %}")
    with pytest.raises(InputError, match="does not tokenize to the image token id 3"):
        load_tokenizer(d, fake_cfg()).prompt("x", with_image=True)


def test_decode_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    d = save_hf_tokenizer(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(d)
    ids = [1, 3] + hf.encode("the cat sat on the mat, hello world", add_special_tokens=False) + [2, 0]
    assert load_tokenizer(d, fake_cfg()).decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_word_level_decode_with_cleanup_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "it", "is", "n't", "a", "cat", ".", ",", "?"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.pre_tokenizer, wl.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    d = tmp_path / "wl"
    PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                            clean_up_tokenization_spaces=True).save_pretrained(d)
    ids = [1, 3, 5, 7, 9, 4, 6, 10, 8, 2]
    expected = AutoTokenizer.from_pretrained(d).decode(ids, skip_special_tokens=True)
    assert " ," not in expected                        # the cleanup is active in the reference
    assert load_tokenizer(d, fake_cfg(vision=False, vocab_size=11)).decode(ids) == expected


# -- special ids ---------------------------------------------------------------------------------------------------

def test_special_ids_follow_generation_config_then_config_then_tokenizer_config(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    d = save_hf_tokenizer(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(d)
    # nothing in the config: tokenizer_config.json's strings, mapped through the vocabulary
    tok = load_tokenizer(d, fake_cfg())
    assert (tok.special.bos, tok.special.eos, tok.special.pad) == (hf.bos_token_id, (hf.eos_token_id,), hf.pad_token_id)
    assert tok.special.sources["eos"] == "tokenizer_config.json"
    # the config's ids win over the tokenizer's
    tok = load_tokenizer(d, fake_cfg(bos_token_id=7, eos_token_ids=(8, 9)))
    assert (tok.special.bos, tok.special.eos, tok.special.sources["eos"]) == (7, (8, 9), "config.json")
    # generation_config.json (an int or a list of eos ids) wins over both, as in transformers' generate()
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [6, 2]}))
    gen = GenerationConfig.from_pretrained(d)
    tok = load_tokenizer(d, fake_cfg(bos_token_id=7, eos_token_ids=(8, 9)))
    assert (tok.special.bos, tok.special.eos) == (gen.bos_token_id, tuple(gen.eos_token_id))
    assert tok.special.sources["eos"] == "generation_config.json" and tok.special.pad == hf.pad_token_id
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 4000}))
    with pytest.raises(InputError, match=r"generation_config.json: 'eos_token_id': expected a token id in \[0, 300\)"):
        load_tokenizer(d, fake_cfg())


def test_unknown_special_ids_stay_unknown(tmp_path):
    d = save_hf_tokenizer(tmp_path / "tok", bos_token=None, eos_token=None, pad_token=None)
    special = resolve_special_ids(d, fake_cfg(vision=False), load_tokenizer(d, fake_cfg(vision=False)).backend)
    assert (special.bos, special.eos, special.pad, special.image) == (None, (), None, None)


# -- generation and the runner constants ---------------------------------------------------------------------------

class ScriptedRunner:
    """Emits a fixed token sequence, whatever the inputs."""
    max_seq_len = 64

    def __init__(self, script, vocab=16):
        self.script, self.vocab = script, vocab

    def reset(self):
        self.step = 0

    def token_embedding(self, tokens):
        return torch.zeros(1, tokens.shape[1], 4)

    def vision_encoder(self, pixel_values):
        return torch.zeros(1, 3, 4)

    def text_decoder(self, embeds, input_pos):
        logits = torch.zeros(1, embeds.shape[1], self.vocab)
        logits[0, -1, self.script[self.step]] = 1.0
        self.step += 1
        return logits


def test_greedy_generation_stops_at_any_eos_id():
    script = [5, 11, 9, 7, 2, 3, 4, 5]
    assert greedy_generate(ScriptedRunner(script), [1, 2], None, 8, SpecialIds(eos=(7, 9)))[0] == [5, 11, 9]
    assert greedy_generate(ScriptedRunner(script), [1, 2], None, 8, SpecialIds(eos=(7,)))[0] == [5, 11, 9, 7]
    # no eos known: runs to max_new_tokens
    assert greedy_generate(ScriptedRunner(script), [1, 2], None, 6, SpecialIds())[0] == script[:6]


def test_prompt_longer_than_the_kv_cache_is_an_input_error():
    with pytest.raises(InputError, match="the prompt takes 65 positions"):
        greedy_generate(ScriptedRunner([1]), list(range(1, 66)), None, 4, SpecialIds())


def test_executorch_constants_leave_out_unknown_ids():
    from mote.targets.executorch import constant_methods

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=300, num_hidden_layers=2))
    known = constant_methods(model, 48, SpecialIds(bos=1, eos=(2, 7)))
    assert known["get_bos_id"] == 1 and known["get_eos_ids"] == [2, 7]
    unknown = constant_methods(model, 48, SpecialIds())
    assert "get_bos_id" not in unknown and "get_eos_ids" not in unknown and unknown["get_vocab_size"] == 300


# -- without a tokenizer -----------------------------------------------------------------------------------------

def test_synthetic_verification_prompt_without_a_tokenizer(tmp_path):
    cfg = fake_cfg(bos_token_id=1, eos_token_ids=(2,))
    a = verification_prompt(tmp_path, cfg, "ignored", with_image=True)
    assert a.source == "synthetic" and a == verification_prompt(tmp_path, cfg, "other", with_image=True)
    assert a.ids[:2] == [1, 3] and len(a.ids) == 14
    assert all(0 <= t < 300 and t not in (1, 2, 3) for t in a.ids[2:])


# -- mote-run through a real tokenizer ----------------------------------------------------------------------------

def test_mote_run_decodes_through_the_models_own_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    from mote.export.generate import EagerRunner
    from mote.export.io_utils import decode as byte_decode
    from mote.export.loader import load_model, save_model
    from mote.tools import cli, run
    from mote.tools.make_random_model import random_config, random_model

    d = tmp_path / "model"
    model = random_model(random_config(vocab=300, vision=False, layers=1, hidden=32, expert_intermediate=32,
                                       intermediate=64), 3)
    save_model(model, d)
    save_hf_tokenizer(d, chat_template=None)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    out = tmp_path / "out"
    assert cli.main(["--target", "onnx", str(d), "-o", str(out), "--quiet", "--max-seq-len", "32"]) == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (d / name).read_bytes(), name
    capsys.readouterr()

    assert run.main([str(out), "--prompt", "the cat sat", "--max-new-tokens", "10"]) == 0
    printed = capsys.readouterr().out

    hf = AutoTokenizer.from_pretrained(d)
    ids = [1] + hf.encode("the cat sat", add_special_tokens=False)
    ref, _ = greedy_generate(EagerRunner(load_model(d), 32), ids, None, 10, SpecialIds(eos=(2,)))
    expected = hf.decode(ref, skip_special_tokens=True)
    assert printed == expected + "\n"
    assert expected != byte_decode(ref)               # the byte vocabulary would have printed something else

    # without a tokenizer (and no byte vocabulary) mote-run refuses with one line, exit 2
    (out / "tokenizer.json").unlink()
    assert run.main([str(out), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer.json" in err[0]
