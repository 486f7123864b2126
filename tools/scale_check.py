"""Scale check: load a Qwen2.5-0.5B-shaped MoTE and measure the loader's peak memory (the issue's 8 GB bound).

    python -m mote.tools.scale_check [--dir D] [--layout sharded|single] [--limit-gib 8] [--forward]

Writes a random model shaped like Qwen2.5-0.5B with its FFNs turned into MoTE blocks (hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings; every layer a MoTE block with the dense FFN as
the shared expert and 4 routed experts of 4864, top-1, latent float experts, no vision tower): about 1.75 B weights,
stored as bfloat16 (3.5 GB on disk) either in 25 shards + `model.safetensors.index.json` (default) or, with
`--layout single`, in one `model.safetensors` (what `save_pretrained` writes below its 5 GB shard size). Either
way it is written tensor by tensor, never materialising the whole model. Then `mote.export.loader.load_model` runs in a fresh subprocess; its peak RSS
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`) and load time are reported. Exit code 0 if the peak is within the limit,
1 if not (or the load failed).

Without --dir the model goes to a temporary folder under /tmp that is removed afterwards; with --dir it is written
there (unless a complete one is already there) and kept.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mote.export.config import parse_config
from mote.export.model import MoteForConditionalGeneration
from mote.export.tensor_file import write_safetensors
from mote.tools.make_random_model import random_config

INDEX_NAME = "model.safetensors.index.json"


def qwen25_05b_mote_config() -> dict:
    cfg = random_config(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, experts=4,
                        top_k=1, expert_intermediate=4864, moe_layers="all", vision=False, max_positions=32768)
    cfg["rope_theta"] = 1_000_000.0
    return cfg


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, hidden: int) -> torch.Tensor:
    """The same scales as make_random_model.random_model: linear ~ N(0, 1/fan_in), norms near 1, biases small."""
    if len(shape) == 2:
        t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        if name == "model.embed_tokens.weight":
            t.mul_(math.sqrt(hidden))
    elif "norm" in name:
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(torch.bfloat16)


def write_model(out_dir: Path, cfg_dict: dict, seed: int = 0, layout: str = "sharded") -> dict:
    """Write config.json and the weights: one shard per decoder layer (+ one for embeddings and final norm) and the
    index, or (layout "single") one model.safetensors streamed tensor by tensor."""
    cfg = parse_config(cfg_dict)
    with torch.device("meta"):                       # names and shapes only: no memory
        shapes = {k: tuple(v.shape) for k, v in MoteForConditionalGeneration(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    ordered = [groups.pop("rest")] + [groups[k] for k in sorted(groups, key=lambda k: int(k.split(".")[2]))]
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    make = lambda n: _random_tensor(n, shapes[n], gen, cfg.hidden_size)  # noqa: E731
    if layout == "single":
        total = _write_streaming(out_dir / "model.safetensors", [n for g in ordered for n in sorted(g)], shapes, make)
        n_files = 1
    else:
        weight_map, total, n_files = {}, 0, len(ordered)
        for i, names in enumerate(ordered):
            fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
            shard = {n: make(n) for n in sorted(names)}
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update({n: fname for n in names})
            del shard
        (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=1, sort_keys=True) + "\n")
    # config.json last: a directory with a config is a complete one (see --dir reuse).
    (out_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    n_params = sum(math.prod(s) for s in shapes.values())
    return {"parameters": n_params, "bytes_on_disk": total, "files": n_files, "fp32_bytes": 4 * n_params}


def _write_streaming(path: Path, names: list[str], shapes: dict, make) -> int:
    """One safetensors file (bf16 tensors in `names` order) written tensor by tensor."""
    return write_safetensors(path, [(n, torch.bfloat16, shapes[n]) for n in names], make)


def loaded_weights(model) -> int:
    """Weights the model holds, counting a packed routed-expert projection as its in x out trits."""
    from mote.export.model import TernaryLinear

    packed = {f"{n}.{leaf}" for n, m in model.named_modules() if isinstance(m, TernaryLinear) and m.packed
              for leaf in ("packed_trits", "trit_scale")}
    return (sum(t.numel() for k, t in model.state_dict().items() if k not in packed)
            + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, TernaryLinear) and m.packed))


_CHILD = """
import json, resource, sys, time
from mote.tools.scale_check import loaded_weights
t0 = time.perf_counter()
from mote.export.loader import load_model
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
model = load_model(sys.argv[1])
t_load = time.perf_counter() - t0
out = {"load_s": round(t_load, 2), "import_s": round(t_import, 2),
       "peak_rss_after_load_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
       "parameters_loaded": loaded_weights(model)}
