"""Train the shipped example model (`examples/tiny-mote`): the MoTE recipe in miniature, on 2 CPU cores in minutes.

    python -m mote.tools.train_example --out examples/tiny-mote

0. Vision tower: the ViT is first trained alone with throw-away linear heads (colour / shape / quadrant), then
   frozen, standing in for LLaVA's pretrained CLIP tower (see `pretrain_vision` for why).
1. Dense phase: a small LLaVA-style LMM (ViT tower + projector + Qwen2-style decoder, byte vocabulary) is trained on
   next-byte prediction over a real text corpus (the license texts in /usr/share/common-licenses, or Python stdlib
   docstrings when absent) mixed with a synthetic captioning task: 32x32 images with one shape (circle / square /
   triangle) in one colour in one quadrant on a dark background, captioned
   " one red circle in the upper left corner." after the prompt "Describe the image:".
   The captioning sequence has exactly the layout of `mote.export.generate`: [BOS] [image embeddings] prompt bytes,
   then caption bytes + EOS; the loss is on the caption tokens only.
2. Up-cycling: the MoE layers' dense FFN becomes the frozen full-precision shared expert; 4 routed experts are
   initialised from it (plus a little noise) as latent QAT weights; the router starts small and random.
3. QAT phase: training continues in train() mode (TernaryLinear's straight-through estimators: ternary weights,
   int8 activations) with a Switch-style load-balancing loss on the router logits.

Everything is seeded and step-based (no wall-clock decisions), so the same command gives byte-identical weights.
The result is saved with `save_model` (latent expert weights) plus a sample image, its labels, the prompt and a
README with the measured held-out caption accuracy, then loaded back and checked through `greedy_generate`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

if __name__ == "__main__":
    # Idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning workers made a step ~20x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from mote.export.config import parse_config
from mote.export.generate import EagerRunner, greedy_generate
from mote.export.images import load_pixel_values, preprocess_image, write_image
from mote.export.io_utils import BOS, BYTE_VOCAB, EOS, IMAGE, PAD, decode, encode
from mote.export.loader import load_model, save_model
from mote.export.model import MoteBlock, MoteForConditionalGeneration
from mote.export.tokenizer import byte_tokenizer_json_text, require_tokenizer

PROMPT = "Describe the image:"
IMAGE_SIZE = 32
MAX_SEQ_LEN = 128
COLORS = {  # name -> base RGB (jittered per image)
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 235),
    "yellow": (235, 220, 50), "white": (240, 240, 240), "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("upper left", "upper right", "lower left", "lower right")
MOE_LAYERS = [1, 3]   # 2 of 4 layers: with latent fp32 experts in every layer the directory would be ~9 MB
NUM_EXPERTS = 4
TEXT_LEN = 64


def caption_text(color: str, shape: str, position: str) -> str:
    """What the model is trained to write after the prompt (leading space: it continues "Describe the image:").

    41..47 bytes: long enough that a 32-token greedy decode stays inside the caption, short enough that the whole
    caption plus EOS fits in a 48-token decode (so exact match is checkable there).
    """
    return f" one {color} {shape} in the {position} corner."


# -- config ---------------------------------------------------------------------------------------------------------

def config_dict(moe_layers) -> dict:
    return {
        "model_type": "mote", "vocab_size": BYTE_VOCAB, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "max_position_embeddings": MAX_SEQ_LEN, "tie_word_embeddings": True,
        "bos_token_id": BOS, "eos_token_id": EOS, "image_token_id": IMAGE, "attention_bias": True,
        "moe": {"num_experts": NUM_EXPERTS, "top_k": 1, "norm_topk_prob": False, "expert_intermediate_size": 256,
                "moe_layers": moe_layers, "weight_scale": "per_tensor", "activation_bits": 8,
                "shared_expert_gate": False},
        "vision": {"image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3, "hidden_size": 64, "num_layers": 2,
                   "num_heads": 4, "intermediate_size": 128, "layer_norm_eps": 1e-5},
    }


# -- data: text -----------------------------------------------------------------------------------------------------

def load_corpus() -> tuple[bytes, str]:
    root = Path("/usr/share/common-licenses")
    seen, parts = set(), []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            real = p.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            parts.append(real.read_bytes())
    if sum(map(len, parts)) >= 50_000:
        return b"\n\n".join(parts), f"{root} ({len(parts)} license texts)"
    # Fallback: docstrings of the Python standard library (always present where Python is).
    import importlib
    import inspect
    parts = []
    for name in ("os", "re", "json", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess",
                 "typing", "dataclasses", "logging", "random", "statistics", "string", "textwrap", "zipfile"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc:
                parts.append(doc.encode())
    return b"\n\n".join(parts), "Python standard library docstrings"


class TextData:
    """Random byte windows; the last 5% of the corpus is held out for validation."""

    def __init__(self, corpus: bytes):
        data = torch.tensor(list(corpus), dtype=torch.long)
        cut = int(len(data) * 0.95)
        self.train, self.val = data[:cut], data[cut:]

    def batch(self, n: int, gen: torch.Generator, split: str = "train"):
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - TEXT_LEN - 1, (n,), generator=gen)
        win = torch.stack([data[s:s + TEXT_LEN + 1] for s in starts.tolist()])
        return win[:, :-1], win[:, 1:]


# -- data: synthetic captioning -------------------------------------------------------------------------------------

def _randint(gen, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def render(color: str, shape: str, position: str, gen: torch.Generator) -> torch.Tensor:
    """One 32x32 uint8 RGB image: a shape of the given colour in the given quadrant on a dark, noisy background."""
    s = IMAGE_SIZE
    bg = torch.randint(0, 41, (3,), generator=gen).float()
    img = bg[None, None, :] + torch.randint(0, 13, (s, s, 3), generator=gen).float()
    oy = 0 if position.startswith("upper") else s // 2
    ox = 0 if position.endswith("left") else s // 2
    r = _randint(gen, 4, 6)
    cy = oy + s // 4 + _randint(gen, -1, 1)
    cx = ox + s // 4 + _randint(gen, -1, 1)
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= r * r
    elif shape == "square":
        mask = (dy.abs() <= r - 0.5) & (dx.abs() <= r - 0.5)
    else:  # triangle, apex up: half-width grows linearly from 0 at the apex to r at the base
        t = (dy + r) / (2 * r)
        mask = (t >= 0) & (t <= 1) & (dx.abs() <= r * t)
    rgb = torch.tensor(COLORS[color], dtype=torch.float32) + torch.randint(-20, 21, (3,), generator=gen).float()
    img = torch.where(mask[..., None], rgb[None, None, :], img)
    return img.round().clamp(0, 255).to(torch.uint8)


def random_labels(n: int, gen: torch.Generator):
    colors, idx = list(COLORS), []
    for _ in range(n):
        idx.append((colors[_randint(gen, 0, len(colors) - 1)], SHAPES[_randint(gen, 0, 2)], POSITIONS[_randint(gen, 0, 3)]))
    return idx


def all_combinations():
    return [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


assert all(40 <= len(caption_text(*lab)) <= 47 for lab in all_combinations())


def image_hash(img: torch.Tensor) -> str:
    return hashlib.sha1(img.numpy().tobytes()).hexdigest()


class CaptionData:
    def __init__(self, prompt: str):
        self.prompt_ids = encode(prompt)
        self.train_hashes: set[str] = set()

    def images(self, n: int, gen: torch.Generator):
        """n random training images (pixel values) and their (colour, shape, position) labels."""
        labels = random_labels(n, gen)
        imgs = [render(*lab, gen) for lab in labels]
        self.train_hashes.update(image_hash(i) for i in imgs)
        return torch.cat([preprocess_image(i, IMAGE_SIZE) for i in imgs]), labels

    def batch(self, n: int, gen: torch.Generator):
        pixels, labels = self.images(n, gen)
        return pixels, [encode(caption_text(*lab)) + [EOS] for lab in labels]


def caption_forward(model: MoteForConditionalGeneration, pixels, caps, prompt_ids):
    """Teacher-forced forward over [BOS][image][prompt][caption EOS] (right-padded); loss on caption tokens only."""
    b = pixels.shape[0]
    n_img = model.config.vision.num_patches
    width = max(map(len, caps))
    text = torch.full((b, 1 + len(prompt_ids) + width), PAD, dtype=torch.long)
    text[:, 0] = BOS
    text[:, 1:1 + len(prompt_ids)] = torch.tensor(prompt_ids)
    for i, c in enumerate(caps):
        text[i, 1 + len(prompt_ids):1 + len(prompt_ids) + len(c)] = torch.tensor(c)
    tok_emb = model.embed(text)
    embeds = torch.cat([tok_emb[:, :1], model.encode_image(pixels), tok_emb[:, 1:]], dim=1)
    logits = _full_forward(model, embeds)
    # position of token j of `text` in the sequence (j >= 1): j + n_img; the caption starts at text index 1+len(prompt)
    first = 1 + len(prompt_ids)
    pred = logits[:, first + n_img - 1:-1]          # predicts text[:, first:]
    target = text[:, first:]
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=PAD)
    valid = torch.cat([torch.ones(b, n_img + 1, dtype=torch.bool), text[:, 1:] != PAD], dim=1)
    return loss, valid


def _full_forward(model, embeds):
    """model.decode over the whole (batched) sequence with fresh caches of exactly its length."""
    cfg = model.config
    b, t = embeds.shape[:2]
    shape = (b, cfg.num_key_value_heads, t, cfg.head_dim)
    k = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    v = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    logits, _, _ = model.decode(embeds, torch.zeros(1, dtype=torch.long), k, v)
    return logits


def load_balance_loss(model, valid) -> torch.Tensor:
    """Switch Transformer auxiliary loss E * sum_i f_i * P_i, averaged over the MoE layers (valid tokens only)."""
    losses = []
    for logits in model.router_logits():
        lg = logits[valid]
        e = lg.shape[-1]
        probs = torch.softmax(lg, dim=-1)
        frac = F.one_hot(probs.argmax(-1), e).float().mean(0)
        losses.append(e * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean() if losses else torch.zeros(())


# -- evaluation -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def batched_greedy(model, pixels, prompt_ids, max_new: int) -> list[list[int]]:
    """Greedy decoding of a batch through model.decode with a KV cache (all prompts have the same length)."""
    model.eval()
    cfg = model.config
    b = pixels.shape[0]
    shape = (b, cfg.num_key_value_heads, MAX_SEQ_LEN, cfg.head_dim)
    k = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    v = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    bos = model.embed(torch.full((b, 1), BOS, dtype=torch.long))
    prm = model.embed(torch.tensor([prompt_ids] * b, dtype=torch.long))
    embeds = torch.cat([bos, model.encode_image(pixels), prm], dim=1)
    logits, k, v = model.decode(embeds, torch.zeros(1, dtype=torch.long), k, v)
    pos = embeds.shape[1]
    out = []
    tok = logits[:, -1].argmax(-1)
    for _ in range(max_new):
        out.append(tok)
        if pos >= MAX_SEQ_LEN:
            break
        logits, k, v = model.decode(model.embed(tok[:, None]), torch.tensor([pos]), k, v)
        pos += 1
        tok = logits[:, -1].argmax(-1)
    seqs = torch.stack(out, dim=1).tolist()
    return [s[:s.index(EOS) + 1] if EOS in s else s for s in seqs]


def caption_scores(outputs: list[list[int]], labels) -> dict:
    exact = slots = 0
    per = {"color": 0, "shape": 0, "position": 0}
    for toks, (c, s, p) in zip(outputs, labels):
        exact += toks == encode(caption_text(c, s, p)) + [EOS]
        text = decode(toks)
        got = parse_caption(text)
        for key, want in zip(("color", "shape", "position"), (c, s, p)):
            per[key] += got.get(key) == want
    n = len(labels)
    return {"exact": exact / n, **{k: v / n for k, v in per.items()}}


def parse_caption(text: str) -> dict:
    """Which colour / shape / position words a decoded caption names (only if exactly one of each kind)."""
    words = text.lower()
    found = {}
    for key, names in (("color", list(COLORS)), ("shape", list(SHAPES)), ("position", list(POSITIONS))):
        hits = [n for n in names if n in words]
        if len(hits) == 1:
            found[key] = hits[0]
    return found


@torch.no_grad()
def text_val_bpb(model, text: TextData, n: int = 64) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    x, y = text.batch(n, gen, "val")
    logits = _full_forward(model, model.embed(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item() / math.log(2)


# -- stage 0: the vision tower --------------------------------------------------------------------------------------

def pretrain_vision(model, steps: int, batch: int, caps: CaptionData, gen: torch.Generator, eval_set) -> dict:
    """Stand-in for LLaVA's pretrained CLIP tower: train the ViT with throw-away linear heads (colour / shape /
    quadrant from the mean-pooled patch features), then freeze it for the LMM phases.

    Without it the tower collapses: early in LMM training the decoder learns the caption template and uses the
    image positions as constant tokens, so the tower's output becomes image-independent and captioning sits at
    chance for a long time (measured: ~1000 steps at chance from scratch, vs. ~100 steps with this stage).
    """
    tower = model.vision_tower
    n_out = len(COLORS) + len(SHAPES) + len(POSITIONS)
    heads = torch.nn.Linear(tower.cfg.hidden_size, n_out)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=gen) * 0.02)
        heads.bias.zero_()
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    colors = list(COLORS)

    def targets(labels):
        return torch.tensor([[colors.index(c), SHAPES.index(s), POSITIONS.index(p)] for c, s, p in labels])

    def head_loss(pixels, y):
        out = heads(tower(pixels).mean(dim=1))
        splits = out.split([len(COLORS), len(SHAPES), len(POSITIONS)], dim=-1)
        return sum(F.cross_entropy(o, y[:, i]) for i, o in enumerate(splits)), splits

    t0 = time.time()
    tower.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3, 20)
        pixels, labels = caps.images(batch, gen)
        loss, _ = head_loss(pixels, targets(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[vision {step:4d}/{steps}] loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    with torch.no_grad():
        pixels_ev, labels_ev = eval_set
        _, splits = head_loss(pixels_ev, targets(labels_ev))
        y = targets(labels_ev)
        acc = {k: float((o.argmax(-1) == y[:, i]).float().mean()) for i, (k, o) in
               enumerate(zip(("color", "shape", "position"), splits))}
    print(f"  eval vision: held-out head accuracy colour {acc['color']:.1%}, shape {acc['shape']:.1%}, "
          f"position {acc['position']:.1%}", flush=True)
    tower.requires_grad_(False)
    return {"seconds": time.time() - t0, **acc}


# -- up-cycling -----------------------------------------------------------------------------------------------------

def upcycle(dense: MoteForConditionalGeneration, moe_layers, gen: torch.Generator, noise: float):
    """Dense -> MoTE: dense FFN -> frozen shared expert; routed experts = FFN weights + noise; small random router."""
    model = MoteForConditionalGeneration(parse_config(config_dict(moe_layers)))
    state = dense.state_dict()
    new_state = {}
    for name, t in model.state_dict().items():
        src = name.replace(".mlp.shared_expert.", ".mlp.")
        if src in state:
            new_state[name] = state[src].clone()
    with torch.no_grad():
        for i in moe_layers:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = state[f"model.layers.{i}.mlp.{proj}.weight"]
                for e in range(NUM_EXPERTS):
                    eps = torch.randn(w.shape, generator=gen) * (noise * w.abs().mean())
                    new_state[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = w + eps
            gate = model.model.layers[i].mlp.gate.weight
            new_state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(gate.shape, generator=gen) * 0.02
    missing = set(model.state_dict()) - set(new_state)
    assert not missing, missing
    model.load_state_dict(new_state, strict=True)
    for i in moe_layers:
        block = model.model.layers[i].mlp
        assert isinstance(block, MoteBlock)
        block.shared_expert.requires_grad_(False)
    model.vision_tower.requires_grad_(False)
    return model


def init_dense(model: MoteForConditionalGeneration, gen: torch.Generator) -> None:
    """GPT-2 style init: N(0, 0.02) for matrices and embeddings (residual outputs scaled down), zero biases."""
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("pos_embed"):
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std = 0.02 / math.sqrt(2 * n_layers)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith(".bias"):
                p.zero_()


# -- training loop --------------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_phase(name, model, opt, peaks, steps, warmup, text, caps, gen, args, eval_set, lb_coef, log):
    prompt_ids = caps.prompt_ids
    t0 = time.time()
    for step in range(steps):
        model.train()
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = lr_at(step, steps, peak, warmup)
        pixels, cap_ids = caps.batch(args.caption_batch, gen)
        cap_loss, valid = caption_forward(model, pixels, cap_ids, prompt_ids)
        lb = load_balance_loss(model, valid) if lb_coef else torch.zeros(())
        x, y = text.batch(args.text_batch, gen)
        logits = _full_forward(model, model.embed(x))
        text_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if lb_coef:
            lb = 0.5 * (lb + load_balance_loss(model, torch.ones(x.shape, dtype=torch.bool)))
        loss = cap_loss + args.text_weight * text_loss + lb_coef * lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        last = step == steps - 1
        if step % 25 == 0 or last:
            print(f"[{name} {step:4d}/{steps}] loss {loss.item():.3f}  caption {cap_loss.item():.3f}  "
                  f"text {text_loss.item():.3f}  lb {lb.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % args.eval_every == 0 or last:
            pixels_ev, labels_ev = eval_set
            outs = batched_greedy(model, pixels_ev, prompt_ids, 64)
            sc = caption_scores(outs, labels_ev)
            wrong = [(decode(o), caption_text(*lab)) for o, lab in zip(outs, labels_ev)
                     if o != encode(caption_text(*lab)) + [EOS]]
            bpb = text_val_bpb(model, text)
            usage = expert_usage(model, pixels_ev[:32], prompt_ids) if lb_coef else None
            print(f"  eval {name} step {step + 1}: held-out caption exact {sc['exact']:.1%} (colour {sc['color']:.1%}, "
                  f"shape {sc['shape']:.1%}, position {sc['position']:.1%}); text val {bpb:.2f} bits/byte"
                  + (f"; expert usage {usage}" if usage else ""), flush=True)
            for got, want in wrong[:3]:
                print(f"    wrong: {got!r} (expected {want!r})", flush=True)
            log.append({"phase": name, "step": step + 1, **sc, "text_bpb": bpb, "seconds": time.time() - t0})
    return time.time() - t0


@torch.no_grad()
def expert_usage(model, pixels, prompt_ids) -> str:
    model.train()  # only to record router logits; the forward itself is the QAT one
    caption_forward(model, pixels, [[EOS]] * pixels.shape[0], prompt_ids)
    parts = []
    for logits in model.router_logits():
        counts = torch.bincount(logits.argmax(-1).reshape(-1), minlength=NUM_EXPERTS)
        parts.append("/".join(f"{c / counts.sum():.2f}" for c in counts.tolist()))
    model.eval()
    return " | ".join(parts)


def make_eval_set(seed: int, per_combo: int):
    gen = torch.Generator().manual_seed(seed)
    labels = [lab for lab in all_combinations() for _ in range(per_combo)]
    imgs = [render(*lab, gen) for lab in labels]
    return imgs, labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="examples/tiny-mote")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-steps", type=int, default=600)
    ap.add_argument("--vision-batch", type=int, default=64)
    ap.add_argument("--dense-steps", type=int, default=1000)
    ap.add_argument("--moe-steps", type=int, default=500)
    ap.add_argument("--caption-batch", type=int, default=24)
    ap.add_argument("--text-batch", type=int, default=12)
    ap.add_argument("--text-weight", type=float, default=0.5)
    ap.add_argument("--lb-coef", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start, cpu_start = time.time(), time.process_time()
    gen = torch.Generator().manual_seed(args.seed)
    corpus, corpus_name = load_corpus()
    text = TextData(corpus)
    caps = CaptionData(PROMPT)
    print(f"text corpus: {corpus_name}, {len(corpus)} bytes", flush=True)

    eval_imgs, eval_labels = make_eval_set(args.seed + 1000, per_combo=2)
    eval_pixels = torch.cat([preprocess_image(i, IMAGE_SIZE) for i in eval_imgs])
    eval_set = (eval_pixels, eval_labels)
    log: list[dict] = []

    # 0. vision tower (then frozen)
    dense = MoteForConditionalGeneration(parse_config(config_dict([])))
    init_dense(dense, gen)
    vision = pretrain_vision(dense, args.vision_steps, args.vision_batch, caps, gen, eval_set)

    # 1. dense LMM
    n_dense = sum(p.numel() for p in dense.parameters())
    print(f"dense phase: {n_dense} parameters, {args.dense_steps} steps", flush=True)
    opt = torch.optim.AdamW([p for p in dense.parameters() if p.requires_grad], lr=2e-3, betas=(0.9, 0.98),
                            weight_decay=0.01)
    t_dense = train_phase("dense", dense, opt, [2e-3], args.dense_steps, 50, text, caps, gen, args, eval_set, 0.0, log)

    # 2. up-cycle to MoTE
    model = upcycle(dense, MOE_LAYERS, gen, noise=0.1)
    new = [p for n, p in model.named_parameters() if ".experts." in n or n.endswith("mlp.gate.weight")]
    new_ids = {id(p) for p in new}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"up-cycled: MoE layers {MOE_LAYERS}, {NUM_EXPERTS} routed ternary experts each, top-1; "
          f"{sum(p.numel() for p in new)} new parameters, {frozen} frozen (shared experts, vision tower)", flush=True)
    with torch.no_grad():
        sc = caption_scores(batched_greedy(model, eval_pixels, caps.prompt_ids, 64), eval_labels)
    print(f"  right after up-cycling: held-out caption exact {sc['exact']:.1%}", flush=True)

    # 3. QAT with load balancing
    opt = torch.optim.AdamW([{"params": new, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.01}],
                            lr=1e-3, betas=(0.9, 0.98))
    t_moe = train_phase("qat", model, opt, [2e-3, 5e-4], args.moe_steps, 30, text, caps, gen, args, eval_set,
                        args.lb_coef, log)
    model.eval()
    train_seconds, train_cpu = time.time() - t_start, time.process_time() - cpu_start

    overlap = sum(image_hash(i) in caps.train_hashes for i in eval_imgs)
    print(f"training done in {train_seconds:.0f}s wall, {train_cpu:.0f}s CPU on {args.threads} threads "
          f"({len(caps.train_hashes)} distinct training images; "
          f"{overlap} of {len(eval_imgs)} held-out images also drawn in training)", flush=True)

    # 4. save + sidecars
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    save_model(model, out)
    (out / "prompt.txt").write_text(PROMPT + "\n")
    # the byte vocabulary as a tokenizer.json, so stock tokenizers (transformers, ExecuTorch's runners) read it too
    (out / "tokenizer.json").write_text(byte_tokenizer_json_text(), encoding="utf-8")
    sample_label = ("yellow", "triangle", "lower right")   # the longest caption: 47 bytes + EOS = 48 tokens
    sample = render(*sample_label, torch.Generator().manual_seed(args.seed + 7))
    write_image(out / "sample.png", sample)
    sample_info = dict(zip(("color", "shape", "position"), sample_label))
    sample_info["caption"] = caption_text(*sample_label)
    (out / "sample.json").write_text(json.dumps(sample_info, indent=2) + "\n")

    # 5. check the saved directory through the public API
    check = verify(out, eval_imgs, eval_labels)
    timing = {"vision": vision["seconds"], "dense": t_dense, "qat": t_moe, "total": train_seconds, "cpu": train_cpu}
    write_readme(out, args, corpus_name, len(corpus), n_dense, model, log, check, vision, timing, overlap,
                 len(eval_imgs))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", flush=True)
    return 0 if check["sample_ok"] else 1


def verify(out: Path, eval_imgs, eval_labels) -> dict:
    model = load_model(out)
    prompt = (out / "prompt.txt").read_text().strip()
    # the prompt exactly as mote-run builds it from the shipped tokenizer.json: [BOS] [IMAGE] prompt bytes
    tokenized = require_tokenizer(out, model.config).prompt(prompt, with_image=True)
    runner = EagerRunner(model, MAX_SEQ_LEN)
    info = json.loads((out / "sample.json").read_text())
    pixels = load_pixel_values(out / "sample.png", out, model.config)
    toks, _ = greedy_generate(runner, tokenized.ids, pixels, 48, tokenized.special)
    sample_caption = decode(toks)
    sample_ok = toks == encode(info["caption"]) + [EOS]
    print(f"sample.png: {prompt!r} ->{sample_caption!r} ({'correct' if sample_ok else 'WRONG'})", flush=True)
    outs = []
    for img in eval_imgs:
        t, _ = greedy_generate(runner, tokenized.ids, preprocess_image(img, IMAGE_SIZE), 48, tokenized.special)
        outs.append(t)
    sc = caption_scores(outs, eval_labels)
    print(f"held-out (reloaded model, greedy_generate, 48 tokens): exact {sc['exact']:.1%} of {len(eval_labels)} "
          f"(colour {sc['color']:.1%}, shape {sc['shape']:.1%}, position {sc['position']:.1%})", flush=True)
    return {"sample_caption": sample_caption, "sample_ok": sample_ok, **sc}


def write_readme(out, args, corpus_name, corpus_bytes, n_dense, model, log, check, vision, timing, overlap, n_eval):
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dense_final = [r for r in log if r["phase"] == "dense"][-1]
    qat_final = [r for r in log if r["phase"] == "qat"][-1]
    info = json.loads((out / "sample.json").read_text())
    text = f"""# tiny-mote: the shipped example MoTE model

