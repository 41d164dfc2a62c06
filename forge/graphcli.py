"""graph.py's and intervene.py's command lines: flags, loading, the checks that model, transcoder,
prompt and flags fit (each refusal names the fix), the flags' small languages (output nodes,
interventions, layers), the printed reports. The scripts pass in what they need (the loaders)."""

import math
import os
import re
from dataclasses import dataclass

import torch

from forge.cli import arg
from forge.files import check_same_model, read_safetensors
from forge.graphfile import load_explanations, token_str
from forge.hub import DEFAULT_MODEL, ENDOFTEXT, is_hub_id, load_tokenizer

PROMPT = "Batris lives in Fafes. The language Batris speaks is"
CLT = "runs/clt"  # train.py's default output, never read as a hub id
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT = "output nodes: the most likely tokens unless one of these is given"
QK_FORMS = "auto, auto:N or LAYER.HEAD@I:J,... (positions 0-based, BOS at 0, negative from the end)"
QK_HELP = f"pattern entries to explain: {QK_FORMS}; auto: the 20 with the largest attribution"


@dataclass
class GraphConfig:
    """attribute a prompt: the graph files for the front end, and the full adjacency"""

    model: str = arg(DEFAULT_MODEL, "GPT-2 directory in the hub layout, or a hub id such as gpt2")
    clt: str = arg(CLT, "transcoder dir (any layout load_transcoder reads) or hub id")
    interp: str = arg("runs/interp", "interp.py's output dir or features.jsonl: node explanations")
    prompt: str = arg(PROMPT, "text to attribute (BOS is prepended)")
    out: str = arg("runs/graph", "output directory")
    slug: str = arg("graph", "the graph's name in the front end: OUT/SLUG.json")
    device: str = arg(DEVICE, "cpu or cuda (torchrun: each rank its own GPU)")
    max_features: int = arg(-1, "at most this many feature nodes; -1 = all", group="attribution")
    batch_size: int = arg(256, "targets per pass of the transposed model")
    update_interval: int = arg(4, "with --max-features: re-rank features every this many batches")
    max_logits: int = arg(10, "at most this many logit nodes")
    logit_prob: float = arg(0.95, "logit nodes until this cumulative probability")
    position_nodes: bool = arg(False, "position embeddings as nodes of their own, not biases")
    target: str = arg("", "NAME:SPEC: output nodes of a kind in TARGETS, e.g. diff:A|B", group=OUT)
    target_diff: str = arg("", 'logit(A) - logit(B): "A|B", one token each, e.g. " Paris| London"')
    target_tokens: str = arg("", 'these tokens\' logits: "A|B|...", one token each')
    target_direction: str = arg("", "a direction at ln_f's output: .safetensors of one (d,) tensor")
    node_threshold: float = arg(0.8, "keep nodes up to this cumulative influence", group="pruning")
    edge_threshold: float = arg(0.98, "keep edges up to this cumulative influence")
    qk: str = arg("", QK_HELP, group="QK attributions: why a head attends where it does")
    qk_pairs: int = arg(20, "(query node, key node) pairs kept per explained entry")


@dataclass
class RunConfig:
    """the flags `intervene` and `generate` share"""

    model: str = arg(DEFAULT_MODEL, "GPT-2 directory in the hub layout, or a hub id such as gpt2")
    clt: str = arg(CLT, "transcoder dir (any layout load_transcoder reads) or hub id")
    prompt: str = arg(PROMPT, "text to run or continue (BOS is prepended)")
    device: str = arg(DEVICE, "cpu or cuda")
    intervene: str = arg("", "LAYER/POS/FEATURE=VALUE (set), *X, +X or :ablate; comma-separated")
    freeze: str = arg("none", "none: the real model; attention: patterns frozen; all: replacement")
    layers: str = arg("", "START:END: only mlp_out[START:END] get the change; empty = all")


@dataclass
class InterveneConfig(RunConfig):
    """change CLT features' activations and print how the next-token prediction changes"""

    top: int = arg(10, "rows of probability changes to print")


