"""
intervene.py: test a hypothesis read off an attribution graph: change CLT features' activations,
run the model, and see how the next-token prediction, or a whole continuation, changes.

Data flow:
    prompt -> token ids, BOS first (forge/graphcli.py's encode_prompt)
      -> the clean run: GPT.run_with_acts; the changed features' activations a: the CLT encoder's
      -> each change a -> a' adds (a' - a) x the feature's decoder writes to the MLP outputs
      -> the intervened run (freeze: none | attention | all, see intervene) -> logits, next token

    python intervene.py intervene --intervene 3/-1/123=5,2/4/9:ablate --prompt "..."
        # LAYER/POS/FEATURE then =VALUE (set), *X (scale), +X (add) or :ablate
    python intervene.py intervene --intervene 3/-1/123:ablate --freeze all  # replacement model
    python intervene.py generate --intervene 3/-1/123+4 --every-token --max-new-tokens 20
    tiny CPU run: python train.py, then python intervene.py intervene --intervene 1/-1/3=4
    one process only, no torchrun: a prompt's runs are a few forward passes

Differences from circuit-tracer (its feature_intervention):
- freeze="all" holds every layer's MLP output (circuit-tracer's constrained_layers chooses which);
  `layers` instead limits which MLP outputs receive the change.
- generate keeps no KV cache: each new token re-runs the whole sequence (3 passes).
"""

import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import NamedTuple, Optional

import torch

from clt import CrossLayerTranscoder, load_transcoder
from forge import cli, graphcli
from graph import reconstruct, replacement_forward
from model import GPT, Acts, Frozen, load_model

FREEZE = ("none", "attention", "all")


@dataclass
class Intervention:
    """One change to one CLT feature at one position of the prompt."""

    layer: int  # the feature's layer
    pos: int  # its position in the prompt, BOS = 0; negative counts from the end (-1: the last)
    feature: int  # its id in the layer
    mode: str = "set"  # set: a -> value, scale: a -> a·value, add: a -> a + value, ablate: a -> 0
    value: float = 0.0  # set: the new activation; scale: the factor; add: the shift

    def new_activation(self, a):
        """The feature's activation after the change, from its clean activation a."""
        new = dict(set=torch.full_like(a, self.value), scale=a * self.value, add=a + self.value)
        return new.get(self.mode, torch.zeros_like(a))


class Intervened(NamedTuple):
    """What run_intervened returns: both runs of the prompt, the changed features' activations."""

    clean_logits: torch.Tensor  # (T, V)
    logits: torch.Tensor  # (T, V) with the interventions
    clean: Acts  # the clean run's activations (batch 1)
    acts: Acts  # the intervened run's: its mlp_out holds the changed MLP outputs
    old: torch.Tensor  # (n,) each changed feature's clean activation (the CLT encoder's)
    new: torch.Tensor  # (n,) what it was set to


# -----------------------------------------------------------------------------
# interventions (the real model's view, or the replacement model's), and generation under them


def intervene(
    model: GPT,
    clt: CrossLayerTranscoder,
    idx: torch.Tensor,
    interventions: list,
    freeze: str = "none",
    layers: Optional[tuple] = None,
) -> tuple:
    """Change CLT features' activations and run the model -> (clean logits, intervened logits),
    (T, V) each: test a hypothesis read off a graph. Each Intervention moves a feature's activation
    a (the CLT encoder's on the clean run, 0 if silent) to a', changing the MLP outputs it writes
    by (a' - a) x its decoder writes.

    Args:
        idx: (1, T) token ids, BOS first; interventions: [Intervention], each feature at most once.
        freeze: what stays as in the clean run. "none": nothing (the real model: later MLPs, not
            CLT features, respond); "attention": the patterns; "all": the replacement model's view
            (patterns, LayerNorm scales, MLP outputs; the skip live): ablating a graph's feature
            moves each logit node by minus its edge. layers: (start, end): only mlp_out[start:end].
    """
    out = run_intervened(model, clt, idx, interventions, freeze, layers)
    return out.clean_logits, out.logits


@torch.no_grad()
def run_intervened(model, clt, idx, interventions, freeze="none", layers=None) -> Intervened:
    """intervene's two runs with their activations."""
    graphcli.check_one_prompt(model, clt, idx, "intervene on")
    if freeze not in FREEZE:
        raise ValueError(f"freeze={freeze!r}: use one of {', '.join(FREEZE)}")
    clean_logits, clean = model.run_with_acts(idx)
    mlp_in = clt.input_of(clean)[0]  # (T, L, d) what the CLT reads
    delta, old, new = intervention_delta(clt, mlp_in, interventions, layers)
    if freeze == "all":  # the replacement model: every MLP output held, plus the change
        fixed = clean.mlp_out[0] - clt.skip(mlp_in) + delta  # (T, L, d)
        logits, acts = replacement_forward(model, clt, idx, clean.frozen, fixed)
    else:  # the real model, with the clean run's attention patterns if "attention"
        none = [None] * len(model.h)
        frozen = Frozen(clean.frozen.attn if freeze == "attention" else none, none, none)
        logits, acts = forward_with_mlp_change(model, idx, delta, frozen)
    return Intervened(clean_logits[0], logits[0], clean, acts, old, new)


