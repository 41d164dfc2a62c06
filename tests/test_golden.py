"""Old runs still load: small artifacts made by an earlier commit's scripts (tests/golden/README.md says
which commit and the commands), read with today's loaders and compared with the numbers that commit's
code read from them (EXPECTED). A refactor that changes a file format, a loader's name or what a
loader computes fails here.

EXPECTED was recorded by this module's observe_* functions run with the old commit's code first on the
path (PYTHONPATH=<old checkout> python tests/test_golden.py prints them, with the import lines of
that commit: GPT was clt.GPT). Do not re-record it with new
code: that would only compare the new code with itself. Every test works on tmp_path copies and never
writes into tests/golden.
"""

import json
import os
import shutil
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

import cache as K
import clt as C
import train as T
import viz as V
from forge import graphfile, shards
from model import GPT

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
# the embedded model the artifacts were made of
MODEL = os.path.join(os.path.dirname(HERE), "models", "tiny")


# conftest.py's one thread: faster on a shared CPU, and it keeps the float sums reproducible
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt():
    return GPT.from_pretrained(MODEL)


def copy_golden(tmp, *names):
    """tests/golden/NAME -> tmp/NAME for each name; returns the copies' paths."""
    out = []
    for name in names:
        shutil.copytree(os.path.join(GOLDEN, name), os.path.join(tmp, name))
        out.append(os.path.join(tmp, name))
    return out


