"""The fault and bad-input catalogue: each row is a bad input or an environment fault a user meets,
run through a script's command line as `python X.py` runs it (forge/cli.py run_main), in this
process where it can be. A row names the words its one-line message must hold (exit status 1, no
traceback), and for a fault what must be intact afterwards. Rows that need a process of their own
(a file size limit, kill -9, a lock held by another process) are at the end."""

import errno
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import cache
import graph
import interp
import intervene
import train
import viz
from clt import CLTConfig, CrossLayerTranscoder
from conftest import cache_config, docs, write_hub_model
from forge import browser, cli, files, graphfile, interpfile, plots
from forge.hub import ENDOFTEXT
from model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, D, F = 2, 32, 8
SMALL = ["--ctx", "16", "--device", "cpu"]  # cache.py on the small model
INTERP = ["--chunk-size", "128", "--top-k", "5", "--n-sampled", "6", "--min-count", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every stage's output once, made by the scripts: model, cache, CLT, interp, graph, pages."""
    root = tmp_path_factory.mktemp("world")
    write_hub_model(root / "model", n_layer=L, n_embd=D)
    sha = GPT.from_pretrained(str(root / "model")).fingerprint()
    (root / "corpus.txt").write_text(ENDOFTEXT.join(docs(200)))
    cache.build_cache(cache_config(str(root / "model"), str(root / "corpus.txt"), root / "cache"))
    config = CLTConfig(n_layers=L, d_model=D, n_features=F, model=str(root / "model"))
    clt = CrossLayerTranscoder(CLTConfig(**{**vars(config), "model_sha256": sha}), seed=0)
    with torch.no_grad():
        clt.b_enc.fill_(0.0)  # features fire on a short prompt: the graph has feature nodes
    clt.save_pretrained(str(root / "clt"))
    interp.main(interp_argv(root, root / "interp"))
    graph.main(graph_argv(root, root / "graph"))
    return root


def interp_argv(root, out, clt=None):
    paths = ["--clt", str(clt or root / "clt"), "--cache", str(root / "cache"), "--out", str(out)]
    return paths + INTERP


def graph_argv(root, out, clt=None, interp_dir=None, prompt="the cat sat"):
    paths = ["--model", str(root / "model"), "--clt", str(clt or root / "clt")]
    paths += ["--interp", str(interp_dir or root / "interp"), "--out", str(out)]
    return paths + ["--prompt", prompt, "--device", "cpu"]


def run_argv(root, clt=None, spec="0/-1/0=2"):
    paths = ["--model", str(root / "model"), "--clt", str(clt or root / "clt")]
    return ["intervene"] + paths + ["--prompt", "the cat", "--device", "cpu", "--intervene", spec]


def train_argv(root, out, *more):
    small = ["--features", "8", "--steps", "2", "--batch-size", "16", "--eval-every", "-1"]
    return ["--cache", str(root / "cache"), "--out", str(out), "--device", "cpu", *small, *more]


def copy(root, name, tmp):
    """A copy of the world's folder `name` in tmp, to damage."""
    shutil.copytree(root / name, tmp / name)
    return tmp / name


def cut(path, keep):
    """Truncate the file to its first `keep` bytes (negative: drop that many from its end)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def poke(path, key, where, value):
    """Set one element of a tensor in a safetensors file (its export id kept)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors[key].view(-1)[where] = value
    save_file(tensors, path, metadata=meta)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | changes))


def same_bytes(before):
    """A check that the files {path: bytes} are still as they were."""

    def check():
        for path, data in before.items():
            assert path.read_bytes() == data, f"{path} changed"

    return check


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -----------------------------------------------------------------------------
# the table: @row(words...) over a function (world, tmp) -> (main, argv, *checks afterwards)

ROWS = []


def row(*words):
    def register(case):
        ROWS.append(pytest.param(case, words, id=case.__name__))
        return case

    return register


# damaged or foreign transcoder files (graph.py reads them; interp.py and intervene too)


