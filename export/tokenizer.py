"""The model's tokenizer, its special token ids and the generation prompt, read from a model directory (or a
mote-export output directory, which carries the same side files) the way `transformers` reads them, with the
`tokenizers` library and jinja2 only.

- Tokenizer: the directory's `tokenizer.json`; without one, a model with our 260-token byte vocabulary gets the
  byte-level tokenizer.json of `io_utils.byte_tokenizer_json`; anything else has no tokenizer (`load_tokenizer`
  returns None: mote-run refuses, the export's numerics check uses a synthetic token-id prompt).
- Special ids (`resolve_special_ids`): bos / eos (several allowed) / pad from `generation_config.json` when it has
  them (what `transformers`' `generate` uses: `GenerationMixin` loads that file over the model config), else the
  model config, else `tokenizer_config.json`'s token strings mapped through the vocabulary; the image placeholder
  id from the model config. An id nobody knows stays None / empty.
- Prompt: the directory's chat template rendered as `apply_chat_template(..., add_generation_prompt=True)` does,
  tokenized without adding special tokens again; without a template, BOS + image placeholder + the prompt's
  tokens (for the byte vocabulary exactly `[BOS] [IMAGE] utf-8 bytes`, the layout the example was trained on).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime
from pathlib import Path

from .config import read_json
from .errors import InputError
from .io_utils import BYTE_VOCAB, byte_tokenizer_json

# Files that travel from the model directory into the export's output directory, verbatim when present: mote-run
# and stock runners (ExecuTorch's MultimodalRunner, transformers) read the vocabulary, special tokens, chat
# template and image preprocessing from them.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.jinja", "chat_template.json")

# The named special tokens `transformers` hands to a chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Text ids in the verification prompt of a model without a tokenizer (seeded, so reports are comparable).
SYNTHETIC_PROMPT_LEN = 12


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int | None = None
    eos: tuple[int, ...] = ()
    pad: int | None = None
    image: int | None = None
    # where each known id came from, e.g. {"bos": "config.json", "eos": "generation_config.json"}
    sources: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Token ids of a generation prompt, the special ids that go with them, and how the ids were made:
    "chat_template", "tokenizer" (BOS + image + encoded text) or "synthetic" (no tokenizer)."""
    ids: list[int]
    special: SpecialIds
    source: str


def _json_object(path: Path) -> dict:
    """A JSON object file's contents; {} when the file does not exist."""
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _token_string(value, where: str) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise InputError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r}")


def tokenizer_config(model_dir: Path) -> dict:
    """tokenizer_config.json, with the legacy special_tokens_map.json merged in as transformers does (only for
    configs without `added_tokens_decoder`, and then the map's values win)."""
    model_dir = Path(model_dir)
    cfg = _json_object(model_dir / "tokenizer_config.json")
    if "added_tokens_decoder" not in cfg:
        cfg.update(_json_object(model_dir / "special_tokens_map.json"))
    return cfg