if sys.argv[2] == "forward":
    import torch
    with torch.no_grad():
        k, v = model.new_cache(4)
        logits, _, _ = model.decode(model.embed(torch.tensor([[1, 2, 3]])), torch.tensor([0]), k, v)
    out["forward_logits_finite"] = bool(torch.isfinite(logits).all())
print(json.dumps(out))
"""


def measure_load(model_dir: Path, forward: bool = False) -> dict:
    """Load in a fresh interpreter; returns its timings and peak RSS (bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), "forward" if forward else "load"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"loading {model_dir} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 2)
    result["peak_rss_bytes"] = peak_kib * 1024
    if peak_kib <= before:   # an earlier, bigger child of this process hides this one's peak: use its own report
        result["peak_rss_bytes"] = result["peak_rss_after_load_kib"] * 1024
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="write (and keep) the model here (default: a temp dir)")
    ap.add_argument("--layout", choices=("sharded", "single"), default="sharded",
                    help="25 shards + index (default) or one model.safetensors")
    ap.add_argument("--limit-gib", type=float, default=8.0, help="peak RSS allowed for the load (default 8)")
    ap.add_argument("--forward", action="store_true", help="also run one 3-token decode step after loading")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    tmp = None
    model_dir = a.dir
    if model_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="mote-scale-", dir="/tmp"))
        model_dir = tmp / "qwen2.5-0.5b-mote"
    try:
        cfg = qwen25_05b_mote_config()
        single = (model_dir / "model.safetensors").is_file()
        if ((model_dir / "config.json").is_file() and json.loads((model_dir / "config.json").read_text()) == cfg
                and single == (a.layout == "single")):
            print(f"scale_check: reusing {model_dir}", flush=True)
            facts = {}
        else:
            print(f"scale_check: writing a Qwen2.5-0.5B-shaped MoTE to {model_dir} ...", flush=True)
            t0 = time.perf_counter()
            if model_dir.exists() and (model_dir / "config.json").is_file():
                raise SystemExit(f"scale_check: {model_dir} holds another model; give an empty or new --dir")
            facts = write_model(model_dir, cfg, a.seed, a.layout)
            print(f"scale_check: wrote {facts['parameters'] / 1e9:.3f} B weights, {facts['files']} file(s), "
                  f"{facts['bytes_on_disk'] / 2**30:.2f} GiB bf16 on disk (fp32: {facts['fp32_bytes'] / 2**30:.2f} "
                  f"GiB) in {time.perf_counter() - t0:.1f} s", flush=True)
        print("scale_check: loading it with mote.export.loader.load_model in a fresh subprocess ...", flush=True)
        r = measure_load(model_dir, a.forward)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    peak_gib = r["peak_rss_bytes"] / 2**30
    ok = peak_gib <= a.limit_gib
    print(f"scale_check: load_model {r['load_s']:.1f} s (+ {r['import_s']:.1f} s imports, {r['wall_s']:.1f} s wall), "
          f"{r['parameters_loaded'] / 1e9:.3f} B weights loaded, peak RSS {peak_gib:.2f} GiB "
          f"(limit {a.limit_gib:g} GiB): {'OK' if ok else 'OVER THE LIMIT'}"
          + (f"; forward logits finite: {r['forward_logits_finite']}" if "forward_logits_finite" in r else ""))
    print(json.dumps({**facts, **r, "layout": a.layout, "peak_rss_gib": round(peak_gib, 3), "limit_gib": a.limit_gib, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
