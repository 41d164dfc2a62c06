"""
bench.py: clt-forge's benchmarks, one subcommand each. Every figure that goes into the README's
results table is a ratio measured within one run, because the machines are noisy: a baseline is
timed in the same process, next to the thing it is compared with.

    python bench.py --help
    python bench.py cache              # activation cache on the tiny model and a random GPT-2-small shape
    python bench.py cache --quick      # the same, small (a couple of minutes on a 2-core CPU)
    python bench.py cache --device cuda
    python bench.py recovery           # planted concepts a CLT recovers vs its size and sparsity -> assets/recovery.png

Adding a benchmark: write `bench_<name>(args) -> list of result dicts`, put it in BENCHMARKS, and add
its flags (if any) in `add_<name>_args`. Results print as a markdown table and go to
<out>/<name>.json.

The cache benchmark (issue 4) measures, per model and dtype:
- bytes/token: all shard bytes / tokens (activations, scales, token/doc/position), and x fp32;
- NMSE = ||x - x_hat||^2 / ||x||^2 of what was stored (from the manifest, summed over all rows);
- writer overhead: (corpus -> shards loop) / (the same loop with only the forward pass) - 1, in
  wall time and in CPU time (all threads; on a shared machine the fairer of the two);
- read: shuffled batches (steady state, bytes of activations+scales per second) against a raw
  sequential read of the shard files (file bytes per second), both from the page cache; dequantized
  to fp32 on the CPU, and raw (the stored rows, what a GPU run moves before dequantizing there);
  and reading the cache in order with dequantization (iter_chunks);
- the crc32 checks: the rate of a crc32 pass over the shards, and what it adds to the first epoch
  of a reader (each chunk is checked the first time a row of it is read, never again): raw read
  rate / crc32 rate, in CPU time.

The recovery benchmark (issue 16) trains CLTs of F = 2d, 8d, 32d per layer at train.py's default sparsity
and a --sparsity sweep at 8d, each for --recovery-steps on one small cache of models/tiny, and scores them
with interp.py's concept scores on two evaluation sets of tiny.eval_corpus (seeds 1 and 2): per label
family the share of concepts some feature matches with F1 >= 0.8 and the mean best F1, beside the MLP
neurons and a random CLT of each size. The recipe with the best headline (category, entity, latent) on
the first set is named; every number in the table and the plot is from the second. Sized for a CPU: a
150k-token cache and 300 steps of 1024 tokens, not the 1000 steps of the README's recipe; trained runs are
reused by a rerun with the same flags.
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch

import cache
import clt

# -----------------------------------------------------------------------------
# helpers shared by benchmarks


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def random_model_dir(path, n_layer, n_embd, n_head, n_ctx, vocab_size, seed=0):
    """A random GPT-2 of the given shape in the hub layout, with a byte-level tokenizer (256 bytes +
    <|endoftext|>, no merges): no download, and any shape (e.g. GPT-2 small's 12 x 768)."""
    torch.manual_seed(seed)
    model = clt.GPT(clt.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=n_ctx, vocab_size=vocab_size))
    model.save_pretrained(path)
    vocab = {c: i for i, c in enumerate(clt.bytes_to_unicode().values())}
    vocab[clt.ENDOFTEXT] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return path


def synthetic_corpus(path, n_docs, seed=0):
    """Documents of random words, separated by <|endoftext|> (for models without their own corpus)."""
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her it an were which are this be "
             "city river capital north south language people old new market bridge road year king").split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 300))) for _ in range(n_docs)]
    with open(path, "w") as f:
        f.write(clt.ENDOFTEXT.join(docs))
    return path


def print_table(rows):
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


# -----------------------------------------------------------------------------
# cache (issue 4)


def add_cache_args(p):
    p.add_argument("--tiny-tokens", type=int, default=200_000, help="tokens per cache on the tiny model")
    p.add_argument("--gpt2-tokens", type=int, default=8192, help="tokens per cache on the GPT-2-small shape")
    p.add_argument("--read-batch", type=int, default=4096, help="batch size of the shuffled read")


