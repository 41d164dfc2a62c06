"""
experiments/common.py: what the studies share. Every figure a study reports is a ratio measured
within one run, because the machines are noisy: a baseline is timed in the same process, next to the
thing it is compared with.

Adding a study: a file experiments/<name>.py with its flags as a dataclass `<Name>Bench(Bench)`
(each field an `arg(default, help)`) and `run(cfg) -> list of result dicts`, ending in

    def main(argv=None):
        return run_study(__doc__, "<name>", run, <Name>Bench, argv)

    if __name__ == "__main__":
        run_main(main)

Its rows print as a markdown table and go to <out>/<name>.json with the machine they were measured
on. Each study file puts the repository root first on sys.path, so `python experiments/<name>.py`
finds the library (not installed) and `import cache` is the library's cache.py, not
experiments/cache.py.
"""

import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from clt import CLTConfig, CrossLayerTranscoder
from forge import toyworld
from forge.cli import arg, parse_config
from forge.files import atomic_path, write_json
from forge.hub import ENDOFTEXT
from model import GPT, GPTConfig, Llama, LlamaConfig, load_model
from parallel import compute_init, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
GiB = 2**30

# the random models the studies make (no download): GPT-2 small's shape, and models/tiny's with a
# larger vocabulary
GPT2_SMALL_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, n_ctx=1024, vocab_size=50257)
TINY_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, n_ctx=128, vocab_size=4096)


@dataclass
class Bench:
    """the flags every study has"""

    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, ...")
    threads: int = arg(0, "torch CPU threads; 0 = torch's default")
    out: str = arg(os.path.join("runs", "bench"), "scratch space and <name>.json")
    quick: bool = arg(False, "a small run: every *_tokens size divided by 4")


def run_study(doc, name, run, config_class, argv=None):
    """Parse the study's flags, run it, print its rows as a table, write <out>/<name>.json."""
    cfg = parse_config(doc, config_class, argv)
    set_threads(cfg.threads)
    if cfg.quick:
        smaller = {
            f.name: getattr(cfg, f.name) // 4 for f in fields(cfg) if f.name.endswith("_tokens")
        }
        cfg = replace(cfg, **smaller)
    print(asdict(cfg))
    os.makedirs(cfg.out, exist_ok=True)
    results = run(cfg)
    print_table(results)
    cuda = str(cfg.device).startswith("cuda")
    meta = dict(
        args=asdict(cfg),
        torch=torch.__version__,
        device=cfg.device,
        threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name() if cuda else None,
    )
    write_json(os.path.join(cfg.out, f"{name}.json"), dict(meta=meta, results=results))
    return 0


def print_table(rows):
    """Rows of equal keys as a markdown table; floats to 4 significant digits."""
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        print("| " + " | ".join(cells) + " |")


def save_png(fig, path, dpi):
    """A matplotlib figure, laid out, as a PNG at path (its folder made; written atomically)."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:  # the temporary name has no .png to infer the format from
        fig.savefig(tmp, dpi=dpi, format="png")


# -----------------------------------------------------------------------------
# timing and memory


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def set_threads(threads):
    if threads:
        torch.set_num_threads(threads)


def timed(fn):
    """(wall seconds, CPU seconds of all threads) of fn(). On a shared machine the CPU time is the
    fairer cost: other processes do not count in it."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def median_seconds(fn, device, reps):
    """The median wall time of reps calls of fn() after a warm-up (allocator, caches, lazy init)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def peak_reset(device="cpu"):
    """Start a peak-memory window -> the baseline bytes (CUDA: allocated; CPU: resident, Linux)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    return proc_status_kb("VmRSS") * 1024


def peak_bytes(device="cpu", base=0):
    """The peak (CUDA: the allocator's; CPU: resident) since peak_reset, or since the process
    started (in a fresh process: what it ran), above base."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return proc_status_kb("VmHWM") * 1024 - base


def cuda_peak_gib(device):
    """The CUDA allocator's peak in GiB since the process started; None on a CPU."""
    return peak_bytes(device) / GiB if str(device).startswith("cuda") else None


# -----------------------------------------------------------------------------
# processes


def fresh_process(fn, *args, timeout=None):
    """fn(*args) in a new process (spawned: nothing inherited), which returns fn's result: a peak
    memory of its own. With a timeout (seconds) the process is killed once it runs past it, even
    inside a CUDA or NCCL wait, and concurrent.futures.process.BrokenProcessPool is raised here."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        if timeout is None:
            return pool.submit(fn, *args).result()
        return pool.submit(alarmed, max(1, math.ceil(timeout)), fn, *args).result()


def alarmed(seconds, fn, *args):
    """fn(*args), with SIGALRM due in `seconds`: its default action ends the process at once (no
    Python handler has to run, so a C call that never returns is no refuge)."""
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_tp_ranks(fn, world, args, threads, out_dir):
    """fn(mesh, *args) on every rank of a world-way TP mesh, a spawned process per rank (gloo, CPU)
    with `threads` threads -> [fn's result (JSON) per rank]."""
    out = os.path.join(out_dir, f"{fn.__name__}_T{world}_rank{{rank}}.json")
    spawn_args = (world, free_port(), threads, fn, args, out)
    torch.multiprocessing.spawn(_tp_rank, args=spawn_args, nprocs=world)
    results = []
    for rank in range(world):
        with open(out.format(rank=rank)) as f:
            results.append(json.load(f))
    return results


def _tp_rank(rank, world, port, threads, fn, args, out):
    env = dict(
        RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    )
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(threads)
    ddp, _, _, _, device = compute_init("cpu")
    mesh = make_mesh(ddp, world, world, device)
    write_json(out.format(rank=rank), fn(mesh, *args))
    torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# random models, corpora and transcoders


def random_model_dir(path, n_layer=12, n_head=12, n_embd=768, n_ctx=1024, vocab_size=50257, seed=0):
    """A random GPT-2 (GPT's own init) in the hub layout with a byte-level tokenizer (256 bytes +
    <|endoftext|>, no merges): no download, and any shape (by default GPT-2 small's)."""
    torch.manual_seed(seed)
    config = GPTConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=n_ctx, vocab_size=vocab_size
    )
    GPT(config).save_pretrained(path)
    toyworld.save_tokenizer(path, [])
    return path