def check(found, expected, rel=1e-5, abs_=1e-5, where=""):
    """found == expected: floats (also in lists and dicts) to rel/abs, anything else exactly."""
    if isinstance(expected, dict):
        assert isinstance(found, dict), f"{where}: {found!r} is not a dict"
        assert sorted(found) == sorted(expected), f"{where}: keys {sorted(found)}"
        for k in expected:
            check(found[k], expected[k], rel, abs_, f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(found) == len(expected), f"{where}: {found} != {expected}"
        for i, (f, e) in enumerate(zip(found, expected)):
            check(f, e, rel, abs_, f"{where}[{i}]")
    elif isinstance(expected, float):
        approx = pytest.approx(expected, rel=rel, abs=abs_)
        assert found == approx, f"{where}: {found} != {expected}"
    else:
        assert type(found) is type(expected), f"{where}: {found!r} != {expected!r}"
        assert found == expected, f"{where}: {found!r} != {expected!r}"


# -----------------------------------------------------------------------------
# what each test reads from an artifact (the same functions recorded EXPECTED under the old code)


def probe(config, batch=3):
    """A fixed mlp_in (batch, L, d), about the size of the tiny model's (entries in [-1.2, 1.2])."""
    n = batch * config.n_layers * config.d_model
    x = torch.sin(torch.arange(n, dtype=torch.float64) * 0.7) * 1.2
    return x.view(batch, config.n_layers, config.d_model).float()


def observe_cache(path, model):
    c = K.ActivationCache(path, model=model)  # model=: refuses a cache of another model
    mlp_in, mlp_out, tokens, docs, pos = c.read(0, c.n_tokens)
    lo, hi = c.split_range("heldout")
    heldout = list(c.iter_chunks(2, split="heldout"))
    held_in = torch.cat([ch[0] for ch in heldout])
    batches = list(c.batches(64, seed=0, epochs=1))
    return dict(
        problems=shards.verify(path),
        n_tokens=c.n_tokens,
        dtype=c.dtype,
        shape=[c.n_layers, c.d_model],
        n_shards=len(c.manifest["shards"]),
        heldout=[int(lo), int(hi)],
        heldout_same_as_read=bool(torch.equal(held_in, mlp_in[lo:hi])),
        in_sum=float(mlp_in.double().sum()),
        in_abs=float(mlp_in.double().abs().sum()),
        out_sum=float(mlp_out.double().sum()),
        out_abs=float(mlp_out.double().abs().sum()),
        in_first=mlp_in[0, 0, :4].tolist(),
        out_last=mlp_out[-1, -1, -4:].tolist(),
        tokens_head=tokens[:10].tolist(),
        tokens_sum=int(tokens.sum()),
        docs_sum=int(docs.sum()),
        pos_sum=int(pos.sum()),
        norm_in=c.norm_in.tolist(),
        batch_heads=[b.ids[:6].tolist() for b in batches],
        batch_sums=[int(b.ids.sum()) for b in batches],
    )


@torch.no_grad()
def observe_transcoder(t):
    c = t.config
    x = probe(c)
    acts, recon = t(x)
    config = [c.n_layers, c.d_model, c.n_features, c.activation, c.decoder, c.skip, c.model_sha256]
    return dict(
        config=config,
        l0=int((acts > 0).sum()),
        acts_sum=float(acts.double().sum()),
        acts_max=float(acts.max()),
        recon_sum=float(recon.double().sum()),
        recon_abs=float(recon.double().abs().sum()),
        recon_first=recon[0, 0, :4].tolist(),
        recon_last=recon[-1, -1, -4:].tolist(),
        decoder_norms=float(t.decoder_norms().double().sum()),
    )


def observe_graph(path):
    g = V.load_graph(path)
    info = g["metadata"]["info"]
    return dict(
        n_nodes=len(g["nodes"]),
        n_links=len(g["links"]),
        node_ids=sorted(n["node_id"] for n in g["nodes"]),
        types=sorted(n["feature_type"] for n in g["nodes"]),
        prompt=g["metadata"]["prompt"],
        prompt_tokens=g["metadata"]["prompt_tokens"],
        targets=info["targets"],
        scores=[info["replacement_score"], info["completeness_score"]],
        link_weights=float(sum(l["weight"] for l in g["links"])),
        link_abs=float(sum(abs(l["weight"]) for l in g["links"])),
    )


def observe_interp(path):
    with open(os.path.join(path, "features.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    explanations = graphfile.load_explanations(path)
    live = [r for r in rows if r["n_fires"] > 0]
    return dict(
        n_features=len(rows),
        n_live=len(live),
        n_fires=sum(r["n_fires"] for r in rows),
        n_explanations=len(explanations),
        first_live=[live[0]["layer"], live[0]["feature"]],
        first_explanation=explanations[live[0]["layer"], live[0]["feature"]],
        per_layer=summary["per_layer"],
        headline=summary["concepts"]["share_recovered"],
    )


def observe_resume(run, cache_dir):
    """Continue the golden run from its step-20 checkpoint for 2 more steps (in place: pass a copy)."""
    T.main(["--resume", "--out", run, "--cache", cache_dir, "--steps", "22", "--device", "cpu"])
    with open(os.path.join(run, "checkpoints", "latest.json")) as f:
        step = json.load(f)["step"]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return dict(
        step=step,
        steps=[r["step"] for r in rows],
        loss=[r["loss"] for r in rows[-2:]],
        fvu=rows[-1]["fvu"],
        export=observe_transcoder(C.CrossLayerTranscoder.from_pretrained(run)),
    )


# -----------------------------------------------------------------------------
# numbers the old code read from tests/golden (see the module docstring)

MODEL_SHA = "09996dbcc56a731510792316b7d85acf9f07cad3fe4bf928c12699f2eaa062b1"
# fmt: off
EXPECTED = {'cache': {'problems': [],
                      'n_tokens': 320,
                      'dtype': 'int8',
                      'shape': [4, 128],
                      'n_shards': 3,
                      'heldout': [315, 320],
                      'heldout_same_as_read': True,
                      'in_sum': -609.7753150300123,
                      'in_abs': 134219.56286747707,
                      'out_sum': 2538.8014639986213,
                      'out_abs': 463521.378956069,
                      'in_first': [-0.29935362935066223, 0.7894952297210693, 0.49464699625968933, -0.04211367294192314],
                      'out_last': [0.5573984980583191, -0.11204580962657928, -1.246552586555481, -0.6694869995117188],
                      'tokens_head': [20, 643, 1309, 25, 263, 484, 406, 260, 1309, 13],
                      'tokens_sum': 179985,
                      'docs_sum': 2256,
                      'pos_sum': 10095,
                      'norm_in': [9.832656860351562, 11.18699836730957, 12.908285140991211, 15.63471508026123],
                      'batch_heads': [[0, 5, 10, 17, 18, 31],
                                      [6, 8, 13, 25, 26, 42],
                                      [4, 9, 14, 15, 16, 28],
                                      [1, 2, 11, 12, 19, 20]],
                      'batch_sums': [9982, 10404, 10087, 9450]},
            'clt': {'config': [4,
                               128,
                               16,
                               'jumprelu',
                               'cross-layer',
                               False,
                               '09996dbcc56a731510792316b7d85acf9f07cad3fe4bf928c12699f2eaa062b1'],
                    'l0': 102,
                    'acts_sum': 106.51475882530212,
                    'acts_max': 5.059245586395264,
                    'recon_sum': 18.648142614867538,
                    'recon_abs': 1421.9863266139291,
                    'recon_first': [-1.0452837944030762, -0.3623374402523041, 1.1637909412384033, 1.2990009784698486],
                    'recon_last': [-5.5315327644348145, 1.1388144493103027, 1.6751124858856201, 2.1467204093933105],
                    'decoder_norms': 188.57684183120728},
            'circuit_tracer': {'config': [4,
                                          128,
                                          16,
                                          'jumprelu',
                                          'cross-layer',
                                          False,
                                          '09996dbcc56a731510792316b7d85acf9f07cad3fe4bf928c12699f2eaa062b1'],
                               'l0': 102,
                               'acts_sum': 106.51476033776999,
                               'acts_max': 5.05924654006958,
                               'recon_sum': 18.648143736179918,
                               'recon_abs': 1421.9863520166837,
                               'recon_first': [-1.0452836751937866, -0.3623373508453369, 1.1637910604476929, 1.2990012168884277],
                               'recon_last': [-5.5315327644348145, 1.1388145685195923, 1.6751124858856201, 2.1467204093933105],
                               'decoder_norms': 188.57684183120728},
            'graph': {'n_nodes': 21,
                      'n_links': 17,
                      'node_ids': ['0_-1_10',
                                   '0_-1_5',
                                   '0_-1_6',
                                   '0_-1_9',
                                   '0_6_10',
                                   '1_-1_10',
                                   '2_-1_10',
                                   '2_7_10',
                                   '3_-1_10',
                                   '5_1391_10',
                                   'E_1163_4',
                                   'E_13_5',
                                   'E_1537_1',
                                   'E_1771_0',
                                   'E_260_10',
                                   'E_264_3',
                                   'E_280_6',
                                   'E_323_2',
                                   'E_385_7',
                                   'E_412_9',
                                   'E_936_8'],
                      'types': ['cross layer transcoder',
                                'cross layer transcoder',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'embedding',
                                'logit',
                                'mlp reconstruction error',
                                'mlp reconstruction error',
                                'mlp reconstruction error',
                                'mlp reconstruction error',
                                'mlp reconstruction error',
                                'mlp reconstruction error',
                                'mlp reconstruction error'],
                      'prompt': 'Batris lives in Fafes. The language Batris speaks is',
                      'prompt_tokens': ['<|endoftext|>',
                                        'Batris',
                                        ' lives',
                                        ' in',
                                        ' Fafes',
                                        '.',
                                        ' The',
                                        ' language',
                                        ' Batris',
                                        ' speaks',
                                        ' is'],
                      'targets': ['Output " Zefekic" (p=0.959)'],
                      'scores': [0.0975705236196518, 0.5840598344802856],
                      'link_weights': 16.355898678302765,
                      'link_abs': 35.338043093681335},
            'interp': {'n_features': 64,
                       'n_live': 64,
                       'n_fires': 9309,
                       'n_explanations': 64,
                       'first_live': [0, 0],
                       'first_explanation': 'fires on ".", " and", " a" (+4 more) | promotes " Besin", " Vazes"',
                       'per_layer': [{'layer': 0, 'features': 16, 'dead': 0, 'dense': 16, 'live': 16, 'interpretable': 0},
                                     {'layer': 1, 'features': 16, 'dead': 0, 'dense': 15, 'live': 16, 'interpretable': 0},
                                     {'layer': 2, 'features': 16, 'dead': 0, 'dense': 14, 'live': 16, 'interpretable': 0},
                                     {'layer': 3, 'features': 16, 'dead': 0, 'dense': 15, 'live': 16, 'interpretable': 0}],
                       'headline': 0.0},
            'resume': {'step': 22,
                       'steps': [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
                       'loss': [806.6356875635684, 923.1264652851969],
                       'fvu': [1.3266450933091423, 0.9911045812418097, 0.9820901331407318, 0.9699225698353049],
                       'export': {'config': [4,
                                             128,
                                             16,
                                             'jumprelu',
                                             'cross-layer',
                                             False,
                                             '09996dbcc56a731510792316b7d85acf9f07cad3fe4bf928c12699f2eaa062b1'],
                                  'l0': 103,
                                  'acts_sum': 106.62451285123825,
                                  'acts_max': 5.063657760620117,
                                  'recon_sum': 15.597424233332276,
                                  'recon_abs': 1433.345191737637,
                                  'recon_first': [-1.0844993591308594,
                                                  -0.36811119318008423,
                                                  1.1856348514556885,
                                                  1.3186125755310059],
                                  'recon_last': [-5.518954277038574, 1.1498056650161743, 1.724505066871643, 2.1177620887756348],
                                  'decoder_norms': 188.80976343154907}},
            'graph_features': 2}
# fmt: on

# -----------------------------------------------------------------------------
# the tests


def test_activation_cache_opens_verifies_and_reads_the_same_rows(gpt, tmp_path):
    (path,) = copy_golden(tmp_path, "cache")
    check(observe_cache(path, gpt), EXPECTED["cache"], rel=1e-6, where="cache")
    # the checks still bite on old files
    with open(os.path.join(path, "shard_00001.bin"), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert shards.verify(path) and "shard_00001.bin" in " ".join(shards.verify(path))


def test_clt_export_loads_and_computes_the_same(gpt):
    t = C.load_transcoder(os.path.join(GOLDEN, "run"), gpt)
    assert isinstance(t, C.CrossLayerTranscoder)
    check(observe_transcoder(t), EXPECTED["clt"], where="clt")
    assert C.CrossLayerTranscoder.from_pretrained(os.path.join(GOLDEN, "run")).config == t.config


def test_circuit_tracer_export_loads_and_matches_the_clt(gpt):
    # config.yaml: from_circuit_tracer
    ct = C.load_transcoder(os.path.join(GOLDEN, "circuit_tracer"), gpt)
    check(observe_transcoder(ct), EXPECTED["circuit_tracer"], where="circuit_tracer")
    native = C.load_transcoder(os.path.join(GOLDEN, "run"), gpt)
    with torch.no_grad():
        x = probe(ct.config)
        (a1, y1), (a2, y2) = ct(x), native(x)
    assert torch.equal(a1 > 0, a2 > 0)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)


def test_checkpoint_resumes_two_more_steps_from_a_moved_copy(tmp_path):
    # the checkpoint names runs/golden/cache: moved
    run, cache_dir = copy_golden(tmp_path, "run", "cache")
    with open(os.path.join(run, "checkpoints", "latest.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 20 and meta["train_config"]["features"] == 16
    assert meta["clt_config"]["model_sha256"] == MODEL_SHA
    assert [r["step"] for r in V.load_metrics(run)] == list(range(20))
    found = observe_resume(run, cache_dir)
    check(found, EXPECTED["resume"], rel=1e-4, abs_=1e-5, where="resume")
    with open(os.path.join(GOLDEN, "run", "checkpoints", "latest.json")) as f:
        assert json.load(f)["step"] == 20  # the golden run itself was not touched


def test_graph_json_loads_and_draws(tmp_path):
    path = os.path.join(GOLDEN, "graph", "graph.json")
    check(observe_graph(path), EXPECTED["graph"], where="graph")
    # the full adjacency and its node table agree with the pruned graph
    g = V.load_graph(path)
    tensors = load_file(os.path.join(GOLDEN, "graph", "adjacency.safetensors"))
    with open(os.path.join(GOLDEN, "graph", "nodes.json")) as f:
        table = json.load(f)["nodes"]
    n = len(table)
    assert tensors["adjacency"].shape == (n, n) and tensors["node_mask"].shape == (n,)
    kept = sorted(r["node_id"] for r in table if r["kept"])
    assert kept == sorted(nd["node_id"] for nd in g["nodes"])
    assert int(tensors["node_mask"].sum()) == len(g["nodes"])
    # viz.py graph draws it (the interp folder beside it, as demo.py lays them out)
    graph_dir, _ = copy_golden(tmp_path, "graph", "interp")
    V.main(["graph", os.path.join(graph_dir, "graph.json")])
    assert os.path.isfile(os.path.join(graph_dir, "graph.html"))
    assert os.path.isfile(os.path.join(graph_dir, "graph.dot"))
    features = sorted(os.listdir(os.path.join(graph_dir, "features")))
    assert len(features) == EXPECTED["graph_features"]
    if shutil.which("dot"):
        assert os.path.getsize(os.path.join(graph_dir, "graph.svg")) > 0
    files = {"adjacency.safetensors", "graph-metadata.json", "graph.json", "nodes.json"}
    assert set(os.listdir(os.path.join(GOLDEN, "graph"))) == files


def test_interp_output_loads_and_draws(tmp_path):
    check(observe_interp(os.path.join(GOLDEN, "interp")), EXPECTED["interp"], where="interp")
    (interp,) = copy_golden(tmp_path, "interp")
    V.main(["features", interp, "--workers", "1"])
    html = os.path.join(interp, "html")
    assert os.path.isfile(os.path.join(html, "index.html"))
    with open(os.path.join(interp, "features.jsonl")) as f:
        live = [(r["layer"], r["feature"]) for r in map(json.loads, f) if r["n_fires"] > 0]
    for layer, feature in live:
        page = os.path.join(html, V.feature_page_name(layer, feature))
        assert os.path.isfile(page), (layer, feature)
    assert not os.path.exists(os.path.join(GOLDEN, "interp", "html"))


# -----------------------------------------------------------------------------
# recording (with the OLD code on the path; see the module docstring)


def record():
    torch.set_num_threads(1)
    model = GPT.from_pretrained(MODEL)
    clt = C.load_transcoder(os.path.join(GOLDEN, "run"), model)
    circuit_tracer = C.load_transcoder(os.path.join(GOLDEN, "circuit_tracer"), model)
    out = dict(
        cache=observe_cache(os.path.join(GOLDEN, "cache"), model),
        clt=observe_transcoder(clt),
        circuit_tracer=observe_transcoder(circuit_tracer),
        graph=observe_graph(os.path.join(GOLDEN, "graph", "graph.json")),
        interp=observe_interp(os.path.join(GOLDEN, "interp")),
    )
    with tempfile.TemporaryDirectory() as tmp:
        run, cache_dir = copy_golden(tmp, "run", "cache")
        out["resume"] = observe_resume(run, cache_dir)
        graph_dir, _ = copy_golden(tmp, "graph", "interp")
        V.main(["graph", os.path.join(graph_dir, "graph.json")])
        out["graph_features"] = len(os.listdir(os.path.join(graph_dir, "features")))
    return out


if __name__ == "__main__":
    import contextlib
    import pprint

    with contextlib.redirect_stdout(sys.stderr):  # the scripts' own prints
        expected = record()
    print("recorded with", C.__file__, file=sys.stderr)
    pprint.pprint(expected, width=120, sort_dicts=False)