def bare_forward_seconds(cfg):
    """The writer's loop without the writer: the same contexts, batches and forward pass.
    Returns (wall seconds, CPU seconds of all threads)."""
    model = clt.GPT.from_pretrained(cfg.model).to(cfg.device)
    enc = clt.load_tokenizer(cfg.model)
    sync(cfg.device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for _, idx, _ in cache.iter_batches(cfg, enc, cfg.tokens):
            model.run_with_acts(idx.to(cfg.device), logits=False)
    sync(cfg.device)
    return time.perf_counter() - t0, time.process_time() - c0


def timed(fn):
    """(wall seconds, CPU seconds of all threads) of fn(). On a shared machine the CPU time is the
    fairer cost: other processes do not count in it."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def sequential_read(files):
    """Read every file front to back into one reused buffer: the raw rate of the disk/page cache."""
    buf = bytearray(max(os.path.getsize(f) for f in files))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(memoryview(buf)[:os.path.getsize(f)])


def read_rates(path, batch_size, epochs=2):
    """Rates in MB/s of stored bytes, all from the page cache, as (wall, cpu) pairs: a raw sequential
    read of the shard files; shuffled batches dequantized to fp32 on the CPU; shuffled stored rows
    (what a GPU run moves, dequantizing on the device); in-order chunks, dequantized; a crc32
    pass over every shard (what a reader adds in its first epoch: each chunk is checked once).

    The shuffled rates are the steady state a training loop sees: `epochs` epochs of an endless
    stream, timed from the first batch on (the first window's load is a one-time start-up cost).
    """
    c = cache.ActivationCache(path)
    files = [os.path.join(path, s["file"]) for s in c.manifest["shards"]]
    file_bytes = sum(os.path.getsize(f) for f in files)
    sequential_read(files)  # warm the page cache: every rate below is then from RAM
    seq = min(timed(lambda: sequential_read(files)) for _ in range(3))
    n_batches = epochs * c.batches_per_epoch(batch_size, split="all")

    def shuffled(dequantize):
        stream = c.batches(batch_size, seed=0, split="all")
        next(stream)
        if dequantize:
            t = timed(lambda: all(c.dequantize(next(stream)) is not None for _ in range(n_batches)))
        else:
            t = timed(lambda: all(next(stream) is not None for _ in range(n_batches)))  # keeps no batch alive
        stream.close()
        return t
    rate = lambda nbytes, t: (nbytes / t[0] / 1e6, nbytes / t[1] / 1e6)
    shuffled_bytes = n_batches * batch_size * c.row_bytes()
    inorder = timed(lambda: all(chunk is not None for chunk in c.iter_chunks(batch_size, split="all")))
    crc = timed(lambda: all(not cache._check_shard(path, c.manifest, i, "crc32") for i in range(len(files))))
    return dict(seq=rate(file_bytes, seq), shuffled=rate(shuffled_bytes, shuffled(True)),
                shuffled_raw=rate(shuffled_bytes, shuffled(False)),
                inorder=rate(c.n_tokens * c.row_bytes(), inorder), crc32=rate(file_bytes, crc))


def bench_cache_model(name, cfg, read_batch):
    """bytes/token, NMSE, writer overhead and read rates for each dtype on one model."""
    results, bare = [], [bare_forward_seconds(cfg)]
    for dtype in ("int8", "fp16", "fp32"):
        out = f"{cfg.out}_{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        m = cache.build_cache(replace(cfg, dtype=dtype, out=out))
        bare.append(bare_forward_seconds(cfg))  # the baseline right before and after each build
        wall, cpu = [(a + b) / 2 for a, b in zip(bare[-2], bare[-1])]
        fp32_bytes = 2 * m["n_layers"] * m["d_model"] * 4 + 12
        per_token = sum(s["bytes"] for s in m["shards"]) / m["n_tokens"]
        r = read_rates(out, min(read_batch, m["n_tokens"] // 8))
        results.append(dict(model=name, dtype=dtype, tokens=m["n_tokens"], bytes_per_token=per_token,
                            x_fp32=per_token / fp32_bytes, nmse_in=m["nmse_total"][0], nmse_out=m["nmse_total"][1],
                            nmse_worst_layer=max(m["nmse_in"] + m["nmse_out"]),
                            write_overhead_wall=m["seconds"] / wall - 1, write_overhead_cpu=m["cpu_seconds"] / cpu - 1,
                            seq_MBps=r["seq"][0], shuffled_MBps=r["shuffled"][0],
                            shuffled_vs_seq_wall=r["shuffled"][0] / r["seq"][0],
                            shuffled_vs_seq_cpu=r["shuffled"][1] / r["seq"][1],
                            raw_vs_seq_wall=r["shuffled_raw"][0] / r["seq"][0],
                            raw_vs_seq_cpu=r["shuffled_raw"][1] / r["seq"][1],
                            inorder_vs_seq_wall=r["inorder"][0] / r["seq"][0],
                            crc32_MBps=r["crc32"][0], raw_MBps=r["shuffled_raw"][0],
                            crc_cost_first_epoch_cpu=r["shuffled_raw"][1] / r["crc32"][1]))
        shutil.rmtree(out)
    return results


def bench_cache(args):
    os.makedirs(args.out, exist_ok=True)
    device = args.device
    setups = []
    if os.path.exists(os.path.join(clt.DEFAULT_MODEL, "model.safetensors")):
        setups.append(("tiny", clt.DEFAULT_MODEL, "toy", args.tiny_tokens))
    else:
        print(f"note: {clt.DEFAULT_MODEL} is missing: using a random model of the tiny shape (4 x 128)")
        path = random_model_dir(os.path.join(args.out, "tiny_random"), 4, 128, 4, 128, 4096)
        setups.append(("tiny-shape (random)", path, synthetic_corpus(os.path.join(args.out, "corpus.txt"), 4000), args.tiny_tokens))
    gpt2 = random_model_dir(os.path.join(args.out, "gpt2_small_random"), 12, 768, 12, 1024, 50257)
    corpus = synthetic_corpus(os.path.join(args.out, "corpus.txt"), 4000)
    setups.append(("gpt2-small-shape (random)", gpt2, corpus, args.gpt2_tokens))
    results = []
    for name, model_dir, corpus, tokens in setups:
        cfg = cache.CacheConfig(model=model_dir, corpus=corpus, tokens=tokens, ctx=64, device=device,
                                out=os.path.join(args.out, name.split()[0]), heldout=0.0)
        print(f"{name}: {tokens} tokens per cache on {device}, torch threads {torch.get_num_threads()}")
        results += bench_cache_model(name, cfg, args.read_batch)
    shutil.rmtree(gpt2)
    return results


# -----------------------------------------------------------------------------
# graph (issue 7)


def add_graph_args(p):
    p.add_argument("--graph-features", default="250,500,1000,2000,4000", help="active-feature counts to time")
    p.add_argument("--graph-prompt-len", type=int, default=32, help="prompt tokens, BOS included")
    p.add_argument("--graph-batch", type=int, default=64, help="targets per backward pass")
    p.add_argument("--graph-n-features", type=int, default=4096, help="features per layer of the random CLTs")
    p.add_argument("--graph-clt", default=os.path.join("runs", "clt"), help="a trained CLT of models/tiny: two-hop study")
    p.add_argument("--graph-two-hop", type=int, default=60, help="two-hop prompts in the study; 0 = skip it")


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def clt_with_n_active(model, idx, n_features, n_active, seed=0):
    """A random CLT whose b_enc makes exactly n_active (position, layer, feature) fire on idx (BOS
    excluded): the JumpReLU threshold falls between the n-th and (n+1)-th largest x·W_enc."""
    c = model.config
    t = clt.CrossLayerTranscoder(clt.CLTConfig(n_layers=c.n_layer, d_model=c.n_embd, n_features=n_features), seed)
    t = t.to(idx.device).eval()
    with torch.no_grad():
        pre = t.pre_acts(model.run_with_acts(idx)[1].mlp_in[0])[1:]  # (T-1, L, F), b_enc = 0
        top = pre.flatten().topk(n_active + 1).values
        t.b_enc.fill_((t.threshold[0, 0] - (top[-2] + top[-1]) / 2).item())
    return t


def graph_point(name, n_active, args):
    """Time and peak memory of one attribution graph. On CPU it runs in a fresh process (see
    bench_graph), so the peak RSS above the setup's RSS is this graph's own memory."""
    import graph
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096) if name.startswith("tiny") else \
        dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)
    model = clt.GPT.from_pretrained() if name == "tiny" else clt.GPT(clt.GPTConfig(n_ctx=1024, **shape))
    model = model.to(args.device).eval()
    idx = torch.randint(0, model.config.vocab_size - 1, (1, args.graph_prompt_len), device=args.device)
    idx[0, 0] = model.config.vocab_size - 1  # BOS: <|endoftext|> is the last id in GPT-2's layout
    t = clt_with_n_active(model, idx, args.graph_n_features, n_active)
    cuda = str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        base = proc_status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    rep = graph.local_replacement(model, t, idx)
    g = graph.attribute(model, t, rep, batch_size=args.graph_batch)
    sync(args.device)
    t1 = time.perf_counter()
    graph.prune(g)
    graph.scores(g)
    t2 = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated() if cuda else proc_status_kb("VmHWM") * 1024) - base
    err, scale = graph.exactness(model, t, rep, g)
    return dict(model=name, n_active=len(rep.feats), nodes=len(g.adjacency), attribute_s=t1 - t0,
                prune_s=t2 - t1, ms_per_feature=1e3 * (t1 - t0) / len(rep.feats), peak_MB=peak / 2**20,
                adjacency_MB=g.adjacency.numel() * 4 / 2**20, rel_exactness=err / scale)


def bench_graph(args):
    """Attribution time and peak memory vs active features, on the tiny model (or its shape, random)
    and on a random GPT-2-small shape, each with a random CLT tuned to fire on n features."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    os.makedirs(args.out, exist_ok=True)
    counts = [int(n) for n in args.graph_features.split(",")][: 3 if args.quick else None]
    tiny = "tiny" if os.path.exists(os.path.join(clt.DEFAULT_MODEL, "model.safetensors")) else "tiny-shape (random)"
    results = []
    for name in (tiny, "gpt2-small-shape (random)"):
        for n in counts:
            if str(args.device).startswith("cuda"):
                results.append(graph_point(name, n, args))
            else:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh process per graph
                    results.append(pool.submit(graph_point, name, n, args).result())
            print(results[-1])
        rows = [r for r in results if r["model"] == name]
        if len(rows) > 1:  # log-log slope of time vs active features: 1 = linear
            slope = np.log(rows[-1]["attribute_s"] / rows[0]["attribute_s"]) / np.log(rows[-1]["n_active"] / rows[0]["n_active"])
            print(f"{name}: attribution time ~ n_active^{slope:.2f} over {rows[0]['n_active']}..{rows[-1]['n_active']}")
    if tiny == "tiny" and args.graph_two_hop > 0 and os.path.exists(os.path.join(args.graph_clt, "config.json")):
        study = two_hop_study(args)
        done = [r for r in study if r["answer_in_logits"]]
        print_table([{k: v for k, v in r.items() if k != "prompt"} for r in done])
        means = {k: float(np.mean([r[k] for r in done])) for k in done[0] if k not in ("prompt", "answer_in_logits")}
        print(f"two-hop study, {len(done)} of {len(study)} prompts with the answer among the logit nodes; means: {means}")
        with open(os.path.join(args.out, "graph_two_hop.json"), "w") as f:
            json.dump(dict(clt=args.graph_clt, means=means, prompts=study), f, indent=1)
    return results


def two_hop_probes(world, people):
    """(prompt, answer, relation, country, person): "{person} lives in {city}. The language {person}
    speaks is" -> the language of the city's country; template 0 of each two-hop relation."""
    import tiny
    out = []
    for person in people:
        home = world.lookup["person"][person]["home"]
        bridge = tiny.TEMPLATES["home"][0].format(person=person, city=home)
        for relation in tiny.TWO_HOP:
            answer = world.two_hop(person, relation)
            slot = tiny.SLOT_RE.findall(tiny.TEMPLATES[relation][0])[-1]
            prompt, answer = tiny.split_prompt(tiny.TEMPLATES[relation][0].format(person=person, **{slot: answer}), answer)
            out.append((bridge + " " + prompt, answer, relation, world.country_of(home), person))
    return out


def two_hop_study(args):
    """Toy world, two-hop prompts of held-out people ("Batris lives in Fafes. The language Batris speaks
    is" -> Zefekic, through Fafes -> Gregruia, never stated): does the answer's path go through a
    feature of the intermediate entity? A last-token feature is *selective* for the country if it
    fires on (rate same) − (rate other) >= 0.5 of the probes with the same relation: same = other
    people living in that country, other = people of other countries (world labels, 100 people).
    Per prompt: the feature influence share on the answer logit of selective features and of
    features on the city token; how many of them the pruned graph keeps; in the real model, the
    change of log p(answer) and of the answer's logit minus the mean logit of the other countries'
    answers when the 3 most influential selective features, or 3 other last-token ones, are ablated."""
    import graph
    import tiny
    device = args.device
    model, enc, world = clt.GPT.from_pretrained().to(device), clt.load_tokenizer(clt.DEFAULT_MODEL), tiny.load_world()
    t = clt.CrossLayerTranscoder.from_pretrained(args.graph_clt).to(device)
    probes = two_hop_probes(world, [p["name"] for p in world.people])
    with torch.no_grad():  # last-token activations of every probe: (P, L, F)
        last = torch.stack([t.encode(model.run_with_acts(graph.encode_prompt(enc, p[0], model.config.n_ctx).to(device))[1]
                                     .mlp_in[0, -1:])[0] for p in probes]).cpu() > 0
    rows = []
    for prompt, answer, relation, country, person in two_hop_probes(world, world.heldout_people)[:args.graph_two_hop]:
        same = torch.tensor([p[2] == relation and p[3] == country and p[4] != person for p in probes])
        other = torch.tensor([p[2] == relation and p[3] != country for p in probes])
        if not same.any():
            continue  # nobody else lives in this country: selectivity is undefined
        selective = last[same].float().mean(0) - last[other].float().mean(0) >= 0.5  # (L, F)
        idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(device)
        city = torch.tensor([i + 1 for i, lab in enumerate(tiny.label_tokens(prompt, enc, world)) if "role:bridge" in lab])
        rep = graph.local_replacement(model, t, idx)
        g = graph.attribute(model, t, rep, batch_size=args.graph_batch)
        fs, es, ts, ls = g.slices()
        ans = enc.encode(answer)[0]
        hit = (g.logit_ids.cpu() == ans).nonzero()[:, 0]
        if not len(hit):
            rows.append(dict(prompt=prompt, answer_in_logits=False))
            continue
        w = torch.zeros(len(g.adjacency), dtype=g.adjacency.dtype, device=g.adjacency.device)
        w[ls.start + hit[0]] = 1  # influence on the answer logit alone
        A_hat = graph.normalized(g.adjacency)
        infl = graph.influence(A_hat, w)[fs].cpu()
        l, p, f = g.feats.cpu().T
        is_last, at_city = p == idx.size(1) - 1, torch.isin(p, city)
        sel = is_last & selective[l, f]
        kept = graph.prune(g)[0][fs].cpu()  # the pruned graph's feature nodes
        rivals = torch.tensor(sorted({enc.encode(p[1])[0] for p in probes if p[2] == relation} - {ans}))
        ranked = infl.argsort(descending=True)
        dlogp, ddiff = [], []  # log p(answer); answer logit - mean logit of the other countries' answers
        for chosen in (ranked[sel[ranked]][:3], ranked[is_last[ranked] & ~sel[ranked]][:3]):
            clean, new, _ = graph.intervene(model, t, idx, g.feats[chosen.to(g.feats.device)], 0.0)
            dlogp.append((new.log_softmax(-1)[ans] - clean.log_softmax(-1)[ans]).item())
            ddiff.append(((new[ans] - new[rivals].mean()) - (clean[ans] - clean[rivals].mean())).item())
        rows.append(dict(prompt=prompt, answer_in_logits=True, p_answer=g.logit_probs[hit[0]].item(),
                         replacement_score=graph.scores(g)[0], n_features=len(g.feats), n_selective=int(sel.sum()),
                         selective_share=(infl[sel].sum() / infl.sum()).item(),
                         city_token_share=(infl[at_city].sum() / infl.sum()).item(),
                         pruned_selective=int((kept & sel).sum()), pruned_city_token=int((kept & at_city).sum()),
                         pruned_features=int(kept.sum()),
                         dlogp_ablate_selective3=dlogp[0], dlogp_ablate_other_last3=dlogp[1],
                         ddiff_ablate_selective3=ddiff[0], ddiff_ablate_other_last3=ddiff[1]))
        print(rows[-1])
    return rows


# -----------------------------------------------------------------------------
# interp (issue 8)


def add_interp_args(p):
    p.add_argument("--interp-tokens", type=int, default=200_000, help="tokens of the random-CLT cache (tiny shape)")
    p.add_argument("--interp-chunk", type=int, default=4096, help="interp.py --chunk-size")


def random_interp_setup(args):
    """A random model of the tiny shape, a cache of it and a random CLT whose thresholds are each
    feature's 97th percentile pre-activation (density ~3%, like a trained CLT's)."""
    model_dir = random_model_dir(os.path.join(args.out, "interp_model"), 4, 128, 4, 128, 4096)
    corpus = synthetic_corpus(os.path.join(args.out, "corpus.txt"), 4000)
    cache_dir, clt_dir = os.path.join(args.out, "interp_cache"), os.path.join(args.out, "interp_clt")
    cache.build_cache(cache.CacheConfig(model=model_dir, corpus=corpus, tokens=args.interp_tokens, ctx=64,
                                        device=args.device, out=cache_dir, heldout=0.02, overwrite=True))
    c = clt.CrossLayerTranscoder(clt.CLTConfig(n_layers=4, d_model=128, n_features=1024, model=model_dir))
    with torch.no_grad():
        pre = c.pre_acts(cache.ActivationCache(cache_dir).read(0, 4096)[0])  # (N, L, F)
        c.log_threshold.copy_(pre.quantile(0.97, dim=0).clamp_min(1e-3).log())
    c.save_pretrained(clt_dir)
    return model_dir, clt_dir, cache_dir


def bench_interp(args):
    """interp.py's two passes (train + held-out, with explanations) against one plain in-order read."""
    import interp
    trained = os.path.join("runs", "clt"), os.path.join("runs", "cache")
    if all(os.path.exists(os.path.join(p, f)) for p, f in zip(trained, ("config.json", "manifest.json"))):
        name, (clt_dir, cache_dir), model_dir = "tiny, trained CLT", trained, ""
    else:
        print("note: runs/clt or runs/cache is missing: timing a random CLT on a random model of the tiny shape")
        name, (model_dir, clt_dir, cache_dir) = "tiny-shape, random CLT", random_interp_setup(args)
    cfg = interp.InterpConfig(model=model_dir, clt=clt_dir, cache=cache_dir, device=args.device,
                              chunk_size=args.interp_chunk, out=os.path.join(args.out, "interp"))
    model_dir, model, enc, c, ca = interp.load_inputs(cfg)
    reads = []
    for _ in range(3):  # the first warms the page cache
        t0 = time.perf_counter()
        for _ in ca.iter_chunks(cfg.chunk_size, split="all"):
            pass
        reads.append(time.perf_counter() - t0)
    sync(args.device)
    t0 = time.perf_counter()
    stats, *_ = interp.analyze(model, enc, c, ca, cfg)
    sync(args.device)
    t = time.perf_counter() - t0
    read = min(reads[1:])
    return [dict(setup=name, tokens=ca.n_tokens, features=stats.L * stats.F, chunk=cfg.chunk_size,
                 plain_read_s=read, interp_s=t, ratio=t / read, tok_per_s=ca.n_tokens / t)]


# -----------------------------------------------------------------------------
# CLT training and decoding (issue 5)


def clt_matmuls(B, L, d, F):
    """The matmul shapes (m, k, n) of one CLT training step: per layer the encoder forward and its
    weight gradient (mlp_in needs no gradient), the decoder forward, its weight and input gradients."""
    shapes = []
    for l in range(L):
        w = (L - l) * d  # layer l's features write to L - l layers
        shapes += [(B, d, F), (d, B, F), (B, F, w), (F, B, w), (B, w, F)]
    return shapes


def median_seconds(fn, device, reps):
    fn()  # warm-up (allocator, autocast caches, lazy init)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def step_fixture(L, d, F, B, activation, device, tp=None):
    """A CLT (or this rank's TP shard), its optimizer, a fixed batch and train.py's step on them."""
    import train
    mesh = tp or clt.Mesh()
    cfg = train.TrainConfig(activation=activation, features=F, k=16, steps=10 ** 6)
    model = clt.CrossLayerTranscoder(clt.CLTConfig(L, d, F, activation, k=16), 0, mesh)
    model = model.to(device).train()
    opt = train.optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(B, L, d, generator=g).to(device) for _ in range(2)]
    state = dict(step=0, since_fired=torch.zeros(L, F, dtype=torch.long, device=device),
                 first_bad=torch.tensor(-1, device=device))

    def step():  # a step between log steps: nothing read back to the host
        train.train_step(cfg, model, opt, batch, state, mesh, torch.device(device), sync=False)

    return model, opt, step


def step_vs_matmul(name, L, d, F, B, activation, device, reps):
    """One optimizer step of train.py on a fixed batch, as a FLOP rate, over the FLOP rate of plain
    torch.matmul at the step's own shapes and dtype, timed in the same run."""
    _, _, step = step_fixture(L, d, F, B, activation, device)
    t_step = median_seconds(step, device, reps)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # what autocast gives the step
    shapes = clt_matmuls(B, L, d, F)
    mats = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
            for m, k, n in shapes]
    t_mm = median_seconds(lambda: [a @ b for a, b in mats], device, reps)
    tflops = sum(2 * m * k * n for m, k, n in shapes) / 1e12
    return dict(bench=f"{activation} train step", shape=f"{name}: L{L} d{d} F{F} B{B}", ms=1e3 * t_step,
                baseline="matmul, same shapes", baseline_ms=1e3 * t_mm, ratio=t_mm / t_step,
                detail=f"{tflops / t_step:.3g} vs {tflops / t_mm:.3g} TFLOP/s")