@dataclass
class GenerateConfig(RunConfig):
    """continue a prompt with the plain model and under interventions, side by side"""

    every_token: bool = arg(False, "also apply the interventions at POS -1 at every new token")
    max_new_tokens: int = arg(20, "tokens to generate")
    temperature: float = arg(0.0, "0 = greedy; > 0 samples from softmax(logits / temperature)")
    top_k: int = arg(0, "sample from the top k tokens only; 0 = all")
    seed: int = arg(0, "random seed for sampling (both continuations draw alike)")


def load(cfg, device, load_model, load_transcoder):
    """-> (cfg.model, its transcoder cfg.clt refused if made for another model, the tokenizer)."""
    if not os.path.exists(cfg.clt) and (cfg.clt == CLT or not is_hub_id(cfg.clt)):
        cache = "python cache.py --model models/tiny --corpus toy --out runs/cache"
        fix = f"train one first, `{cache} && python train.py` (writes runs/clt), or pass --clt DIR"
        raise FileNotFoundError(f"no CLT at {cfg.clt}: {fix}")
    model = load_model(cfg.model)
    clt = load_transcoder(cfg.clt, model).to(device)
    check_compatible(model.to(device), clt)
    check_same_model(model, clt.config.model_sha256, f"the CLT {cfg.clt}")
    return model, clt, load_tokenizer(cfg.model)


def explanations(cfg):
    """The node labels from --interp, refused if it explains another CLT than --clt; none if it
    is "" or the default folder that is not there. A folder named that is not there is an error."""
    if cfg.interp == GraphConfig.interp and not os.path.exists(cfg.interp):
        print(f"no interp output at {cfg.interp}: the nodes get no labels (run interp.py first)")
        return {}
    if cfg.interp and not os.path.exists(cfg.interp):
        fix = 'pass interp.py\'s --out, or --interp "" for a graph without labels'
        raise FileNotFoundError(f"no interp output at --interp {cfg.interp}: {fix}")
    return load_explanations(cfg.interp, cfg.clt)


def check_compatible(model, clt):
    """Refuse a transcoder whose layers or width are not the model's."""
    c, g = clt.config, model.config
    if (c.n_layers, c.d_model) != (g.n_layer, g.n_embd):
        ours = f"it has n_layers={c.n_layers}, d_model={c.d_model} (its config names {c.model!r})"
        gpt = f"the GPT has n_layer={g.n_layer}, n_embd={g.n_embd}"
        fix = "pass the --model it was made for"
        raise ValueError(f"the CLT was made for another model: {ours}, {gpt}: {fix}")


def check_one_prompt(model, clt, idx, what):
    """Refuse a transcoder of another shape, ids the model cannot take, a batch of prompts."""
    check_compatible(model, clt)
    model.check_input(idx)
    if idx.size(0) != 1:
        raise ValueError(f"{what} one prompt at a time, got a batch of {idx.size(0)}")


def encode_prompt(enc, prompt, n_ctx):
    """Text -> (1, T) token ids with BOS first, as circuit-tracer's tokenizers give them."""
    if not prompt.strip():
        raise ValueError(f"the prompt is empty ({prompt!r}): give --prompt some text")
    try:  # bytes that are not UTF-8 reach Python as lone surrogates, which no JSON reader takes
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start : e.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"the prompt is not valid UTF-8 ({bad!r} at {e.start}): pass UTF-8 text")
    bos = enc.eot_token  # GPT-2's <|endoftext|>; other families': hub.HubTokenizer's BOS
    ids = enc.encode(prompt, allowed_special={ENDOFTEXT})
    ids = ids if ids[0] == bos else [bos] + ids
    if len(ids) > n_ctx:
        over = f"the prompt is {len(ids)} tokens with BOS, over the GPT's n_ctx={n_ctx}"
        raise ValueError(f"{over}: shorten it")
    return torch.tensor([ids])