A miniature Mixture-of-Ternary-Experts multimodal LLM (DESIGN.md section 1), trained from scratch on CPU by
`python -m mote.tools.train_example --out {args.out}` (seed {args.seed}, {args.threads} threads: {timing['total']:.0f} s
wall, {timing['cpu']:.0f} s CPU). Training is seeded and step-based, so a rerun with the same thread count writes
byte-identical weights. Given the prompt in `prompt.txt` and a 32x32 picture of one coloured shape, it says what
it sees; its text side is a {n_params // 1000}k-parameter byte model that babbles licence-flavoured English.

| part | size |
|---|---|
| vocabulary | {cfg.vocab_size}: bytes 0..255, BOS={BOS}, EOS={EOS}, PAD={PAD}, IMAGE={IMAGE} (`mote.export.io_utils`) |
| decoder | {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, FFN {cfg.intermediate_size}, tied embeddings, {cfg.max_position_embeddings} positions |
| MoE | layers {list(cfg.moe.moe_layers)}: frozen fp32 shared expert (the former dense FFN) + {cfg.moe.num_experts} routed ternary experts (I={cfg.moe.expert_intermediate_size}), top-{cfg.moe.top_k}, no renormalisation, per-tensor scale, int8 activations |
| vision | ViT 32x32, patch 8 ({cfg.vision.num_patches} image tokens), hidden {cfg.vision.hidden_size}, {cfg.vision.num_layers} layers, + 2-layer GELU projector |
| parameters | {n_params} ({routed} of them routed-expert latent weights, stored fp32, ternarised by absmean at export) |

Only layers {list(cfg.moe.moe_layers)} are MoE: with latent fp32 experts in all four layers the directory would be
~9 MB.

## How it was trained (the MoTE recipe in miniature)

0. **Vision tower**, {args.vision_steps} steps ({timing['vision']:.0f} s): the ViT alone, with throw-away linear heads on
   its mean-pooled output predicting colour / shape / quadrant; then frozen for the rest (it stands in for LLaVA's
   pretrained CLIP tower). Held-out head accuracy: colour {vision['color']:.1%}, shape {vision['shape']:.1%},
   quadrant {vision['position']:.1%}. Without this stage the decoder learns the caption template first and turns
   the image positions into constant tokens; the tower's output collapses and captioning stays at chance for
   ~1000 steps.
1. **Dense LMM**, {args.dense_steps} steps ({timing['dense']:.0f} s): AdamW (peak lr 2e-3, cosine), each step
   {args.caption_batch} captioning sequences plus {args.text_batch} text windows of {TEXT_LEN} bytes
   (text loss weight {args.text_weight}).
   - text: next-byte prediction on random windows of {corpus_name} ({corpus_bytes} bytes; last 5% held out);
   - captioning: synthetic 32x32 RGB images, one shape (circle / square / triangle) in one of 6 colours (red,
     green, blue, yellow, white, purple) in one quadrant, with jittered size, position and colour on a dark noisy
     background. Sequence layout exactly as `mote.export.generate`:
     `[BOS] [16 image embeddings] "Describe the image:"` then the caption bytes + EOS, loss on the caption only.
     Captions are `" one <colour> <shape> in the <upper|lower> <left|right> corner."`, 41..47 bytes (they continue
     the prompt, hence the leading space), so the caption and its EOS fit in a 48-token decode.
   - after this phase: held-out caption exact match {dense_final['exact']:.1%}, text {dense_final['text_bpb']:.2f} bits/byte.
2. **Up-cycling**: in layers {list(cfg.moe.moe_layers)} the dense FFN becomes the shared expert (frozen); the
   {cfg.moe.num_experts} routed experts start as copies of the FFN weights plus Gaussian noise (10% of mean|W|), as
   latent QAT weights; the router starts at N(0, 0.02).
3. **Quantization-aware training**, {args.moe_steps} steps ({timing['qat']:.0f} s): `model.train()` (ternary weights
   and int8 activations with straight-through estimators), the same data mix, plus a Switch-style load-balancing
   loss (E * sum_i f_i P_i over the router logits, coefficient {args.lb_coef}); lr 2e-3 for experts and router,
   5e-4 for the rest. After this phase: held-out exact match {qat_final['exact']:.1%}, text
   {qat_final['text_bpb']:.2f} bits/byte.

## Measured on the saved directory

Reloaded with `load_model`, decoded with `greedy_generate(EagerRunner(model, 128), prompt.ids, pixels, 48,
prompt.special)` on the prompt `mote.export.tokenizer` builds from the shipped `tokenizer.json`:

- held-out caption accuracy (exact match of the whole caption and its EOS) on {n_eval} fresh images (2 per
  colour x shape x quadrant, rendered from a separate seed; {overlap} of them pixel-identical to a training image):
  **{check['exact']:.1%}** (right colour {check['color']:.1%}, shape {check['shape']:.1%}, quadrant {check['position']:.1%}).
- `sample.png`, a {info['color']} {info['shape']} in the {info['position']} corner (labels in `sample.json`):
  `Describe the image:` -> `{check['sample_caption']}`
  (expected `{info['caption']}`: {'correct' if check['sample_ok'] else 'WRONG'}).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