def sparse_vs_dense_decode(L, d, F, B, density, device, reps):
    """decode (dense, cost ∝ F) against decode_sparse from a sparse COO tensor and from dense acts."""
    model = clt.CrossLayerTranscoder(clt.CLTConfig(L, d, F, "relu"), 0).to(device).eval()
    g = torch.Generator().manual_seed(0)
    acts = (torch.rand(B, L, F, generator=g) * (torch.rand(B, L, F, generator=g) < density)).to(device)
    coo = acts.to_sparse()
    shape = f"L{L} d{d} F{F} B{B}, {density:.0%} active"
    with torch.no_grad():
        torch.testing.assert_close(model.decode(coo, sparse=True), model.decode(acts), atol=1e-4, rtol=1e-4)
        t_dense = median_seconds(lambda: model.decode(acts), device, reps)
        rows = []
        for what, x in (("decode_sparse (COO acts)", coo), ("decode_sparse (dense acts)", acts)):
            t = median_seconds(lambda: model.decode(x, sparse=True), device, reps)
            rows.append(dict(bench=what, shape=shape, ms=1e3 * t, baseline="decode (dense)",
                             baseline_ms=1e3 * t_dense, ratio=t_dense / t, detail=f"{int(acts.count_nonzero())} nonzeros"))
    return rows