def named_special_tokens(model_dir: Path) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the special-token strings transformers passes to a chat template
    (the named ones, plus model-specific `*_token` keys and the dict form of `extra_special_tokens`)."""
    where = str(Path(model_dir) / "tokenizer_config.json")
    cfg = tokenizer_config(model_dir)
    named = {}
    for key, value in cfg.items():
        if key in _NAMED_TOKENS or (key.endswith("_token") and isinstance(value, (str, dict))):
            token = _token_string(value, f"{where}: '{key}'")
            if token is not None:
                named[key] = token
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, dict):
        for key, value in extra.items():
            token = _token_string(value, f"{where}: 'extra_special_tokens.{key}'")
            if token is not None:
                named[key] = token
    return named


class Tokenizer:
    """A `tokenizers.Tokenizer` with the directory's special ids, special-token strings and chat template."""

    def __init__(self, model_dir: Path, cfg, backend, source: str):
        self.model_dir, self.cfg, self.backend, self.source = Path(model_dir), cfg, backend, source
        self.special = resolve_special_ids(model_dir, cfg, backend)
        self._tc = tokenizer_config(model_dir)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        # transformers' optional cleanup (off by default; it never applies it to BPE models, where it corrupts text)
        if self._tc.get("clean_up_tokenization_spaces") and type(self.backend.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def chat_template(self) -> tuple[str, str] | None:
        """(template, file it came from), in transformers' precedence. A multimodal model's prompts go through its
        processor, which reads processor_config.json's `chat_template`, then chat_template.json, then
        chat_template.jinja (we then also accept the tokenizer's); a text-only model's tokenizer reads
        chat_template.jinja, then tokenizer_config.json's `chat_template`."""
        names = ["chat_template.jinja", "tokenizer_config.json"]
        if self.cfg.vision is not None:
            names = ["processor_config.json", "chat_template.json"] + names
        for name in names:
            path = self.model_dir / name
            if not path.is_file():
                continue
            if name.endswith(".jinja"):
                return path.read_text(encoding="utf-8"), str(path)
            template = _json_object(path).get("chat_template")
            if isinstance(template, list):   # several named templates (tokenizer_config.json): the "default" one
                template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(template, dict):
                if "default" not in template:
                    raise InputError(f"{path}: 'chat_template' has no template named 'default'")
                template = template["default"]
            if template is None:
                continue
            if not isinstance(template, str):
                raise InputError(f"{path}: 'chat_template' must be a string, got {type(template).__name__}")
            return template, str(path)
        return None

    def prompt(self, text: str, with_image: bool, use_chat_template: bool = True) -> Prompt:
        image = self.special.image
        if with_image and image is None:
            raise InputError(f"{self.model_dir}: an image was given but the model config has no image token id")
        found = self.chat_template() if use_chat_template else None
        if found is not None:
            template, where = found
            ids = self.encode(render_chat_template(template, self._messages(text, with_image),
                                                   named_special_tokens(self.model_dir), where))
            if with_image and image not in ids:
                raise InputError(f"{where}: the chat template's image placeholder does not tokenize to the image "
                                 f"token id {image}")
            return Prompt(ids, self.special, "chat_template")
        ids = [] if self.special.bos is None else [self.special.bos]
        ids += [image] if with_image else []
        return Prompt(ids + self.encode(text), self.special, "tokenizer")

    def _messages(self, text: str, with_image: bool) -> list[dict]:
        # Multimodal (processor) templates read a list of typed content parts; text-only tokenizer templates (e.g.
        # Qwen2.5's) print `message.content` as is, so a text-only model gets a plain string.
        if with_image:
            content = [{"type": "image"}, {"type": "text", "text": text}]
        elif self.cfg.vision is not None:
            content = [{"type": "text", "text": text}]
        else:
            content = text
        return [{"role": "user", "content": content}]


def render_chat_template(template: str, messages: list[dict], special_tokens: dict[str, str], where: str) -> str:
    """Render like transformers' `render_jinja_template`: sandboxed, trim_blocks + lstrip_blocks, loop controls,
    `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, `{% generation %}` blocks rendered as is;
    the special-token strings as variables; add_generation_prompt=True."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers' AssistantTracker only records where assistant text is; the rendered text is the body itself
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=True, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"{where}: chat template failed: {e}") from None


def _id_value(value, where: str, vocab_size: int, many: bool = False):
    """An id (or, for eos, an int or a list of ints) from a JSON file, checked against the vocabulary."""
    values = value if many and isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise InputError(f"{where}: expected a token id in [0, {vocab_size}), got {value!r}")
    return tuple(values) if many else value


def config_special_ids(cfg) -> SpecialIds:
    """The ids the model config alone knows."""
    ids = {"bos": cfg.bos_token_id, "eos": tuple(cfg.eos_token_ids), "pad": cfg.pad_token_id,
           "image": cfg.image_token_id}
    return SpecialIds(**ids, sources={k: "config.json" for k, v in ids.items() if v not in (None, ())})


def resolve_special_ids(model_dir: Path, cfg, backend=None) -> SpecialIds:
    """bos / eos / pad: generation_config.json, else the model config, else tokenizer_config.json's token strings
    (mapped with the tokenizer's vocabulary; `backend` is a `tokenizers.Tokenizer` or None); image: the model config."""
    gen_path = Path(model_dir) / "generation_config.json"
    gen = _json_object(gen_path)
    config = config_special_ids(cfg)
    tokens = named_special_tokens(model_dir) if backend is not None else {}
    ids = {"image": config.image}
    sources = {"image": "config.json"} if config.image is not None else {}
    for name in ("bos", "eos", "pad"):
        many, key, token = name == "eos", f"{name}_token_id", tokens.get(f"{name}_token")
        from_tokenizer = None if token is None else backend.token_to_id(token)
        candidates = (
            (gen_path.name, None if gen.get(key) is None else
             _id_value(gen[key], f"{gen_path}: '{key}'", cfg.vocab_size, many)),
            ("config.json", getattr(config, name)),
            ("tokenizer_config.json", (from_tokenizer,) if many and from_tokenizer is not None else from_tokenizer),
        )
        found = [(source, value) for source, value in candidates if value not in (None, ())]
        ids[name] = found[0][1] if found else (() if many else None)
        if found:
            sources[name] = found[0][0]
    return SpecialIds(**ids, sources=sources)


def load_tokenizer(model_dir: Path, cfg) -> Tokenizer | None:
    """The directory's tokenizer.json; the byte-level one for our byte vocabulary; else None."""
    from tokenizers import Tokenizer as Backend

    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:   # the tokenizers library raises plain Exceptions for malformed files
            raise InputError(f"{path}: not a tokenizer.json the tokenizers library can read "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return Tokenizer(model_dir, cfg, backend, "tokenizer.json")
    if cfg.vocab_size == BYTE_VOCAB:
        return Tokenizer(model_dir, cfg, Backend.from_str(byte_tokenizer_json_text()), "byte vocabulary")
    return None


def require_tokenizer(model_dir: Path, cfg) -> Tokenizer:
    tok = load_tokenizer(model_dir, cfg)
    if tok is None:
        raise InputError(f"{model_dir}: no tokenizer.json (and vocab_size {cfg.vocab_size} is not the byte "
                         f"vocabulary), so prompts cannot be tokenized nor tokens decoded")
    return tok


def synthetic_prompt(cfg, special: SpecialIds, with_image: bool) -> Prompt:
    """A fixed token-id prompt for models without a tokenizer: BOS (if known) + image placeholder (if an image) +
    SYNTHETIC_PROMPT_LEN seeded ids that are none of the special ids."""
    import torch

    reserved = {special.bos, special.pad, special.image, *special.eos} - {None}
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, cfg.vocab_size, (SYNTHETIC_PROMPT_LEN + len(reserved),), generator=gen).tolist()
    text = [t for t in pool if t not in reserved][:SYNTHETIC_PROMPT_LEN]
    ids = ([] if special.bos is None else [special.bos]) + ([special.image] if with_image else []) + text
    return Prompt(ids, special, "synthetic")


def verification_prompt(model_dir: Path, cfg, text: str, with_image: bool) -> Prompt:
    """The prompt the export's numerics check runs: what mote-run would build from `text`, or a synthetic one."""
    tok = load_tokenizer(model_dir, cfg)
    if tok is None:
        special = resolve_special_ids(model_dir, cfg)
        if with_image and special.image is None:
            raise InputError(f"{model_dir}: the model has a vision tower but no image token id")
        return synthetic_prompt(cfg, special, with_image)
    return tok.prompt(text, with_image)


def copy_side_files(model_dir: Path, cfg, out_dir: Path) -> list[str]:
    """Copy SIDE_FILES that exist, verbatim; a byte-vocabulary model without tokenizer.json gets the byte-level
    one. Returns the names written."""
    written = []
    for name in SIDE_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, Path(out_dir) / name)
            written.append(name)
    if "tokenizer.json" not in written and cfg.vocab_size == BYTE_VOCAB:
        (Path(out_dir) / "tokenizer.json").write_text(byte_tokenizer_json_text(), encoding="utf-8")
        written.append("tokenizer.json")
    return written


def byte_tokenizer_json_text() -> str:
    """The byte-level tokenizer.json as shipped with the example (and written for byte-vocabulary exports)."""
    return json.dumps(byte_tokenizer_json(), ensure_ascii=False, sort_keys=True)