@row("W_enc_0.safetensors", "damaged or cut short", "re-export")
def clt_encoder_cut_short(w, tmp):
    clt = copy(w, "clt", tmp)
    cut(clt / "W_enc_0.safetensors", 200)
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_dec_1.safetensors", "damaged or cut short")
def clt_decoder_garbage(w, tmp):
    clt = copy(w, "clt", tmp)
    (clt / "W_dec_1.safetensors").write_bytes(os.urandom(3000))
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_dec_0.safetensors", "damaged or cut short")
def clt_decoder_empty(w, tmp):
    clt = copy(w, "clt", tmp)
    (clt / "W_dec_0.safetensors").write_bytes(b"")
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_dec_1.safetensors", "missing", "train.py --resume")
def clt_decoder_missing(w, tmp):
    clt = copy(w, "clt", tmp)
    os.remove(clt / "W_dec_1.safetensors")
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("config.json", "cut short, not JSON", "re-export")
def clt_config_cut_short(w, tmp):
    clt = copy(w, "clt", tmp)
    cut(clt / "config.json", 40)
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("config.json", "not a JSON object")
def clt_config_a_list(w, tmp):
    clt = copy(w, "clt", tmp)
    (clt / "config.json").write_text("[1, 2]")
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_enc_0.safetensors", "has 8 features, its config.json says 9")
def clt_config_n_features_wrong(w, tmp):
    clt = copy(w, "clt", tmp)
    edit_json(clt / "config.json", n_features=F + 1)
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_enc_0.safetensors", "has 8 features, its config.json says 4")
def clt_config_n_features_smaller(w, tmp):
    clt = copy(w, "clt", tmp)
    edit_json(clt / "config.json", n_features=F // 2)
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("config.json", "does not know")
def clt_config_unknown_field(w, tmp):
    clt = copy(w, "clt", tmp)
    edit_json(clt / "config.json", colour="red")
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_dec_1", "tensor W_dec", "NaN or infinite", "retrain")
def clt_decoder_nan(w, tmp):
    clt = copy(w, "clt", tmp)
    poke(clt / "W_dec_1.safetensors", "W_dec_1", 5, float("nan"))
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("W_enc_0", "tensor b_enc", "NaN or infinite")
def clt_encoder_bias_inf(w, tmp):
    clt = copy(w, "clt", tmp)
    poke(clt / "W_enc_0.safetensors", "b_enc_0", 0, float("inf"))
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("tensor threshold", "NaN or infinite")
def clt_threshold_nan_in_interp(w, tmp):
    clt = copy(w, "clt", tmp)
    poke(clt / "W_enc_1.safetensors", "threshold_1", 3, float("nan"))
    return interp.main, interp_argv(w, tmp / "i", clt)


@row("tensor W_dec", "NaN or infinite")
def clt_decoder_nan_in_intervene(w, tmp):
    clt = copy(w, "clt", tmp)
    poke(clt / "W_dec_0.safetensors", "W_dec_0", 0, float("-inf"))
    return intervene.main, run_argv(w, clt)


@row("an export cut short", "no config.json", "train.py --resume --out")
def clt_half_exported(w, tmp):
    clt = copy(w, "clt", tmp)
    os.remove(clt / "config.json")
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("comes from another save", "train.py --resume")
def clt_files_of_two_exports(w, tmp):
    clt = copy(w, "clt", tmp)
    CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F)).save_pretrained(tmp / "o")
    shutil.copy(tmp / "o" / "W_dec_1.safetensors", clt / "W_dec_1.safetensors")
    return graph.main, graph_argv(w, tmp / "g", clt)


@row("no CLT at", "python train.py")
def clt_missing(w, tmp):
    return graph.main, graph_argv(w, tmp / "g", tmp / "nothing")


@row("no transcoder at", "not a directory")
def clt_is_a_file(w, tmp):
    (tmp / "clt.txt").write_text("hello")
    return graph.main, graph_argv(w, tmp / "g", tmp / "clt.txt")


@row("another model", "--model")
def clt_of_another_width(w, tmp):
    CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=16, n_features=F)).save_pretrained(tmp / "c")
    return graph.main, graph_argv(w, tmp / "g", tmp / "c")


@row("config.yaml", "not YAML")
def circuit_tracer_config_not_yaml(w, tmp):
    (tmp / "ct").mkdir()
    (tmp / "ct" / "config.yaml").write_text("model_kind: cross_layer_transcoder\n  - x: [")
    return graph.main, graph_argv(w, tmp / "g", tmp / "ct")


@row("cfg.json", "cut short, not JSON")
def saelens_config_cut_short(w, tmp):
    folder = tmp / "sae" / "blocks.0.ln2.hook_normalized"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text('{"architecture": "transcoder", "d_in": ')
    return graph.main, graph_argv(w, tmp / "g", tmp / "sae")


# paths: --out that cannot be a folder, missing inputs


@row("is a file, not a folder", "choose another --out")
def graph_out_is_a_file(w, tmp):
    (tmp / "g").write_text("mine")
    return graph.main, graph_argv(w, tmp / "g"), same_bytes({tmp / "g": b"mine"})


@row("is a file, not a folder")
def interp_out_is_a_file(w, tmp):
    (tmp / "i").write_text("mine")
    return interp.main, interp_argv(w, tmp / "i"), same_bytes({tmp / "i": b"mine"})


@row("is a file, not a folder")
def train_out_is_a_file(w, tmp):
    (tmp / "t").write_text("mine")
    return train.main, train_argv(w, tmp / "t"), same_bytes({tmp / "t": b"mine"})


@row("is a file, not a folder")
def cache_out_is_a_file(w, tmp):
    (tmp / "c").write_text("mine")
    argv = [
        "--corpus",
        str(w / "corpus.txt"),
        "--model",
        str(w / "model"),
        "--out",
        str(tmp / "c"),
        *SMALL,
    ]
    return cache.main, argv, same_bytes({tmp / "c": b"mine"})


@row("is a file, not a folder")
def viz_features_out_is_a_file(w, tmp):
    (tmp / "h").write_text("mine")
    return viz.main, ["features", str(w / "interp"), "--out", str(tmp / "h")]


@row("holds cache.py's output (manifest.json)", "interp.py writes a folder of its own")
def interp_into_the_cache_folder(w, tmp):
    out = copy(w, "cache", tmp)
    return interp.main, interp_argv(w, out), same_bytes(snapshot(out))


