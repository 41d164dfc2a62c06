"""
experiments/check_published.py: a published transcoder, measured here next to what its publisher
reports. It downloads the transcoder and its model (hub ids, forge/hub.py; directories work too),
then measures on --contexts contexts of --corpus: FVU and L0 per layer and the loss recovered with
every MLP spliced out for the transcoder (train.evaluate, as training reports them), and the
replacement and completeness scores of the attribution graph of each of --prompts (graph.scores).

    python experiments/check_published.py EleutherAI/gpt2-clt-noskip-ef128-k16 --model gpt2
    python experiments/check_published.py runs/clt --model models/tiny --corpus toy   # offline

Each row: the figure, ours, the publisher's (PUBLISHED: what a card states) and the range
expected of a GPT-2 CLT (EXPECTED). A figure far from both means a reading to doubt before a result:
a sparsify-layout transcoder read at the wrong side of ln_2 (its files cannot say which: forge/
sparsify.py's input_hook guesses from the name) shows here as an FVU near or above 1; load_transcoder's
pre_ln_hook, or "pre_ln_hook" in its cfg.json, sets it.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from experiments.common import Bench, run_study
from forge import corpora
from forge.cli import arg, run_main
from forge.graphcli import encode_prompt
from forge.hub import load_tokenizer

# what publishers state on their cards, by hub id: none is recorded yet (no hub access here); add
# {"fvu": ..., "l0": ..., "recovered": ..., "replacement": ..., "completeness": ...} with the card
PUBLISHED = {}
# a GPT-2 CLT that works, from CLT-Forge (Draye et al. 2026, arXiv 2603.21014) as it was quoted to
# us: explained variance ~0.8 (FVU ~0.2), replacement ~0.8, completeness ~0.95; not rechecked here
EXPECTED = {"fvu": "~0.2", "replacement": "~0.8", "completeness": "~0.95"}
PROMPTS = "The capital of France is|When Mary and John went to the store, John gave a drink to"


@dataclass
class CheckBench(Bench):
    """a published transcoder's FVU, L0, loss recovered and graph scores, next to its card's"""

    transcoder: list = arg([], "the transcoder: a hub id owner/name[/subfolder][@rev] or a dir")
    model: str = arg("gpt2", "the model it was trained on: a hub id or a hub-layout directory")
    corpus: str = arg("hf:NeelNanda/pile-10k", "text to measure on (cache.py's --corpus forms)")
    contexts: int = arg(64, "contexts measured (FVU, L0, loss recovered)")
    ctx: int = arg(128, "tokens per context, BOS first")
    prompts: str = arg(PROMPTS, "|-separated prompts to attribute")
    max_features: int = arg(4096, "feature nodes per graph (graph.py's --max-features)")


def run(cfg):
    import graph
    import train
    from cache import iter_contexts
    from clt import load_transcoder
    from model import load_model

    if len(cfg.transcoder) != 1:
        raise ValueError(f"give one transcoder (a hub id or a directory), got {cfg.transcoder}")
    model = load_model(cfg.model).to(cfg.device).eval()
    clt = load_transcoder(cfg.transcoder[0], model).to(cfg.device)
    enc = load_tokenizer(cfg.model)
    print(f"phase 1: FVU, L0 and loss recovered on {cfg.contexts} contexts of {cfg.corpus}")
    docs = corpora.iter_documents(cfg.corpus)
    rows = [torch.from_numpy(t) for t, _ in iter_contexts(docs, enc, cfg.ctx)][: cfg.contexts]
    if len(rows) < cfg.contexts:
        raise ValueError(
            f"{cfg.corpus} holds {len(rows)} contexts of {cfg.ctx}, not {cfg.contexts}"
        )
    with torch.no_grad():
        m = train.evaluate(model, clt, torch.stack(rows).long().to(cfg.device))
    ours = dict(fvu=sum(m["fvu"]) / len(m["fvu"]), l0=sum(m["l0"]), recovered=m["recovered"])
    print(f"per layer: FVU {[round(x, 3) for x in m['fvu']]}, L0 {[round(x) for x in m['l0']]}")
    print(f"phase 2: graphs of {len(cfg.prompts.split('|'))} prompts")
    for i, prompt in enumerate(cfg.prompts.split("|")):
        idx = encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
        g = graph.attribute(
            model, clt, graph.local_replacement(model, clt, idx), prompt, cfg.max_features
        )
        ours[f"replacement {i}"], ours[f"completeness {i}"] = graph.scores(g)
    card = PUBLISHED.get(cfg.transcoder[0], {})
    return [
        dict(figure=k, ours=float(v), publisher=card.get(k, "-"), expected=expect(k, clt, cfg))
        for k, v in ours.items()
    ]


def expect(figure, clt, cfg):
    """EXPECTED's range for `figure` when the transcoder is a CLT of GPT-2, else '-'."""
    gpt2 = os.path.basename(os.path.normpath(cfg.model)) == "gpt2"
    cross = clt.config.decoder == "cross-layer"
    return EXPECTED.get(figure.split()[0], "-") if gpt2 and cross else "-"


def main(argv=None):
    return run_study(__doc__, "check_published", run, CheckBench, argv)


if __name__ == "__main__":
    run_main(main)