# -----------------------------------------------------------------------------
# output nodes: --target NAME:SPEC, --target-diff A|B, --target-tokens A|B|..., --target-direction
def target_spec(cfg, names):
    """The one output-node flag given -> (NAME, SPEC), NAME in names; ("", "") if none is."""
    named = [f"{name}:{getattr(cfg, 'target_' + name)}" for name in ("diff", "tokens", "direction")]
    given = [x for x in named if not x.endswith(":")] + [cfg.target] * bool(cfg.target)
    if len(given) > 1:
        flags = "--target, --target-diff, --target-tokens, --target-direction"
        raise ValueError(f"give one of {flags}, not {given}")
    name, colon, spec = (given or [":"])[0].partition(":")
    if given and (name not in names or not colon):
        raise ValueError(f"--target {given[0]!r}: write NAME:SPEC, NAME one of {', '.join(names)}")
    return name, spec


def spec_tokens(enc, spec, flag, pair=False):
    """A|B|... -> their token ids: each text exactly one token, none twice (pair: two of them)."""
    texts = spec.split("|")
    if pair and len(texts) != 2:
        raise ValueError(f"{flag} {spec!r}: give two tokens as A|B, e.g. ' Paris| London'")
    ids = [enc.encode(text, allowed_special={ENDOFTEXT}) for text in texts]
    for text, tokens in zip(texts, ids):
        if len(tokens) != 1:
            pieces = [token_str(enc, t) for t in tokens]
            fix = "give tokens the tokenizer keeps whole (mind the leading space: ' x' is not 'x')"
            raise ValueError(f"{flag}: {text!r} is {len(tokens)} tokens {pieces}, not one: {fix}")
    if len({t[0] for t in ids}) < len(ids):
        raise ValueError(f"{flag} {spec!r} names a token twice: give each once")
    return [t[0] for t in ids]


def read_direction(path, d):
    """A .safetensors of one (d,) tensor -> (its output node's label, the tensor)."""
    if not os.path.exists(path):
        example = "safetensors.torch.save_file({'direction': v}, path), v of shape (n_embd,)"
        raise FileNotFoundError(f"no direction file {path}: save one with {example}")
    tensors = read_safetensors(path)
    if len(tensors) != 1:
        raise ValueError(f"{path} holds tensors {sorted(tensors)}: save exactly one, ({d},)")
    ((name, vector),) = tensors.items()
    return f"Output direction {os.path.basename(path)}:{name} (at ln_f's output)", vector


# -----------------------------------------------------------------------------
# QK attributions: --qk auto[:N] or LAYER.HEAD@I:J,...

QK = re.compile(r"\s*(\d+)\.(\d+)@(-?\d+):(-?\d+)\s*")


def parse_qk(spec, config, T):
    """--qk -> (N, []) for auto[:N] (20 by default), else (0, [(layer, head, i, j)]) in range of
    the model's config (n_layer, n_head) and a T-token prompt."""
    name, colon, n = spec.strip().partition(":")
    if name == "auto":
        if not (n.isdigit() and int(n) > 0) and (colon or n):
            raise ValueError(f"--qk {spec!r}: write auto or auto:N with N >= 1, e.g. auto:10")
        return int(n or 20), []
    steps = []
    for one in spec.split(",") if spec.strip() else []:
        if not (m := QK.fullmatch(one)):
            raise ValueError(f"--qk {one.strip()!r}: write {QK_FORMS}, e.g. 1.2@-1:3")
        l, h, i, j = map(int, m.groups())
        where = f"--qk {one.strip()!r}"
        if l >= config.n_layer or h >= config.n_head:
            heads = f"layers 0..{config.n_layer - 1}, heads 0..{config.n_head - 1}"
            raise ValueError(f"{where}: the model has {heads}")
        if not (-T <= i < T and -T <= j < T):
            raise ValueError(f"{where}: positions lie in -{T}..{T - 1} (the prompt's {T} tokens)")
        if j % T > i % T:
            raise ValueError(f"{where}: key {j % T} comes after query {i % T}: its pattern is 0")
        steps.append((l, h, i % T, j % T))
    return 0, steps


