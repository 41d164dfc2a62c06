"""
models/build_tiny.py: how models/tiny was made: a small GPT-2 (model.py) trained on the toy world's
corpus (forge/toyworld.py) with its own byte-level BPE, saved in gpt2's hub layout.

Data flow.  make_world -> make_corpus -> train_bpe -> vocab.json + merges.txt -> train_model (GPT)
            -> config.json + model.safetensors -> evaluate on eval_prompts: the table in RESULTS.md

    python models/build_tiny.py --help
    python models/build_tiny.py --eval                           # the shipped models/tiny (~1 min)
    python models/build_tiny.py --out runs/tiny                  # on the CPU (~15-20 min, 2 cores)
    python models/build_tiny.py --out models/tiny --device cuda  # as built (~70 s on one H200)
    python models/build_tiny.py --out /tmp/t --steps 50 --n-docs 2000 --n-layer 1  # 1-min smoke run

Training follows nanoGPT: AdamW, warmup + cosine decay, GPT-2's init with scaled residual
projections; but its windows start at a document start, so prompts need no <|endoftext|> in front.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from forge import toyworld  # noqa: E402
from forge.cli import arg, parse_config, run_main  # noqa: E402
from forge.files import atomic_path, write_json  # noqa: E402
from forge.hub import DEFAULT_MODEL, load_tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
# training


@dataclass
class TinyConfig:
    eval: bool = arg(False, "evaluate --model, print the table; build nothing", group="what to do")
    model: str = arg(DEFAULT_MODEL, "the model directory that --eval evaluates")
    out: str = arg("runs/tiny", "the model directory to build (+ world.json)", group="the build")
    seed: int = arg(0, "seeds the world, the corpus, the init and the batches")
    n_docs: int = arg(200000, "training documents (~25 tokens each: ~4.9M tokens)")
    bpe_docs: int = arg(30000, "documents the tokenizer is trained on")
    max_merges: int = arg(3000, "BPE merges at most (vocab = 256 + merges + 1)")
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(128, "residual width")
    n_ctx: int = arg(128, "context length (training sequences are this long)")
    batch_size: int = arg(32, "sequences per step")
    steps: int = arg(2500, "optimizer steps")
    lr: float = arg(6e-3, "peak learning rate (swept 1e-3, 3e-3, 6e-3: 6e-3 composes two-hop best)")
    min_lr_frac: float = arg(0.1, "cosine decays to lr * min_lr_frac")
    warmup: int = arg(100, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW decay on matrices (not on biases, LayerNorms)")
    grad_clip: float = arg(1.0, "global grad-norm clip; -1 = disable")
    threads: int = arg(2, "torch CPU threads")
    device: str = arg("cpu", "cpu or cuda (models/tiny was built with cuda: ~70 s on an H200)")
    corpus_file: str = arg("", 'also write the training corpus here as text ("" = don\'t)')


def init_weights(model, generator):
    """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 L) (nanoGPT)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "ln" in name:
            nn.init.ones_(p)
        else:
            residual = name.endswith("c_proj.weight")
            std = 0.02 / math.sqrt(2 * model.config.n_layer) if residual else 0.02
            nn.init.normal_(p, 0.0, std, generator=generator)


def token_stream(docs, enc):
    """All documents as one (N,) stream, <|endoftext|> after each, and where each one starts."""
    ids = []
    starts = []
    for doc in enc.encode_ordinary_batch(docs):
        starts.append(len(ids))
        ids += doc + [enc.eot_token]
    return torch.tensor(ids), torch.tensor(starts)