@row("holds interp.py's output (features.jsonl)", "choose another --out")
def graph_into_the_interp_folder(w, tmp):
    out = copy(w, "interp", tmp)
    return graph.main, graph_argv(w, out), same_bytes(snapshot(out))


@row("holds graph.py's output (graph-metadata.json)")
def interp_into_the_graph_folder(w, tmp):
    out = copy(w, "graph", tmp)
    return interp.main, interp_argv(w, out), same_bytes(snapshot(out))


@row("holds cache.py's output (manifest.json)", "train.py writes a folder of its own")
def train_into_the_cache_folder(w, tmp):
    out = copy(w, "cache", tmp)
    return train.main, train_argv(w, out), same_bytes(snapshot(out))


@row("holds interp.py's output (features.jsonl)", "cache.py writes a folder of its own")
def cache_into_the_interp_folder(w, tmp):
    out = copy(w, "interp", tmp)
    argv = ["--corpus", str(w / "corpus.txt"), "--model", str(w / "model"), "--out", str(out)]
    return cache.main, argv + SMALL, same_bytes(snapshot(out))


@row("holds interp.py's output (features.jsonl)", "viz.py features writes a folder of its own")
def viz_features_into_the_interp_folder(w, tmp):
    out = copy(w, "interp", tmp)
    return viz.main, ["features", str(out), "--out", str(out)], same_bytes(snapshot(out))


@row("graph.html", "not of one committed run", "graph since redone", "rerun `python viz.py graph")
def viz_graph_drawing_of_a_graph_since_replaced(w, tmp):
    out = copy(w, "graph", tmp)
    viz.main(["graph", str(out / "graph.json")])
    graph.main(graph_argv(w, out, prompt="the dog ran"))  # graph.json anew: the picture is stale
    return check_graph_files, [str(out), "graph"], graph_still_loads(out)


@row("a loop of symbolic links", "ELOOP", "fix the link")
def graph_out_through_a_symlink_loop(w, tmp):
    os.symlink(tmp / "b", tmp / "a")
    os.symlink(tmp / "a", tmp / "b")
    return graph.main, graph_argv(w, tmp / "a" / "g")


@row("a loop of symbolic links", "ELOOP")
def viz_out_through_a_symlink_loop(w, tmp):
    os.symlink(tmp / "loop", tmp / "loop")
    return viz.main, ["features", str(w / "interp"), "--out", str(tmp / "loop" / "h")]


@row("a part of the path is a file", "ENOTDIR")
def graph_out_below_a_file(w, tmp):
    (tmp / "f").write_text("mine")
    return graph.main, graph_argv(w, tmp / "f" / "g")


@row("permission denied", "EACCES")
def graph_out_not_writable(w, tmp):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (tmp / "ro").mkdir(mode=0o500)
    return graph.main, graph_argv(w, tmp / "ro" / "g")


@row("no graph file", "python graph.py")
def viz_graph_missing(w, tmp):
    return viz.main, ["graph", str(tmp / "graph.json")]


@row("features.jsonl", "interp.py --out")
def viz_features_of_a_missing_folder(w, tmp):
    return viz.main, ["features", str(tmp / "nowhere")]


@row("metrics.jsonl", "python train.py")
def viz_train_of_a_missing_run(w, tmp):
    return viz.main, ["train", str(tmp / "nowhere")]


# values: interventions, prompts, flags


@row("not finite", "give a finite number")
def intervention_set_to_inf(w, tmp):
    return intervene.main, run_argv(w, spec="0/-1/0=1e999")


@row("not finite")
def intervention_scaled_by_inf(w, tmp):
    return intervene.main, run_argv(w, spec="1/0/3*1e400")


@row("not finite")
def intervention_add_minus_inf(w, tmp):
    return intervene.main, run_argv(w, spec="1/0/3+-1e400")


@row("LAYER/POS/FEATURE")
def intervention_set_to_nan(w, tmp):
    return intervene.main, run_argv(w, spec="0/-1/0=nan")


@row("0 <= feature < 8")
def intervention_feature_out_of_range(w, tmp):
    return intervene.main, run_argv(w, spec="0/-1/99=1")


@row("the prompt is empty")
def prompt_empty(w, tmp):
    return graph.main, graph_argv(w, tmp / "g", prompt="  ")


@row("over the GPT's n_ctx", "shorten it")
def prompt_too_long(w, tmp):
    return graph.main, graph_argv(w, tmp / "g", prompt="the cat " * 40)


@row("thresholds must lie in [0, 1]")
def graph_threshold_out_of_range(w, tmp):
    return graph.main, graph_argv(w, tmp / "g") + ["--node-threshold", "2"]


@row("give one of --target")
def graph_two_targets(w, tmp):
    return graph.main, graph_argv(w, tmp / "g") + ["--target-diff", "a|b", "--target-tokens", "a"]


@row("no direction file")
def graph_direction_missing(w, tmp):
    return graph.main, graph_argv(w, tmp / "g") + ["--target-direction", str(tmp / "d.st")]