def add_train_args(p):
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--decode-features", type=int, default=16384, help="F of the decode benchmark")
    p.add_argument("--density", type=float, default=0.01, help="fraction of active features in the decode benchmark")


def bench_train(args):
    """Step FLOP rate over matmul's at the same shapes; sparse over dense decode (ratios > 1 = faster)."""
    cuda = str(args.device).startswith("cuda")
    shapes = [("tiny", 4, 128, 1024, 1024)]  # the default CLT of models/tiny (F = 8 d)
    if not args.quick:
        shapes += [("gpt2-small", 12, 768, 6144, 4096)] if cuda else [("gpt2-small", 12, 768, 3072, 512)]
    rows = [step_vs_matmul(*s, a, args.device, args.reps) for s in shapes for a in ("jumprelu", "topk")]
    rows += sparse_vs_dense_decode(4, 128, args.decode_features, 256, args.density, args.device, args.reps)
    if cuda and not args.quick:
        rows += sparse_vs_dense_decode(12, 768, args.decode_features, 256, args.density, args.device, args.reps)
    return rows


# -----------------------------------------------------------------------------
# tensor and data parallelism (issue 6)


def clt_params_per_rank(L, d, F, T):
    """Parameters on one TP rank: F/T features' encoders, b_enc, thresholds, decoders; b_dec replicated."""
    f = F // T
    return L * d * f + 2 * L * f + f * d * L * (L + 1) // 2 + L * d


