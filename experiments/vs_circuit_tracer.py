"""
experiments/vs_circuit_tracer.py: graph.py beside circuit-tracer's attribute() (pip install
circuit-tracer==0.5.0), on the same hub-layout model, CLT and prompt, both in float32 on the same
threads, each point in a fresh process (a peak memory of its own): wall and CPU time, peak memory
above the setup's, the edges compared node by node and both libraries' scores. circuit-tracer runs
once per batch size of the point; its fastest run is the one compared.

    python experiments/vs_circuit_tracer.py --threads 1
    python experiments/vs_circuit_tracer.py --quick --threads 1    # smaller prompts, fewer features
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from experiments.common import (
    Bench,
    clt_with_n_active,
    fresh_process,
    hf_random_model_dir,
    peak_bytes,
    peak_reset,
    run_study,
    set_threads,
    sync,
)
from forge.cli import arg, run_main
from forge.formats import save_circuit_tracer
from forge.hub import DEFAULT_MODEL, ENDOFTEXT, load_tokenizer
from model import GPT


@dataclass
class CircuitTracerBench(Bench):
    """graph.py beside circuit-tracer's attribute(): same model, CLT, prompt and process"""

    vs_points: str = arg(
        "tiny:64:3471:16/32/64/256,gpt2-small:32:18600:32",
        "MODEL:TOKENS:ACTIVE:CT_BATCHES,... (MODEL: tiny or gpt2-small, random); the fastest CT "
        "batch counts",
    )
    graph_batch: int = arg(256, "targets per pass of graph.py's transposed model")
    graph_n_features: int = arg(4096, "features per layer of the random CLTs")