@row("d.safetensors", "damaged or cut short")
def graph_direction_damaged(w, tmp):
    save_file({"direction": torch.ones(D)}, tmp / "d.safetensors")
    cut(tmp / "d.safetensors", 60)
    return graph.main, graph_argv(w, tmp / "g") + ["--target-direction", str(tmp / "d.safetensors")]


# the other stages' bad input


@row("no activation cache at", "python cache.py build")
def train_cache_missing(w, tmp):
    return train.main, ["--cache", str(tmp / "nocache"), "--out", str(tmp / "t"), "--device", "cpu"]


@row("holds a run", "--resume", "--overwrite")
def train_into_another_run(w, tmp):
    (tmp / "t").mkdir()
    (tmp / "t" / "config.json").write_text("{}")
    return train.main, train_argv(w, tmp / "t")


@row("--resume")
def train_resume_with_nothing_to_resume(w, tmp):
    return train.main, train_argv(w, tmp / "t", "--resume")


@row("--resume continues the run, --overwrite replaces it")
def train_resume_and_overwrite(w, tmp):
    return train.main, train_argv(w, tmp / "t", "--resume", "--overwrite")


@row("c.txt")
def cache_corpus_missing(w, tmp):
    argv = [
        "--corpus",
        str(tmp / "c.txt"),
        "--model",
        str(w / "model"),
        "--out",
        str(tmp / "c"),
        *SMALL,
    ]
    return cache.main, argv + ["--device", "cpu"]


@row("c.jsonl line 2", "not valid JSON")
def cache_corpus_line_not_json(w, tmp):
    (tmp / "c.jsonl").write_text('{"text": "the cat"}\n{"text": "the d\n')
    argv = [
        "--corpus",
        str(tmp / "c.jsonl"),
        "--model",
        str(w / "model"),
        "--out",
        str(tmp / "c"),
        *SMALL,
    ]
    return cache.main, argv + ["--device", "cpu", "--tokens", "100", "--ctx", "16"]


@row("need tokens, batch_size > 0")
def cache_zero_tokens(w, tmp):
    argv = [
        "--corpus",
        str(w / "corpus.txt"),
        "--model",
        str(w / "model"),
        "--out",
        str(tmp / "c"),
        *SMALL,
    ]
    return cache.main, argv + ["--tokens", "0"]


@row("holds a cache made with other arguments", "--overwrite")
def cache_into_another_cache(w, tmp):
    out = copy(w, "cache", tmp)
    argv = [
        "--corpus",
        str(w / "corpus.txt"),
        "--model",
        str(w / "model"),
        "--out",
        str(out),
        *SMALL,
    ]
    return cache.main, argv + ["--tokens", "999", "--device", "cpu"], same_bytes(snapshot(out))


@row("exists, is not empty", "choose another --out")
def cache_into_a_folder_of_other_files(w, tmp):
    (tmp / "c").mkdir()
    (tmp / "c" / "notes.txt").write_text("mine")
    argv = [
        "--corpus",
        str(w / "corpus.txt"),
        "--model",
        str(w / "model"),
        "--out",
        str(tmp / "c"),
        *SMALL,
    ]
    return cache.main, argv + ["--device", "cpu"], same_bytes({tmp / "c" / "notes.txt": b"mine"})


@row("has no manifest.json", "cache.py")
def interp_cache_missing(w, tmp):
    argv = interp_argv(w, tmp / "i")
    argv[argv.index("--cache") + 1] = str(tmp / "nocache")
    return interp.main, argv


@row("no CLT at", "(no config.json)", "python train.py --out")
def interp_clt_missing(w, tmp):
    return interp.main, interp_argv(w, tmp / "i", tmp / "noclt")


@row("damaged or cut short", "W_dec_0.safetensors")
def interp_clt_cut_short(w, tmp):
    clt = copy(w, "clt", tmp)
    cut(clt / "W_dec_0.safetensors", -10)
    return interp.main, interp_argv(w, tmp / "i", clt)


@row("is not a node-link graph")
def viz_graph_not_a_graph(w, tmp):
    (tmp / "g.json").write_text('{"a": 1}')
    return viz.main, ["graph", str(tmp / "g.json")]


@row("takes one graph.json")
def viz_graph_two_inputs(w, tmp):
    return viz.main, ["graph", str(tmp / "a.json"), str(tmp / "b.json")]


@row("takes train.py run folders")
def viz_train_no_inputs(w, tmp):
    return viz.main, ["train"]


# every output folder is one unit; its readers check which run and which CLT made it


def killed(module, name, main, argv):
    """main(argv) with `module.name` raising KeyboardInterrupt: a kill -9 at that point, as far as
    the files are concerned (the kernel releases the lock either way)."""

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, dies)
        with pytest.raises(KeyboardInterrupt):
            main(argv)


@row("graph.json is from run", "commit.json lists run", "killed", "rerun `python graph.py")
def graph_killed_between_its_files(w, tmp):
    out = copy(w, "graph", tmp)
    killed(graphfile, "save_safetensors", graph.main, graph_argv(w, out, prompt="the dog ran"))
    return viz.main, ["graph", str(out / "graph.json")]


@row("features.jsonl is from run", "killed", "python interp.py --out")
def interp_killed_before_its_manifest_graph_reads_it(w, tmp):
    out = copy(w, "interp", tmp)
    killed(interpfile, "plot_summary", interp.main, interp_argv(w, out))
    return graph.main, graph_argv(w, tmp / "g", interp_dir=out)