def per_step_traffic(L, d, F, B, T, D, activation="jumprelu", k=16):
    """Per rank and step: bytes all-reduced over TP and over DP, bytes all-gathered over TP, bytes of the
    one bookkeeping all-reduce over the mesh, matmul FLOPs. TP: the fp32 partial reconstruction (B/D, L, d),
    twice with AuxK; TopK gathers k candidates per token and layer, BatchTopK (B/D)·k per layer. DP: the
    fp32 gradient of this rank's shard. Bookkeeping (train.reduce_step): float64 metric sums (~L·d) and
    which of all L·F features fired."""
    b = B // D
    topk = activation in ("topk", "batchtopk")
    tp_reduce = (4 * b * L * d * (2 if topk else 1)) if T > 1 else 0
    tp_gather = (4 * b * L * k * T) if topk and T > 1 else 0
    dp_reduce = 4 * clt_params_per_rank(L, d, F, T) if D > 1 else 0
    bookkeeping = 8 * (L * F + L * d + 5 * L + 8) if T * D > 1 else 0
    flops = sum(2 * m * kk * n for m, kk, n in clt_matmuls(b, L, d, F // T))
    return tp_reduce, tp_gather, dp_reduce, bookkeeping, flops


def _dist_worker(rank, world, port, shape, reps, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ddp, _, _, _, device = clt.compute_init("cpu")
    mesh = clt.make_mesh(ddp, world, world, device)
    _, _, step = step_fixture(*shape, "jumprelu", "cpu", mesh)
    t = median_seconds(step, "cpu", reps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(t, f)
    torch.distributed.destroy_process_group()


def measured_step_seconds(T, shape, reps, out_dir):
    """Median step time with T TP ranks, each a process with one thread (gloo on CPU)."""
    out = os.path.join(out_dir, f"dist_step_T{T}.json")
    torch.multiprocessing.spawn(_dist_worker, args=(T, 29500 + random.randint(0, 5000), shape, reps, out), nprocs=T)
    with open(out) as f:
        return json.load(f)


def add_dist_args(p):
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--busbw", type=float, default=300e9, help="paper model: all-reduce bus bandwidth per GPU, bytes/s")
    p.add_argument("--tflops", type=float, default=400.0, help="paper model: sustained bf16 TFLOP/s per GPU")


def dist_row(setting, mb=None, ms=None, comm_mb=None, flop_per_byte=None, note=""):
    dash = lambda x, f: "-" if x is None else f(x)
    return dict(setting=setting, MB_per_rank=dash(mb, lambda v: f"{v:.4g}"), step_ms=dash(ms, lambda v: f"{v:.4g}"),
                comm_MB_per_step=dash(comm_mb, lambda v: f"{v:.4g}"),
                FLOP_per_comm_byte=dash(flop_per_byte, lambda v: f"{v:.0f}"), note=note)


def bench_dist(args):
    """Memory per rank vs T (real shards), CPU step time T=2 over T=1, bytes communicated per FLOP,
    and 8 GPUs on paper for GPT-2 small and xl CLTs. MB = fp32 parameters + gradients + Adam moments."""
    os.makedirs(args.out, exist_ok=True)
    rows = []
    L, d, F, B = 4, 128, 1024, 1024  # the default CLT of models/tiny
    n1 = clt_params_per_rank(L, d, F, 1)
    for T in (1, 2, 4):
        shard = clt.CrossLayerTranscoder(clt.CLTConfig(L, d, F), 0, clt.Mesh(tp=T, tp_rank=0))
        n = sum(p.numel() for p in shard.parameters())
        assert n == clt_params_per_rank(L, d, F, T), (n, clt_params_per_rank(L, d, F, T))
        rows.append(dist_row(f"tiny CLT L{L} d{d} F{F}, T={T} (measured shard)", mb=16 * n / 1e6,
                             note=f"{n / n1:.3f} of T=1"))
    t1, t2 = (measured_step_seconds(T, (L, d, F, B), args.reps, args.out) for T in (1, 2))
    for T, t in ((1, t1), (2, t2)):
        tp_reduce, _, _, _, flops = per_step_traffic(L, d, F, B, T, 1)
        rows.append(dist_row(f"tiny CLT, B{B}, T={T}, CPU gloo, 1 thread/rank", ms=1e3 * t, comm_mb=tp_reduce / 1e6,
                             flop_per_byte=flops / tp_reduce if tp_reduce else None,
                             note=f"step time {t / t1:.2f} of T=1" if T > 1 else ""))
    for name, (L, d, F, B) in (("gpt2-small", (12, 768, 32768, 4096)), ("gpt2-xl", (48, 1600, 8192, 4096))):
        for T, D in ((1, 8), (2, 4), (4, 2), (8, 1)):
            rows.append(paper_row(name, L, d, F, B, T, D, args))
    return rows


def paper_row(name, L, d, F, B, T, D, args):
    """One 8-GPU mesh on paper: memory per GPU, and compute and ring all-reduce time per step."""
    tp_reduce, _, dp_reduce, bookkeeping, flops = per_step_traffic(L, d, F, B, T, D)

    def ring(n, nbytes):  # seconds of a ring all-reduce of nbytes over n GPUs
        return 2 * (n - 1) / n * nbytes / args.busbw

    t_flops = flops / (args.tflops * 1e12)
    t_comm = ring(T, tp_reduce) + ring(D, dp_reduce) + ring(T * D, bookkeeping)
    comm = tp_reduce + dp_reduce + bookkeeping
    return dist_row(f"{name} CLT L{L} d{d} F{F}, B{B}: tp{T} x dp{D} (paper)",
                    mb=16 * clt_params_per_rank(L, d, F, T) / 1e6, ms=1e3 * (t_flops + t_comm),
                    comm_mb=comm / 1e6, flop_per_byte=flops / comm,
                    note=f"compute {1e3 * t_flops:.1f} ms + comm {1e3 * t_comm:.1f} ms")


# -----------------------------------------------------------------------------
# recovery: how much of the planted world a CLT of size F finds (issue 16)


def add_recovery_args(p):
    p.add_argument("--recovery-tokens", type=int, default=150_000, help="rows of the tiny model's training cache")
    p.add_argument("--recovery-steps", type=int, default=300, help="CLT training steps of 1024 tokens (train.py: 1000)")
    p.add_argument("--recovery-sizes", default="2,8,32", help="F per layer / d_model, at the default sparsity")
    p.add_argument("--recovery-sparsity", default="0.2,0.7,2.5", help="train.py --sparsity values swept at F = 8 d")
    p.add_argument("--recovery-support", type=int, default=24, help="tiny.eval_corpus support of both evaluation sets")
    p.add_argument("--recovery-seeds", default="1,2",
                   help="evaluation-set seeds: pick the recipe on the first, report on the second")
    p.add_argument("--recovery-plot", default=os.path.join("assets", "recovery.png"), help="where the plot goes")


FAMILY_ORDER = ("category", "entity", "latent", "output")


def recipes(args, d):
    """{name: (features, sparsity, sweep)}: the size sweep at train.py's default sparsity, then the sparsity
    sweep at 8 d (the default's point is shared)."""
    import train
    default = train.TrainConfig.sparsity
    out = {f"F={m}d": (int(m) * d, default, "size") for m in args.recovery_sizes.split(",")}
    for s in args.recovery_sparsity.split(","):
        if float(s) != default:
            out[f"F=8d, sparsity {s}"] = (8 * d, float(s), "sparsity")
    return out


def trained_clt(root, cache_dir, name, features, sparsity, args):
    """Train one recipe with train.py (or reuse the run a previous invocation left): (CLT, seconds, metrics)."""
    import train
    out = os.path.join(root, "clt_" + name.replace("=", "").replace(", ", "_").replace(" ", ""))
    cfg = train.TrainConfig(cache=cache_dir, out=out, features=features, sparsity=sparsity,
                            steps=args.recovery_steps, eval_every=-1, ckpt_every=-1, device=args.device)
    marker = out + ".json"  # beside the run: what it was trained with and how long it took
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done["config"] == vars(cfg):
            return clt.CrossLayerTranscoder.from_pretrained(out), done["seconds"], done["final"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    final = train.train(cfg)
    seconds = time.perf_counter() - t0
    clt.write_json(marker, dict(config=vars(cfg), seconds=seconds, final={k: final[k] for k in ("fvu", "l0")}))
    return clt.CrossLayerTranscoder.from_pretrained(out), seconds, final


def bench_recovery(args):
    """Recovery per label family vs dictionary size (F = 2d, 8d, 32d) and vs sparsity, with the MLP-neuron and
    random-CLT baselines, on two generated evaluation sets: the recipe is chosen on the first, reported on
    the second. Sized for a 2-core CPU: a small training cache and few steps (see the arguments)."""
    import interp
    import tiny
    t_start = time.perf_counter()
    root = os.path.join(args.out, "recovery")
    model_dir = clt.DEFAULT_MODEL
    model = clt.GPT.from_pretrained(model_dir).to(args.device)
    enc = clt.load_tokenizer(model_dir)
    world = tiny.load_world(model_dir)
    d = model.config.n_embd
    cache_dir = os.path.join(root, "cache")
    cache.build_cache(cache.CacheConfig(tokens=args.recovery_tokens, out=cache_dir, device=args.device))
    train_cache = cache.ActivationCache(cache_dir, model=model)
    evals = {}
    for seed in (int(s) for s in args.recovery_seeds.split(",")):
        cfg = interp.InterpConfig(out=root, concept_cache=os.path.join(root, f"concepts_seed{seed}"),
                                  concept_seed=seed, concept_support=args.recovery_support, device=args.device,
                                  chunk_size=2048)
        ccache = interp.concept_cache(model_dir, model, world, train_cache, cfg)
        evals[seed] = (cfg, ccache, interp.ConceptLabels(ccache, world, enc, cfg))
    print(f"recovery: caches and labels in {time.perf_counter() - t_start:.0f} s")
    sample = train_cache.read(0, 4096)[0].to(args.device)  # training rows: the random CLTs' thresholds
    sets = {"MLP neurons (4d)": partial(interp.neuron_preacts, model)}
    runs = {}
    for name, (features, sparsity, sweep) in recipes(args, d).items():
        t, seconds, final = trained_clt(root, cache_dir, name, features, sparsity, args)
        t = t.to(args.device)
        runs[name] = dict(features=features, sparsity=sparsity, sweep=sweep, seconds=seconds, fvu=final["fvu"])
        sets[name] = partial(interp.clt_acts, t)
        if sweep == "size":  # one random twin per size
            sets[f"random {name}"] = partial(interp.clt_acts, interp.random_like(t, sample))
    rows = []
    heads = {}
    for seed, (cfg, ccache, labels) in evals.items():
        scores = interp.score_concepts(sets, ccache, labels, cfg)
        n_labeled = int(labels.labeled.sum())
        for name, s in scores.items():
            F_ = runs[name]["features"] if name in runs else s.n_fires.numel() // model.config.n_layer
            per_concept, _ = interp.best_features(s, labels, F_, cfg)
            table = interp.family_table(per_concept, labels, s, cfg)
            heads[name, seed] = dict(interp.headline(table, cfg), table=table,
                                     l0=s.n_fires.sum().item() / n_labeled / model.config.n_layer)
    select, report = list(evals)
    chosen = max(runs, key=lambda n: (heads[n, select]["share_recovered"], heads[n, select]["mean_best_f1"]))
    for name in sets:
        r = runs.get(name, {})
        h = heads[name, report]
        rows.append(dict(features=name, F=r.get("features", ""), sparsity=r.get("sparsity", ""),
                         l0_per_layer=round(h["l0"], 1), train_s=round(r["seconds"]) if r else "",
                         **{fam: interp.share_cell(h["table"].get(fam)) for fam in FAMILY_ORDER},
                         headline_select=f"{100 * heads[name, select]['share_recovered']:.1f} %",
                         headline_report=interp.share_cell(dict(share=h["share_recovered"],
                                                                mean_best_f1=h["mean_best_f1"])),
                         chosen="yes" if name == chosen else ""))
    plot_recovery(args.recovery_plot, runs, sets, heads, report, d)
    seconds = time.perf_counter() - t_start
    print(f"recovery: chosen on evaluation set {select}: {chosen}; on set {report} it recovers "
          f"{heads[chosen, report]['recovered']}/{heads[chosen, report]['n']} of the "
          f"{evals[report][0].families} concepts with F1 >= {evals[report][0].concept_f1}; "
          f"{seconds:.0f} s in all; plot: {args.recovery_plot}")
    return rows


def plot_recovery(path, runs, sets, heads, seed, d):
    """Per family, the share recovered (top) and the mean best F1 (bottom) vs F/d (CLTs solid, their random
    twins dashed, the MLP neurons as squares at 4d) and vs L0 (the sparsity sweep at 8d), on set `seed`."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 7.5))
    ax = fig.subplots(2, 2)
    colours = dict(zip(FAMILY_ORDER, ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")))
    sizes = [n for n in runs if runs[n]["sweep"] == "size"]
    sweep = sorted((n for n in runs if runs[n]["features"] == 8 * d), key=lambda n: heads[n, seed]["l0"])
    x = [runs[n]["features"] / d for n in sizes]
    for row, key in enumerate(("share", "mean_best_f1")):
        for fam, colour in colours.items():
            def value(name):
                return (heads[name, seed]["table"].get(fam) or {}).get(key) or 0.0
            ax[row, 0].plot(x, [value(n) for n in sizes], "o-", color=colour, label=fam)
            ax[row, 0].plot(x, [value(f"random {n}") for n in sizes], "x--", color=colour, alpha=0.6)
            ax[row, 0].plot([4], [value("MLP neurons (4d)")], "s", color=colour, alpha=0.6)
            ax[row, 1].plot([heads[n, seed]["l0"] for n in sweep], [value(n) for n in sweep], "o-", color=colour)
        label = "share of concepts with F1 >= 0.8" if key == "share" else "mean best F1"
        ax[row, 0].set(xscale="log", ylabel=label, ylim=(-0.02, 1.02))
        ax[row, 0].set_xticks(x + [4], [f"{v:g}" for v in x] + ["4"])
        ax[row, 0].minorticks_off()
        ax[row, 1].set(ylim=(-0.02, 1.02))
    ax[0, 0].set_title("vs dictionary size (dashed: random CLT; squares: MLP neurons)", fontsize=10)
    ax[0, 1].set_title("vs sparsity (train.py --sparsity sweep at F = 8d)", fontsize=10)
    ax[1, 0].set_xlabel("features per layer / d")
    ax[1, 1].set_xlabel("L0 per layer on the evaluation set")
    ax[0, 0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with clt.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# -----------------------------------------------------------------------------
# main

BENCHMARKS = {"cache": (bench_cache, add_cache_args, "activation cache: bytes/token, NMSE, writer overhead, read rate"),
              "graph": (bench_graph, add_graph_args, "attribution graphs: time and peak memory vs active features"),
              "interp": (bench_interp, add_interp_args, "autointerp: both passes over the cache vs one plain read"),
              "train": (bench_train, add_train_args, "CLT training step vs matmul FLOP rate; sparse vs dense decode"),
              "dist": (bench_dist, add_dist_args, "TP/DP: memory per rank, step time T=2/T=1, bytes per FLOP, 8 GPUs on paper"),
              "recovery": (bench_recovery, add_recovery_args,
                           "planted concepts recovered per family vs CLT size and sparsity")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True)
    for name, (_, add_args, text) in BENCHMARKS.items():
        b = sub.add_parser(name, help=text)
        b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
        b.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
        b.add_argument("--out", default=os.path.join("runs", "bench"), help="scratch space and <name>.json")
        b.add_argument("--quick", action="store_true", help="a small run: sizes divided by 4")
        add_args(b)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        for k, v in vars(args).items():
            if k.endswith("_tokens"):
                setattr(args, k, v // 4)
    fn = BENCHMARKS[args.benchmark][0]
    print(vars(args))
    os.makedirs(args.out, exist_ok=True)
    results = fn(args)
    print_table(results)
    meta = dict(args=vars(args), torch=torch.__version__, device=args.device, threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None)
    with open(os.path.join(args.out, f"{args.benchmark}.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