def run(cfg):
    """A row per point, each in a fresh process."""
    results = []
    for point in cfg.vs_points.split(","):
        name, T, n_active, ct_batches = point.split(":")
        T = int(T)
        n_active = int(n_active)
        if cfg.quick:
            T = max(8, T // 4)
            n_active = max(100, n_active // 16)
        batches = [int(b) for b in ct_batches.split("/")]
        results.append(fresh_process(point_row, name, T, n_active, batches, cfg))
        print(results[-1])
    return results


def circuit_tracer_model(model_dir, model, transcoder, device="cpu"):
    """circuit-tracer's ReplacementModel (TransformerLens backend, offline) of the hub-layout GPT-2
    in model_dir (held as `model`) and `transcoder` (a CLT or a PLT), in float32: exported by
    save_circuit_tracer (ln_2's affine map folded in: TransformerLens's ln2.hook_normalized is taken
    before it) and read back by circuit-tracer's own loader of that layout (whose default dtype is
    bfloat16, hence float32)."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from transformers import GPT2TokenizerFast

    llama = getattr(model.config, "model_type", "gpt2") != "gpt2"
    cfg, state = (transformer_lens_llama if llama else transformer_lens_gpt2)(model_dir, device)
    with tempfile.TemporaryDirectory() as tmp:
        save_circuit_tracer(transcoder, os.path.join(tmp, "transcoder"), model)
        theirs, _ = load_transcoders_from_cache(
            "transcoder",
            cache_dir=tmp,
            device=torch.device(device),
            dtype=torch.float32,
            lazy_decoder=False,
        )
    ct = TransformerLensReplacementModel.from_config(cfg, theirs)
    ct.tokenizer = GPT2TokenizerFast(
        vocab_file=os.path.join(model_dir, "vocab.json"),
        merges_file=os.path.join(model_dir, "merges.txt"),
    )
    # the replacement model wraps each MLP and the unembedding: their weights sit one module deeper
    wrapped = {}
    for k, v in state.items():
        wrapped[k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed.")] = v
    missing, unexpected = ct.load_state_dict(wrapped, strict=False)
    ignored = ("IGNORE", "mask", "b_U", "rotary_sin", "rotary_cos")  # TL computes the last two
    missing = [k for k in missing if not k.startswith("transcoders.") and not k.endswith(ignored)]
    if missing or unexpected:
        raise ValueError(
            f"circuit-tracer's model did not take the weights: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return ct.eval()


def transformer_lens_gpt2(model_dir, device):
    """TransformerLens's config and state dict of the hub-layout GPT-2 in model_dir, in float32."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd,
        act_fn="gelu_new",
        d_vocab=c.vocab_size,
        eps=c.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        model_name="gpt2",
        device=device,
        dtype=torch.float32,
        default_prepend_bos=False,
    )
    return cfg, convert_gpt2_weights(hf, cfg)


def transformer_lens_llama(model_dir, device):
    """TransformerLens's config and state dict of the hub-layout Llama or Qwen3 in model_dir
    (float32), as its loading_from_pretrained sets up Llama-3.2-1B and Qwen3: RMS norms, rotary
    (not adjacent pairs), GQA, gated SiLU MLP, Llama 3's "NTK-by-parts" frequency scaling, Qwen3's
    q/k norms."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import (
        convert_llama_weights,
        convert_qwen3_weights,
    )
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    c = hf.config
    qwen3 = c.model_type == "qwen3"
    rope = c.rope_scaling or {}
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_ctx=c.max_position_embeddings,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_head=c.head_dim,
        d_mlp=c.intermediate_size,
        act_fn="silu",
        d_vocab=c.vocab_size,
        eps=c.rms_norm_eps,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=c.head_dim,
        rotary_adjacent_pairs=False,
        rotary_base=c.rope_theta,
        use_NTK_by_parts_rope=bool(rope),
        NTK_by_parts_factor=rope.get("factor", 1.0),
        NTK_by_parts_low_freq_factor=rope.get("low_freq_factor", 1.0),
        NTK_by_parts_high_freq_factor=rope.get("high_freq_factor", 4.0),
        NTK_original_ctx_len=rope.get("original_max_position_embeddings", 8192),
        use_qk_norm=qwen3,
        original_architecture=c.architectures[0],
        model_name=c.model_type,
        device=device,
        dtype=torch.float32,
        default_prepend_bos=False,
    )
    return cfg, (convert_qwen3_weights if qwen3 else convert_llama_weights)(hf, cfg)


def edge_blocks(graph):
    """{edge type: (rows, columns)} of the targets' rows, in the node order both libraries share."""
    s = graph.slices()
    return {
        "feature->feature": (s.features, s.features),
        "error->feature": (s.features, s.errors),
        "token->feature": (s.features, s.tokens),
        "feature->logit": (s.logits, s.features),
        "error->logit": (s.logits, s.errors),
        "token->logit": (s.logits, s.tokens),
    }


def timed_peak(fn, device):
    """fn() -> (its result, wall seconds, CPU seconds, peak bytes above the start). CPU seconds:
    what a run costs on a machine shared with other jobs."""
    base = peak_reset(device)
    t0 = time.perf_counter()
    c0 = time.process_time()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0, time.process_time() - c0, peak_bytes(device, base)


def point_setup(name, T, n_active, cfg):
    """The model (models/tiny, or a random GPT-2 small made by transformers), a random prompt of T
    tokens the tokenizer knows (BOS first) and a random CLT firing on n_active of its features."""
    model_dir = DEFAULT_MODEL
    if name != "tiny":
        model_dir = os.path.join(cfg.out, "gpt2-small-random")
        if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
            hf_random_model_dir(model_dir)
    model = GPT.from_pretrained(model_dir).to(cfg.device)
    bos = load_tokenizer(model_dir).encode_single_token(ENDOFTEXT)
    torch.manual_seed(0)
    idx = torch.randint(0, bos, (1, T), device=cfg.device)
    idx[0, 0] = bos
    t = clt_with_n_active(model, idx, cfg.graph_n_features, n_active)
    return model_dir, model, idx, t


def point_row(name, T, n_active, ct_batches, cfg):
    """graph.py and circuit-tracer's attribute() on one model, CLT and prompt, one after the other
    in this process. circuit-tracer runs once per batch size in ct_batches: each of its hooks
    gathers batch x active features x d numbers, so its best batch on a CPU is small."""
    import graph
    from circuit_tracer import attribute as ct_attribute
    from circuit_tracer.graph import compute_graph_scores

    set_threads(cfg.threads)
    model_dir, model, idx, t = point_setup(name, T, n_active, cfg)
    ct = circuit_tracer_model(model_dir, model, t, cfg.device)

    def ours_graph():
        return graph.attribute(
            model, t, graph.local_replacement(model, t, idx), batch_size=cfg.graph_batch
        )

    ours, ours_s, ours_cpu, ours_peak = timed_peak(ours_graph, cfg.device)
    ct_runs = {}  # batch -> (seconds, CPU seconds, peak bytes)
    for batch in ct_batches:
        run_ct = partial(ct_attribute, idx[0], ct, batch_size=batch)
        theirs, seconds, cpu, peak = timed_peak(run_ct, cfg.device)
        ct_runs[batch] = (seconds, cpu, peak)
    ct_batch = min(ct_runs, key=lambda b: ct_runs[b][0])
    ct_s, ct_cpu, ct_peak = ct_runs[ct_batch]
    same_feats = torch.equal(theirs.active_features.to(cfg.device), ours.feats)
    if not same_feats or not torch.equal(theirs.logit_token_ids.to(cfg.device), ours.logit_ids):
        raise RuntimeError(
            "circuit-tracer found other active features or logit nodes: the models differ"
        )
    A = ours.adjacency
    R = theirs.adjacency_matrix.to(cfg.device)
    worst = max(
        (A[r, c] - R[r, c]).abs().max().item() / R[r, c].abs().max().clamp(min=1e-30).item()
        for r, c in edge_blocks(ours).values()
    )
    ours_scores = graph.scores(ours)
    ct_scores = compute_graph_scores(theirs)
    return dict(
        model=name,
        tokens=T,
        n_active=len(ours.feats),
        nodes=len(A),
        ours_s=ours_s,
        ct_s=ct_s,
        ratio=ct_s / ours_s,
        ours_cpu_s=ours_cpu,
        ct_cpu_s=ct_cpu,
        cpu_ratio=ct_cpu / ours_cpu,
        ours_peak_MB=ours_peak / 2**20,
        ct_peak_MB=ct_peak / 2**20,
        ours_batch=cfg.graph_batch,
        ct_batch=ct_batch,
        max_rel_edge_diff=worst,
        replacement=f"{ours_scores[0]:.4f} / {ct_scores[0]:.4f}",
        completeness=f"{ours_scores[1]:.4f} / {ct_scores[1]:.4f}",
        ct_s_by_batch=", ".join(f"{b}: {t:.3g}" for b, (t, _, _) in ct_runs.items()),
    )


def main(argv=None):
    return run_study(__doc__, "vs_circuit_tracer", run, CircuitTracerBench, argv)


if __name__ == "__main__":
    run_main(main)