@row("features.jsonl is from run", "killed")
def interp_killed_before_its_manifest_viz_reads_it(w, tmp):
    out = copy(w, "interp", tmp)
    killed(interpfile, "commit", interp.main, interp_argv(w, out))
    return viz.main, ["features", str(out)]


@row("explains the CLT", "not", "pass the interp output of")
def graph_interp_of_another_clt(w, tmp):
    CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F)).save_pretrained(tmp / "c")
    return graph.main, graph_argv(w, tmp / "g", clt=tmp / "c")


@row("explains the CLT", "(export 00000000)", "python interp.py --clt")
def viz_graph_interp_of_another_clt(w, tmp):
    out = copy(w, "graph", tmp)
    graph_json = json.loads((out / "graph.json").read_text())
    graph_json["metadata"]["info"]["clt_export_id"] = "0" * 32  # as graph.py records another CLT
    graph_json["metadata"].pop("run_id")  # (an edited file: its run id no longer applies)
    (out / "graph.json").write_text(json.dumps(graph_json))
    return viz.main, ["graph", str(out / "graph.json"), "--interp", str(w / "interp")]


@row("no interp output at --interp", '--interp ""')
def graph_interp_missing(w, tmp):
    return graph.main, graph_argv(w, tmp / "g", interp_dir=tmp / "nowhere")


@row("no interp output at --interp")
def viz_graph_interp_missing(w, tmp):
    return viz.main, ["graph", str(w / "graph" / "graph.json"), "--interp", str(tmp / "nowhere")]


@row("features.jsonl is cut short", "not whole", "python interp.py --out")
def graph_interp_cut_mid_line(w, tmp):
    out = copy(w, "interp", tmp)
    cut(out / "features.jsonl", -100)
    return graph.main, graph_argv(w, tmp / "g", interp_dir=out)