def get_batch(stream, starts, B, T, generator):
    """B windows of T+1 tokens, each at a document start (so position 0 never needs a BOS)."""
    ok = starts[starts + T + 1 <= len(stream)]
    pick = ok[torch.randint(len(ok), (B,), generator=generator)]
    rows = torch.stack([stream[s : s + T + 1] for s in pick.tolist()])  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def lr_at(step, cfg):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(cfg, stream, starts, vocab_size):
    """AdamW with warmup + cosine; returns the trained GPT (eval mode)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_ctx=cfg.n_ctx)
    model = GPT(GPTConfig(**shape, vocab_size=vocab_size))
    init_weights(model, gen)
    model.to(cfg.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    model.train()
    bar = tqdm(range(cfg.steps), desc="train")
    for step in bar:
        t0 = time.time()
        batch = get_batch(stream, starts, cfg.batch_size, cfg.n_ctx, gen)
        x, y = (t.to(cfg.device) for t in batch)  # (B, T)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            lossf = loss.item()  # sync point: read the clock after it
            normf = norm.item()
            dt = time.time() - t0
            line = f"step {step:5d}/{cfg.steps} | loss {lossf:.4f} | norm {normf:.3f}"
            speed = f"{dt * 1000:.0f} ms | {x.numel() / dt:.0f} tok/s"
            bar.write(f"{line} | lr {lr_at(step, cfg):.2e} | {speed}")
    return model.eval()


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def greedy_match(model, enc, prompt, answer):
    """Does greedy decoding after prompt produce exactly answer's tokens?"""
    idx = enc.encode_ordinary(prompt)
    device = next(model.parameters()).device
    for t in enc.encode_ordinary(answer):
        context = torch.tensor([idx[-model.config.n_ctx :]], device=device)  # (1, T)
        nxt = model(context)[0, -1].argmax().item()
        if nxt != t:
            return False
        idx.append(nxt)
    return True


@torch.no_grad()
def evaluate(model, enc, world, n_loss_docs=3000, seed=1):
    """{row: value}: held-out next-token losses, exact-match accuracy per kind of eval_prompts."""
    device = next(model.parameters()).device
    rows = {}
    for name, held in (("fresh documents", False), ("held-out templates+people", True)):
        # corpus seeds far from any training seed; the same 64 windows for every model
        docs = toyworld.make_corpus(world, n_loss_docs, 10**6 + seed, heldout=held)
        gen = torch.Generator().manual_seed(1)
        batch = get_batch(*token_stream(docs, enc), 64, model.config.n_ctx, gen)
        x, y = (t.to(device) for t in batch)  # (64, T)
        rows[f"loss: {name}"] = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    hits = {}
    for prompt, answer, kind in tqdm(toyworld.eval_prompts(world, seed), desc="eval", leave=False):
        hits.setdefault(kind, []).append(greedy_match(model, enc, prompt, answer))
    rows.update({f"acc: {k} (n={len(v)})": sum(v) / len(v) for k, v in hits.items()})
    return rows


def print_table(rows):
    print("| metric | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |" if k.startswith("loss") else f"| {k} | {100 * v:.1f} % |")


# -----------------------------------------------------------------------------
# main


def build(cfg):
    """World -> corpus -> tokenizer -> model, written to cfg.out; returns (model, enc, world)."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    world = toyworld.make_world(cfg.seed)
    docs = toyworld.make_corpus(world, cfg.n_docs, cfg.seed)
    if cfg.corpus_file:
        with atomic_path(cfg.corpus_file) as tmp, open(tmp, "w") as f:  # cache.py may read it
            f.write("\n".join(docs) + "\n")
    merges, segmented = toyworld.train_bpe(docs[: cfg.bpe_docs], cfg.max_merges)
    toyworld.save_tokenizer(cfg.out, merges)
    enc = load_tokenizer(cfg.out)
    toyworld.check_tokenizer(enc, segmented)
    stream, starts = token_stream(docs, enc)
    sizes = f"vocab {enc.n_vocab} | {len(docs)} docs | {len(stream)} tokens"
    print(f"world + corpus + tokenizer: {time.time() - t0:.0f} s | {sizes}")
    model = train_model(cfg, stream, starts, enc.n_vocab)
    model.cpu().save_pretrained(cfg.out)
    write_json(os.path.join(cfg.out, "world.json"), world.to_json())
    print(f"built {cfg.out} in {time.time() - t0:.0f} s")
    return model, enc, world


def main(argv=None):
    cfg = parse_config(__doc__, TinyConfig, argv)
    torch.set_num_threads(cfg.threads)
    if cfg.eval:
        model = GPT.from_pretrained(cfg.model)
        enc = load_tokenizer(cfg.model)
        world = toyworld.load_world(cfg.model)
    else:
        print(asdict(cfg))
        model, enc, world = build(cfg)
    print_table(evaluate(model, enc, world, seed=cfg.seed + 1))


if __name__ == "__main__":
    run_main(main)