def print_qk(records, seconds):
    """One line per explained entry (none without --qk): pattern, score, contrast, its top pair."""
    if not records:
        return
    for r in records:
        top = r["pairs"][0] if r["pairs"] else dict(query="-", key="-", value=0.0)
        step = f"L{r['layer']}.H{r['head']}@{r['query_pos']}:{r['key_pos']}"
        numbers = f"A {r['pattern']:.3f} | score {r['score']:+.3f} | contrast {r['contrast']:+.3f}"
        print(f"qk {step}: {numbers} | top pair {top['query']} x {top['key']} {top['value']:+.3f}")
    print(f"qk: {len(records)} entries explained in {seconds:.2f} s")


# -----------------------------------------------------------------------------
# interventions: --intervene LAYER/POS/FEATURE=VALUE,... and --layers START:END

MODES = ("set", "scale", "add", "ablate")
FORMS = "LAYER/POS/FEATURE=VALUE (set), *X (scale), +X (add) or :ablate"
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
SPEC = re.compile(rf"\s*(\d+)/(-?\d+)/(\d+)\s*(?:([=*+])\s*({NUMBER})|:\s*(ablate))\s*")


def parse_interventions(spec, make, required=False):
    """Comma-separated LAYER/POS/FEATURE then =VALUE (set), *X (scale), +X (add) or :ablate, e.g.
    "3/-1/123=5,0/2/7:ablate" -> [make(layer, pos, feature, mode, value)] ([] for "")."""
    if required and not spec.strip():
        raise ValueError(f"intervene needs --intervene {FORMS}")
    out = []
    for one in spec.split(",") if spec else []:
        if not (m := SPEC.fullmatch(one)):
            example = "comma-separated for several, e.g. 3/-1/123=5,0/2/7:ablate"
            raise ValueError(f"--intervene {one.strip()!r}: write {FORMS}, {example}")
        mode = "ablate" if m.group(6) else {"=": "set", "*": "scale", "+": "add"}[m.group(4)]
        out.append(make(*map(int, m.group(1, 2, 3)), mode, float(m.group(5) or 0)))
    return out


def check_interventions(interventions, T, config, layers=None):
    """Refuse interventions out of a T-token prompt or the CLT (config), or twice on a feature, and
    bad layers -> ((n, 3) long tensor of (layer, position in 0..T-1, feature), (start, end))."""
    L, F_ = config.n_layers, config.n_features
    start, end = (0, L) if layers is None else layers
    if not 0 <= start < end <= L:
        raise ValueError(f"layers={layers}: need 0 <= start < end <= {L} (mlp_out[start:end])")
    out = []
    for iv in interventions:
        name = f"intervention {iv.layer}/{iv.pos}/{iv.feature}"
        if iv.mode not in MODES:
            raise ValueError(f"{name}: mode {iv.mode!r} is not one of {', '.join(MODES)}")
        if not math.isfinite(iv.value):
            raise ValueError(f"{name}: the value {iv.value} is not finite: give a finite number")
        if not (0 <= iv.layer < L and -T <= iv.pos < T and 0 <= iv.feature < F_):
            sizes = f"0 <= layer < {L}, -{T} <= pos < {T} (the prompt's tokens, BOS included)"
            raise ValueError(f"{name}: need {sizes} and 0 <= feature < {F_}")
        out.append((iv.layer, iv.pos % T, iv.feature))
    if len(set(out)) < len(out):
        fix = "give each (layer, pos, feature) once, with the value it should end up at"
        names = [f"{l}/{p}/{f}" for l, p, f in out]
        raise ValueError(f"a feature is changed twice in {names}: {fix}")
    return torch.tensor(out, dtype=torch.long).view(-1, 3), (start, end)