@row("features.jsonl line 3 is not JSON")
def graph_interp_damaged_line(w, tmp):
    out = copy(w, "interp", tmp)
    lines = (out / "features.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"  # a line cut inside the file
    (out / "features.jsonl").write_text("".join(lines))
    return graph.main, graph_argv(w, tmp / "g", interp_dir=out)


@row("features.jsonl is cut short")
def viz_features_cut_mid_line(w, tmp):
    out = copy(w, "interp", tmp)
    cut(out / "features.jsonl", -100)
    return viz.main, ["features", str(out)]


@row("graph.json is damaged or cut short", "rerun graph.py")
def viz_graph_json_cut_short(w, tmp):
    out = copy(w, "graph", tmp)
    cut(out / "graph.json", 500)
    return viz.main, ["graph", str(out / "graph.json")]


@row("commit.json is damaged or cut short")
def viz_graph_manifest_damaged(w, tmp):
    out = copy(w, "graph", tmp)
    (out / "commit.json").write_text("{")
    return viz.main, ["graph", str(out / "graph.json")]


@row("graph-metadata.json is damaged or cut short")
def graph_index_damaged(w, tmp):
    out = copy(w, "graph", tmp)
    cut(out / "graph-metadata.json", 30)
    return graph.main, graph_argv(w, out), functools.partial(no_tmp_files, out)


@row("summary.json is damaged or cut short")
def viz_features_summary_damaged(w, tmp):
    out = copy(w, "interp", tmp)
    cut(out / "summary.json", 30)
    return viz.main, ["features", str(out)]


@row("metrics.jsonl line 3 is not JSON", "cut short", "train.py --out")
def viz_train_metrics_cut_mid_line(w, tmp):
    (tmp / "run").mkdir()
    rows = [json.dumps(dict(step=i, loss=1.0)) for i in range(3)]
    (tmp / "run" / "metrics.jsonl").write_text("\n".join(rows)[:-5])
    return viz.main, ["train", str(tmp / "run")]


@row("the prompt is not valid UTF-8", "\\xff", "pass UTF-8 text")
def graph_prompt_not_utf8(w, tmp):
    prompt = b"the \xffcat".decode("utf-8", "surrogateescape")  # as Python hands argv over
    return graph.main, graph_argv(w, tmp / "g", prompt=prompt), lambda: not (tmp / "g").exists()


@row("the prompt is not valid UTF-8")
def intervene_prompt_not_utf8(w, tmp):
    argv = run_argv(w)
    argv[argv.index("--prompt") + 1] = b"caf\xe9".decode("utf-8", "surrogateescape")
    return intervene.main, argv


def check_pages(argv):
    """A reader of a folder of feature pages: refuses it unless it is one committed run's."""
    browser.check_pages(*argv)


def check_graph_files(argv):
    browser.check_graph_files(*argv)


def rerun_commits(main, argv, check, *args):
    """A check that a rerun into the folder removes the killed run's leftovers and commits it."""

    def rerun():
        main(argv)
        check([str(a) for a in args])
        no_tmp_files(pathlib.Path(args[0]))

    return rerun


@row("is not committed", "killed while writing it", "rerun `python viz.py features")
def viz_features_killed_while_writing(w, tmp):
    out = copy(w, "interp", tmp)
    viz.main(["features", str(out), "--workers", "1"])  # a committed browser, then a killed rerun
    again = ["features", str(out), "--workers", "1", "--max-examples", "1"]
    killed(browser, "index_page", viz.main, again)  # its pages written, index.html not
    stub = (out / "html" / "index.html").read_text()
    assert "Being written" in stub and "was killed halfway" in stub  # what a browser shows
    return (
        check_pages,
        [str(out / "html")],
        rerun_commits(viz.main, again, check_pages, out / "html"),
    )


@row("L0_F", "is not of run", "the one commit.json commits", "a folder of two runs")
def viz_features_folder_of_two_runs(w, tmp):
    viz.main(["features", str(w / "interp"), "--out", str(tmp / "a"), "--workers", "1"])
    other = ["--out", str(tmp / "b"), "--workers", "1", "--top-tokens", "2"]
    viz.main(["features", str(w / "interp"), *other])
    page = sorted((tmp / "b").glob("L0_F*.html"))[0]
    shutil.copy(page, tmp / "a" / page.name)  # one page of another run, the commit left as it was
    return check_pages, [str(tmp / "a")]


@row("graph.html", "not of one committed run", "killed while writing", "rerun `python viz.py graph")
def viz_graph_killed_while_drawing(w, tmp):
    out = copy(w, "graph", tmp)
    viz.main(["graph", str(out / "graph.json")])
    again = ["graph", str(out / "graph.json"), "--max-nodes", "3"]
    killed(plots, "write_graph_page", viz.main, again)  # its .dot, .svg, .png written, the page not
    rerun = rerun_commits(viz.main, again, check_graph_files, out, "graph")
    return check_graph_files, [str(out), "graph"], rerun, graph_still_loads(out)


def graph_still_loads(out):
    """A check that graph.py's files in the folder stay committed beside viz.py's."""
    return functools.partial(viz.load_graph, str(out / "graph.json"))


# one writer per folder: another process holds the folder's lock


def held(folder):
    """Hold `folder`'s lock from another process, as a running stage does -> its pid."""
    folder.mkdir(parents=True, exist_ok=True)
    code = "import fcntl, os, sys, time\nf = open(sys.argv[1], 'w')\n"
    code += "fcntl.flock(f, fcntl.LOCK_EX)\nf.write(f'train.py on host h, pid {os.getpid()}')\n"
    code += "f.flush()\nprint('held', flush=True)\ntime.sleep(60)"
    lock = folder / files.LOCK
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"held"
    HOLDERS.append(p)
    return p.pid


HOLDERS = []


@pytest.fixture(autouse=True)
def release_holders():
    yield
    while HOLDERS:
        p = HOLDERS.pop()
        p.kill()
        p.wait()


@row("is being written by train.py on host h, pid", "wait until it ends")
def graph_into_a_held_folder(w, tmp):
    before = snapshot(copy(w, "graph", tmp))
    held(tmp / "graph")
    return graph.main, graph_argv(w, tmp / "graph"), same_bytes(before)


@row("is being written by", "pid")
def interp_into_a_held_folder(w, tmp):
    held(tmp / "i")
    return interp.main, interp_argv(w, tmp / "i")


@row("is being written by", "pid")
def train_into_a_held_folder(w, tmp):
    held(tmp / "t")
    return train.main, train_argv(w, tmp / "t"), lambda: not (tmp / "t" / "metrics.jsonl").exists()


@row("is being written by", "pid")
def cache_into_a_held_folder(w, tmp):
    held(tmp / "c")
    argv = ["--corpus", str(w / "corpus.txt"), "--model", str(w / "model"), "--out", str(tmp / "c")]
    return cache.main, argv + SMALL


@row("is being written by", "pid")
def viz_features_into_a_held_folder(w, tmp):
    held(tmp / "h")
    return viz.main, ["features", str(w / "interp"), "--out", str(tmp / "h")]


# environment faults: a full disk in each form it arrives, while the output folder is written


def failing_fsync(number, monkeypatch, after=0):
    """os.fsync fails with `number` from its (after+1)-th call on: how a full disk or an exhausted
    quota shows on a file system that allocates late (NFS, XFS, ext4's delayed allocation)."""
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > after:
            raise OSError(number, os.strerror(number))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@row("the disk is full", "graph.json", "ENOSPC", "free space")
def graph_disk_full(w, tmp, monkeypatch):
    out = copy(w, "graph", tmp)
    before = snapshot(out)
    failing_fsync(errno.ENOSPC, monkeypatch)
    return graph.main, graph_argv(w, out, prompt="the dog ran"), same_bytes(before)


@row("the disk quota is used up", "adjacency.safetensors", "EDQUOT")
def graph_quota_exceeded(w, tmp, monkeypatch):
    out = copy(w, "graph", tmp)
    before = snapshot(out)
    failing_fsync(errno.EDQUOT, monkeypatch, after=4)  # graph.json and its index are renamed
    leftovers = functools.partial(no_tmp_files, out)
    return graph.main, graph_argv(w, out, prompt="the dog ran"), leftovers, kept(before, 2)


@row("the disk is full", "features.jsonl", "ENOSPC")
def interp_disk_full(w, tmp, monkeypatch):
    out = copy(w, "interp", tmp)
    before = snapshot(out)
    failing_fsync(errno.ENOSPC, monkeypatch)
    return interp.main, interp_argv(w, out), same_bytes(before)


@row("the disk is full", "ENOSPC")
def viz_features_disk_full(w, tmp, monkeypatch):
    failing_fsync(errno.ENOSPC, monkeypatch)
    return viz.main, ["features", str(w / "interp"), "--out", str(tmp / "h"), "--workers", "1"]


@row("the disk is full", "ENOSPC", "free space")
def train_disk_full(w, tmp, monkeypatch):
    failing_fsync(errno.ENOSPC, monkeypatch, after=3)
    return train.main, train_argv(w, tmp / "t")


@row("cannot write to", "Disk quota exceeded", "free space")
def cache_quota_exceeded(w, tmp, monkeypatch):
    failing_fsync(errno.EDQUOT, monkeypatch, after=1)
    argv = [
        "--corpus",
        str(w / "corpus.txt"),
        "--model",
        str(w / "model"),
        "--out",
        str(tmp / "c"),
        *SMALL,
    ]
    return cache.main, argv + ["--tokens", "600", "--ctx", "16", "--device", "cpu"]


def no_tmp_files(folder):
    assert not list(folder.rglob("*.tmp")), list(folder.rglob("*.tmp"))


def kept(before, n_new):
    """A check that all but `n_new` of the files are as they were."""

    def check():
        same = sum(p.read_bytes() == data for p, data in before.items())
        assert same >= len(before) - n_new

    return check


# -----------------------------------------------------------------------------
# the runner


@pytest.mark.parametrize("case, words", ROWS)
def test_catalogue(case, words, world, tmp_path, monkeypatch):
    """Exit status 1, one line with `words`, no traceback; then the row's checks."""
    takes = case.__code__.co_varnames[: case.__code__.co_argcount]
    main, argv, *checks = case(world, tmp_path, *[monkeypatch] * ("monkeypatch" in takes))
    monkeypatch.setattr(sys, "argv", ["x.py"])  # run_main reads --debug from it
    with pytest.raises(SystemExit) as e:
        cli.run_main(functools.partial(main, argv))
    monkeypatch.undo()
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message, message
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in {message!r}"
    for check in checks:
        assert check() is not False, check


def test_the_catalogue_is_long():
    assert len(ROWS) + len(PROCESS_ROWS) >= 60


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(monkeypatch):
    def bug():
        raise KeyError("a bug in the library")

    with pytest.raises(KeyError):
        cli.run_main(bug)

    def bad():
        raise ValueError("bad input")

    with pytest.raises(SystemExit, match="error: bad input"):
        cli.run_main(bad)
    monkeypatch.setenv(cli.DEBUG, "1")
    with pytest.raises(ValueError, match="bad input"):
        cli.run_main(bad)
    monkeypatch.delenv(cli.DEBUG)
    monkeypatch.setattr(sys, "argv", ["x.py", "--debug"])
    with pytest.raises(ValueError, match="bad input"):
        cli.run_main(bad)
    assert sys.argv == ["x.py"]  # the script's parser never sees --debug


def test_interp_output_from_before_manifests_loads_with_a_warning(world, tmp_path, capsys):
    out = copy(world, "interp", tmp_path)
    os.remove(out / "commit.json")
    rows = [json.loads(line) for line in (out / "features.jsonl").read_text().splitlines()]
    old = "".join(json.dumps({k: v for k, v in r.items() if k != "run_id"}) + "\n" for r in rows)
    (out / "features.jsonl").write_text(old)
    graph.main(graph_argv(world, tmp_path / "g", interp_dir=out))
    said = capsys.readouterr().err
    assert "warning:" in said and "written before interp.py recorded its CLT" in said
    nodes = json.loads((tmp_path / "g" / "graph.json").read_text())["nodes"]
    assert any(n["clerp"] for n in nodes if n["feature_type"] == "cross layer transcoder")


def test_outputs_record_the_run_and_the_clt(world):
    manifest = json.loads((world / "interp" / "commit.json").read_text())
    clt_id = json.loads((world / "clt" / "config.json").read_text())["export_id"]
    assert manifest["clt"]["export_id"] == clt_id
    first = json.loads((world / "interp" / "features.jsonl").read_text().splitlines()[0])
    assert first["run_id"] == manifest["files"]["features.jsonl"] == manifest["run_id"]
    meta = json.loads((world / "graph" / "graph.json").read_text())["metadata"]
    assert meta["info"]["clt_export_id"] == clt_id
    listed = json.loads((world / "graph" / "commit.json").read_text())["files"]
    assert set(listed) == {
        "graph.json",
        "graph-metadata.json",
        "adjacency.safetensors",
        "nodes.json",
    }
    assert set(listed.values()) == {meta["run_id"]}
    from safetensors import safe_open

    with safe_open(str(world / "graph" / "adjacency.safetensors"), "pt") as f:
        assert f.metadata()["run_id"] == meta["run_id"]


def test_the_finite_check_counts_only_when_a_sum_is_not_finite():
    huge = torch.full((1000,), 3e38)  # finite, but its sum overflows to inf
    files.check_finite({"W": huge}, "here")
    huge[7] = float("-inf")
    with pytest.raises(ValueError, match="here: tensor W holds 1 NaN or infinite values"):
        files.check_finite({"W": huge}, "here")
    files.check_finite({"ids": torch.arange(3)}, "integers pass")


def test_a_killed_holders_lock_is_released_by_the_kernel(world, tmp_path):
    """kill -9 of a run holding the folder: its .lock file stays, its flock does not."""
    pid = held(tmp_path / "g")
    os.kill(pid, signal.SIGKILL)
    HOLDERS.pop().wait()
    assert (tmp_path / "g" / files.LOCK).exists()
    graph.main(graph_argv(world, tmp_path / "g"))
    assert (tmp_path / "g" / "commit.json").exists() and not (tmp_path / "g" / files.LOCK).exists()


def test_output_files_get_the_umask_mode(world):
    mode = files.FILE_MODE
    for name in ("adjacency.safetensors", "graph.json", "nodes.json"):
        assert os.stat(world / "graph" / name).st_mode & 0o777 == mode, name
    assert os.stat(world / "clt" / "W_dec_0.safetensors").st_mode & 0o777 == mode


def test_a_killed_runs_temporary_files_are_removed_by_the_next(world, tmp_path):
    out = copy(world, "interp", tmp_path)
    (out / "html" / "index").mkdir(parents=True)
    (out / "html" / "L0_F1.html.tmp").write_text("half")
    (out / "html" / "index" / "layer_00.js.tmp").write_text("half")
    viz.main(["features", str(out)])
    no_tmp_files(out)
    assert not (out / "html" / files.LOCK).exists()  # released


# -----------------------------------------------------------------------------
# rows that need a process of their own: a file size limit, a held lock, kill -9

PROCESS_ROWS = []


def process_row(*words):
    def register(case):
        PROCESS_ROWS.append(pytest.param(case, words, id=case.__name__))
        return case

    return register


def script(name, argv, limit_kb=None):
    """A command line running `name` as `python name argv`, under `ulimit -f limit_kb`."""
    command = [sys.executable, os.path.join(ROOT, name), *map(str, argv)]
    if limit_kb is None:
        return command
    quoted = " ".join(f"'{c}'" for c in command)
    return ["bash", "-c", f"ulimit -f {limit_kb} && exec {quoted}"]


@process_row("the file size limit is reached", "EFBIG", "adjacency.safetensors")
def graph_over_ulimit(w, tmp):
    out = copy(w, "graph", tmp)
    return script("graph.py", graph_argv(w, out, prompt="the dog ran"), 24), same_bytes(
        {out / "adjacency.safetensors": (out / "adjacency.safetensors").read_bytes()}
    )


@process_row("the file size limit is reached", "EFBIG")
def viz_graph_over_ulimit(w, tmp):
    out = copy(w, "graph", tmp)
    return script("viz.py", ["graph", out / "graph.json"], 4), functools.partial(no_tmp_files, out)


@process_row("the file size limit is reached", "EFBIG", ".safetensors")
def train_export_over_ulimit(w, tmp):
    return script("train.py", train_argv(w, tmp / "t", "--features", "256"), 200), no_check


def no_check():
    pass


KILL_AFTER_PAGES = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import viz
from forge import browser
browser.FileBatch.__init__.__defaults__ = (1,)  # a flush (fsync, renames) after every page
flush = browser.FileBatch.flush
flushed = []
def flush_then_die(self):
    flush(self)
    flushed.append(1)
    if len(flushed) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
browser.FileBatch.flush = flush_then_die
viz.main(sys.argv[1:])
"""


def test_viz_features_killed_by_sigkill_is_flagged_and_a_rerun_commits(world, tmp_path):
    """kill -9 of `viz.py features` after 3 of its pages: the folder is refused as not committed
    (and, were its old commit.json and index.html put back, as pages of two runs); a rerun makes
    it whole."""
    out = tmp_path / "h"
    viz.main(["features", str(world / "interp"), "--out", str(out), "--workers", "1"])
    old = {out / name: (out / name).read_bytes() for name in (files.MANIFEST, "index.html")}
    argv = ["features", str(world / "interp"), "--out", str(out), "--workers", "1"]
    argv += ["--max-examples", "2"]
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_PAGES, *argv], cwd=ROOT, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert "Being written" in (out / "index.html").read_text()
    with pytest.raises(ValueError, match="is not committed: no commit.json .* killed"):
        browser.check_pages(str(out))
    for path, data in old.items():  # as if the killed run had left the old commit and index
        path.write_bytes(data)
    with pytest.raises(ValueError, match="L0_F.* is not of run .*a folder of two runs"):
        browser.check_pages(str(out))
    viz.main(argv)
    browser.check_pages(str(out))
    no_tmp_files(out)


@pytest.mark.parametrize("case, words", PROCESS_ROWS)
def test_catalogue_in_a_process(case, words, world, tmp_path):
    command, *checks = case(world, tmp_path)
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    missing = [w for w in words if w not in line]
    assert not missing, f"{missing} not in {line!r}"
    for check in checks:
        check()