def hf_random_model_dir(
    path, n_layer=12, n_head=12, n_embd=768, n_ctx=1024, vocab_size=50257, seed=0
):
    """random_model_dir's model made and saved by transformers (its init: N(0, 0.02) weights)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ValueError(
            "this study makes its model with transformers: pip install transformers"
        ) from e
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_ctx, vocab_size=vocab_size
    )
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    toyworld.save_tokenizer(path, [])
    return path


# the Llama family: a byte-level BPE tokenizer.json and a random model in the hub layout
SPECIALS = {  # the special tokens, first = what tokenizer_config.json names bos/pad/eos
    "llama": dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
    "qwen3": dict(bos_token=None, pad_token="<|endoftext|>", eos_token="<|im_end|>"),
}


def write_hub_tokenizer(path, docs, model_type="llama", vocab_size=300):
    """A byte-level BPE trained on docs as the Llama 3 / Qwen3 repositories ship theirs:
    tokenizer.json + tokenizer_config.json, their special tokens first -> its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = {k: v for k, v in SPECIALS[model_type].items() if v}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials.values()), initial_alphabet=alphabet
    )
    tok.train_from_iterator(docs, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = dict(SPECIALS[model_type], tokenizer_class="PreTrainedTokenizerFast")
    write_json(os.path.join(path, "tokenizer_config.json"), config)
    return tok.get_vocab_size()


def random_llama_dir(path, docs, n_layer=16, seed=0):
    """A random Llama of Llama-3.2-1B's shape (LlamaConfig's defaults, model.Llama's init) but
    n_layer, in the hub layout, with write_hub_tokenizer's tokenizer trained on docs."""
    write_hub_tokenizer(path, docs)
    torch.manual_seed(seed)
    Llama(LlamaConfig(n_layer=n_layer)).save_pretrained(path)
    return path


def synthetic_corpus(path, n_docs, seed=0):
    """Documents of random words, separated by <|endoftext|> (for models without a corpus)."""
    rng = random.Random(seed)
    words = (
        "the of and to in is was for on that with as by at from his her it an were which are this "
        "be city river capital north south language people old new market bridge road year king"
    ).split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 300))) for _ in range(n_docs)]
    with open(path, "w") as f:
        f.write(ENDOFTEXT.join(docs))
    return path


def random_clt(model_dir, cache_dir, clt_dir, F, density=0.01):
    """A random CLT of the model in clt_dir, thresholds at each feature's (1 - density) quantile of
    its pre-activations on the cache's first rows: each feature fires on ~density of the tokens.
    Made once: a CLT already in clt_dir is kept (two studies of one run share it)."""
    import cache

    if os.path.exists(os.path.join(clt_dir, "config.json")):
        return
    ca = cache.ActivationCache(cache_dir)
    model = load_model(model_dir)
    config = CLTConfig(
        ca.n_layers, ca.d_model, F, model=model_dir, model_sha256=model.fingerprint()
    )
    c = CrossLayerTranscoder(config)
    with torch.no_grad():
        pre = c.pre_acts(ca.read(0, min(4096, ca.n_tokens))[0])  # (N, L, F)
        # kthvalue, not quantile: torch.quantile refuses inputs over 2^24 elements
        kth = pre.kthvalue(max(1, int(len(pre) * (1 - density))), dim=0).values  # (L, F)
        c.log_threshold.copy_(kth.clamp_min(1e-3).log())
    c.save_pretrained(clt_dir)


def clt_with_n_active(model, idx, n_features, n_active, seed=0):
    """A random CLT whose b_enc makes exactly n_active (position, layer, feature) fire on idx (BOS
    excluded): the JumpReLU threshold falls between the n-th and (n+1)-th largest x·W_enc."""
    c = model.config
    config = CLTConfig(n_layers=c.n_layer, d_model=c.n_embd, n_features=n_features)
    t = CrossLayerTranscoder(config, seed).to(idx.device).eval()
    with torch.no_grad():
        pre = t.pre_acts(model.run_with_acts(idx)[1].mlp_in[0])[1:]  # (T-1, L, F), b_enc = 0
        top = pre.flatten().topk(n_active + 1).values
        t.b_enc.fill_((t.threshold[0, 0] - (top[-2] + top[-1]) / 2).item())
    return t