def intervention_delta(clt, mlp_in, interventions, layers=None):
    """The interventions' change of the MLP outputs, from the clean run's mlp_in (T, L, d) ->
    (delta (T, L, d), old activations (n,), new activations (n,))."""
    T, L, _ = mlp_in.shape
    feats, (start, end) = graphcli.check_interventions(interventions, T, clt.config, layers)
    feats = feats.to(mlp_in.device)
    l, p, f = feats.T
    a = clt.encode(mlp_in[p])  # (n, L, F): only the changed features' positions (per token)
    old = a[torch.arange(len(feats), device=a.device), l, f]  # (n,)
    new = [iv.new_activation(x) for iv, x in zip(interventions, old)]
    new = torch.stack(new) if new else old
    delta = reconstruct(clt, feats, new - old, T, bias=False)  # (T, L, d)
    delta[:, :start] = 0
    delta[:, end:] = 0
    return delta, old, new


def forward_with_mlp_change(model, idx, delta, frozen=None):
    """Run idx (1, T) with delta[:, l] (T, L, d) added to each MLP's own output (frozen: attention
    patterns to reuse) -> (logits, Acts)."""
    adds = [partial(add_to_output, delta[:, l]) for l in range(len(model.h))]
    handles = [block.mlp.register_forward_hook(hook) for block, hook in zip(model.h, adds)]
    try:
        return model.run_with_acts(idx, frozen=frozen)
    finally:
        for h in handles:
            h.remove()


def add_to_output(change, module, inputs, out):
    """A forward hook: the module's output plus change."""
    return out + change


@torch.no_grad()
def generate(
    model: GPT,
    clt: CrossLayerTranscoder,
    idx: torch.Tensor,
    interventions: list,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    every_token: bool = False,
    freeze: str = "none",
    layers: Optional[tuple] = None,
) -> tuple:
    """Continue the prompt idx (1, T) twice, plainly and under the interventions (intervene's
    logits on the sequence so far) -> (clean ids, intervened ids), (1, T + N) each. every_token:
    those at the prompt's last position act at each new one too. Sampling draws both alike."""
    T = idx.size(1)
    if T + max_new_tokens > model.config.n_ctx:
        n = f"the prompt ({T} tokens) + --max-new-tokens {max_new_tokens}"
        fix = "generate fewer tokens or shorten the prompt"
        raise ValueError(f"{n} exceed the model's n_ctx={model.config.n_ctx}: {fix}")
    feats, _ = graphcli.check_interventions(interventions, T, clt.config)
    fixed = [replace(iv, pos=p) for iv, p in zip(interventions, feats[:, 1].tolist())]
    repeated = [iv for iv in fixed if iv.pos == T - 1] if every_token else []
    generators = [torch.Generator(device=idx.device).manual_seed(seed) for _ in range(2)]
    clean, steered = idx, idx
    for _ in range(max_new_tokens):
        here = fixed + [replace(iv, pos=p) for iv in repeated for p in range(T, steered.size(1))]
        logits = model(clean)[0, -1]  # (V,)
        new = intervene(model, clt, steered, here, freeze, layers)[1][-1]  # (V,)
        clean = torch.cat([clean, pick(logits, temperature, top_k, generators[0])[None]], 1)
        steered = torch.cat([steered, pick(new, temperature, top_k, generators[1])[None]], 1)
    return clean, steered


def pick(logits, temperature, top_k, generator):
    """The next token (1,) from logits (V,): the most likely at temperature 0, else sampled from
    softmax(logits / temperature) over the top_k tokens (0: all of them)."""
    if temperature <= 0:
        return logits.argmax()[None]
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, len(logits))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    configs = {"intervene": graphcli.InterveneConfig, "generate": graphcli.GenerateConfig}
    command, cfg = cli.parse_config(__doc__, configs, argv)
    print(asdict(cfg))
    model, clt, enc = graphcli.load(cfg, cfg.device, load_model, load_transcoder)
    idx = graphcli.encode_prompt(enc, cfg.prompt, model.config.n_ctx).to(cfg.device)
    ivs = graphcli.parse_interventions(cfg.intervene, Intervention, command == "intervene")
    layers = graphcli.parse_layers(cfg.layers, clt.config.n_layers)
    if command == "intervene":
        out = run_intervened(model, clt, idx, ivs, cfg.freeze, layers)
        graphcli.print_intervention(enc, idx, ivs, out, cfg)
        return
    how = (cfg.temperature, cfg.top_k, cfg.seed, cfg.every_token, cfg.freeze, layers)
    t0 = time.perf_counter()
    clean, steered = generate(model, clt, idx, ivs, cfg.max_new_tokens, *how)
    graphcli.print_generation(enc, cfg, idx.size(1), clean, steered, time.perf_counter() - t0)


if __name__ == "__main__":
    cli.run_main(main)