def parse_layers(text, L):
    """--layers START:END (either side may be empty) -> (start, end), or None if empty."""
    if not text.strip():
        return None
    parts = [x.strip() for x in text.split(":")]
    if len(parts) != 2 or not all(x.lstrip("-").isdigit() or not x for x in parts):
        raise ValueError(f"--layers {text!r}: write START:END (mlp_out[START:END]), e.g. 1:3 or 2:")
    return int(parts[0] or 0), int(parts[1] or L)


# -----------------------------------------------------------------------------
# the printed reports
def print_graph(graph, enc, cfg, seconds, world, exact, scores, kept):
    """graph.py's summary: nodes, outputs, time, exactness (err, scale), scores, pruned graph."""
    labels = graph.target_labels or [""] * len(graph.logit_ids)
    probs = zip(graph.logit_ids.tolist(), graph.logit_probs.tolist(), labels)
    top = ", ".join(label or f"{token_str(enc, t)!r} {p:.3f}" for t, p, label in probs)
    capped = " [capped: dropped features' edges are missing]" * (len(graph.feats) < graph.n_active)
    nodes = f"active features: {graph.n_active} | feature nodes: {len(graph.feats)}"
    print(f"prompt: {len(graph.tokens)} tokens | {nodes} | logits: {top}")
    sums = f"max |sum A + bias - input| = {exact[0]:.2e} (inputs up to {exact[1]:.2g}){capped}"
    print(f"attribution: {seconds:.2f} s on {world} process(es) | exactness: {sums}")
    pruned = f"pruned graph: {kept[0]} nodes, {kept[1]} links -> {cfg.out}/{cfg.slug}.json"
    print(f"replacement score {scores[0]:.3f} | completeness score {scores[1]:.3f} | {pruned}")
    if len(kept) > 2:
        serve = f"python -m circuit_tracer start-server --graph_file_dir {cfg.out}"
        print(f"circuit-tracer's front end with the supernodes: {serve}, then open {kept[2]}")


def print_intervention(enc, idx, interventions, out, cfg):
    """Each change, then the cfg.top largest changes of the next token's probability."""
    for iv, a, b in zip(interventions, out.old.tolist(), out.new.tolist()):
        token = token_str(enc, idx[0, iv.pos].item())
        change = f"activation {a:.3g} -> {b:.3g} ({iv.mode} {iv.value:g})"
        name = f"feature {iv.layer}/{iv.pos}/{iv.feature}"
        print(f"{name} on {token!r}: {change} | freeze {cfg.freeze}")
    p0 = out.clean_logits[-1].softmax(-1)
    p1 = out.logits[-1].softmax(-1)
    print(f"{'token':>16} | {'p before':>8} | {'p after':>8} | {'change':>8}")
    for t in (p1 - p0).abs().topk(min(cfg.top, len(p0))).indices.tolist():
        print(f"{token_str(enc, t)!r:>16} | {p0[t]:8.4f} | {p1[t]:8.4f} | {p1[t] - p0[t]:+8.4f}")


def print_generation(enc, cfg, T, clean, steered, seconds):
    """The two continuations of the prompt (T tokens) side by side, then whole, and the speed."""
    print(f"{'step':>4} | {'clean':>16} | {'intervened':>16}")
    for i, (a, b) in enumerate(zip(clean[0, T:].tolist(), steered[0, T:].tolist())):
        mark = "" if a == b else "  *"
        print(f"{i + 1:4d} | {token_str(enc, a)!r:>16} | {token_str(enc, b)!r:>16}{mark}")
    print(f"prompt:     {cfg.prompt!r}")
    print(f"clean:      {enc.decode(clean[0, T:].tolist())!r}")
    print(f"intervened: {enc.decode(steered[0, T:].tolist())!r}")
    n = cfg.max_new_tokens
    speed = f"{n / max(seconds, 1e-9):.1f} tok/s for both continuations, no KV cache"
    print(f"{n} tokens in {seconds:.2f} s ({speed}: each step re-runs the whole sequence)")
