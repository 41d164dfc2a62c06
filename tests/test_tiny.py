"""tiny.py: the toy world, its corpus and labels, the BPE tokenizer, and the shipped models/tiny."""
import json
import os
import random

import pytest
import torch

import clt
import tiny

TINY = clt.DEFAULT_MODEL
shipped = pytest.mark.skipif(not os.path.exists(os.path.join(TINY, "model.safetensors")),
                             reason="models/tiny not built")


@pytest.fixture(scope="module")
def world():
    return tiny.make_world(0)


@pytest.fixture(scope="module")
def enc(world, tmp_path_factory):
    """The shipped tokenizer; before models/tiny exists, a small one trained here."""
    if os.path.exists(os.path.join(TINY, "vocab.json")):
        return clt.load_tokenizer(TINY)
    path = tmp_path_factory.mktemp("tok")
    tiny.save_tokenizer(path, tiny.train_bpe(tiny.make_corpus(world, 1000, seed=0), max_merges=500)[0])
    return clt.load_tokenizer(path)


# -----------------------------------------------------------------------------
# world and corpus


def test_generator_is_deterministic(world):
    assert tiny.make_world(0).to_json() == world.to_json()
    assert tiny.make_world(1).to_json() != world.to_json()
    assert tiny.make_corpus(world, 300, seed=5) == tiny.make_corpus(world, 300, seed=5)
    assert tiny.make_corpus(world, 300, seed=5) != tiny.make_corpus(world, 300, seed=6)


def test_world_is_consistent(world):
    names = [n for items in world.names().values() for n in items]
    assert len(names) == len(set(names)), "a name stands for two things"
    for p in world.people:
        assert p["home"] in world.lookup["city"] and p["friend"] in world.lookup["person"] and p["friend"] != p["name"]
    for c in world.countries:
        assert world.lookup["city"][c["capital"]]["country"] == c["name"]
    assert len(world.heldout_people) == 20 and set(world.heldout_people) <= set(world.lookup["person"])


def test_heldout_is_never_trained(world):
    docs = tiny.make_corpus(world, 4000, seed=0)
    text = "\n".join(docs)
    for relation, templates in tiny.TEMPLATES.items():
        if len(templates) > 1:
            held = tiny.template_regex(templates[tiny.HELDOUT], world)
            assert not held.search(text), f"held-out template of {relation} occurs in training"
    two_hop = [tiny.template_regex(t, world) for r in tiny.TWO_HOP for t in tiny.TEMPLATES[r]]
    for doc in docs:
        for rx in two_hop:
            for m in rx.finditer(doc):
                assert m.group("person__0") not in world.heldout_people, doc
    counting = [d for d in docs if d.startswith("Counting:")]
    assert counting and not any(tiny.is_heldout_start(int(d.split()[1].rstrip(","))) for d in counting)


def test_shipped_world_is_the_generated_one(world):
    if not os.path.exists(os.path.join(TINY, "world.json")):
        pytest.skip("models/tiny not built")
    assert tiny.load_world(TINY).to_json() == world.to_json()
    with open(os.path.join(TINY, "world.json")) as f:
        assert len(json.load(f)["facts"]) == len(world.facts())


# -----------------------------------------------------------------------------
# labels


def labels_of(text, enc, world, span):
    """The union of the labels of the tokens that cover text[span]."""
    start, end = span
    out = []
    pos = 0
    for i, labs in zip(enc.encode(text), tiny.label_tokens(text, enc, world)):
        nxt = pos + len(enc.decode_single_token_bytes(i))
        if pos < end and start < nxt and text[pos:nxt].strip():
            out.append(labs)
        pos = nxt
    return out


def test_labels_match_templates(world, enc):
    rng = random.Random(0)
    for relation, subject, answer in rng.sample(world.facts(), 60):
        for i, template in enumerate(tiny.TEMPLATES[relation]):
            slot = tiny.SLOT_RE.findall(template)[-1]
            text = template.format(**{tiny.SUBJECT_SLOT[relation]: subject, slot: answer})
            tag = f"template:{relation}/{'heldout' if i == len(tiny.TEMPLATES[relation]) - 1 else i}"
            a = text.rindex(answer)
            for labs in labels_of(text, enc, world, (a, a + len(answer))):
                assert {f"entity:{answer}", "role:answer", f"relation:{relation}", tag} <= labs, (text, labs)
            s = text.index(subject)
            for labs in labels_of(text, enc, world, (s, s + len(subject))):
                assert {f"entity:{subject}", "role:subject"} <= labs and "role:answer" not in labs, (text, labs)
            prompt, _ = tiny.split_prompt(text, answer)
            assert "role:query" in tiny.label_tokens(prompt, enc, world)[-1], prompt


def test_labels_ioi_and_two_hop(world, enc):
    text = "When Mira and Joss went to the market, Joss gave a pear to Mira."
    text = text.replace("Mira", world.people[0]["name"]).replace("Joss", world.people[1]["name"])
    io = world.people[0]["name"]
    subj = world.people[1]["name"]
    starts = [text.index(io), text.index(subj), text.rindex(subj), text.rindex(io)]
    want = [{"role:io"}, {"role:s1"}, {"role:s2"}, {"role:io", "role:answer"}]
    for start, (name, roles) in zip(starts, zip([io, subj, subj, io], want)):
        for labs in labels_of(text, enc, world, (start, start + len(name))):
            assert {lab for lab in labs if lab.startswith("role:")} == roles, (name, labs)
    person = world.people[0]
    city = person["home"]
    country = world.lookup["city"][person["home"]]["country"]
    text = f"{person['name']} lives in {city}. The language {person['name']} speaks is"
    c = text.index(city)
    for labs in labels_of(text, enc, world, (c, c + len(city))):
        assert {"role:bridge", f"about:{country}", "concept:city", "role:answer"} <= labs, labs
    assert "role:query" in tiny.label_tokens(text, enc, world)[-1]


# -----------------------------------------------------------------------------
# tokenizer


def test_bpe_training_roundtrip(tmp_path, world):
    docs = tiny.make_corpus(world, 500, seed=1)
    merges, segmented = tiny.train_bpe(docs, max_merges=300)
    tiny.save_tokenizer(tmp_path, merges)
    enc = clt.load_tokenizer(tmp_path)
    assert enc.n_vocab == 256 + len(merges) + 1 and enc.eot_token == enc.n_vocab - 1
    tiny.check_tokenizer(enc, segmented)
    assert all(enc.decode(enc.encode(d)) == d for d in docs)
    assert sum(len(enc.encode(d)) for d in docs) < 0.5 * sum(len(d) for d in docs)  # merges actually compress


@shipped
def test_tokenizer_matches_transformers_and_roundtrips(world):
    enc = clt.load_tokenizer(TINY)
    transformers = pytest.importorskip("transformers")
    # from_pretrained reads vocab.json + merges.txt exactly as from a hub snapshot (in transformers 5 the fast
    # and slow names may be one class; both are checked so older versions test both implementations)
    hf = transformers.GPT2TokenizerFast.from_pretrained(TINY)
    slow = transformers.GPT2Tokenizer.from_pretrained(TINY)
    assert hf.eos_token_id == slow.eos_token_id == enc.eot_token == enc.n_vocab - 1
    docs = tiny.toy_corpus(200, seed=3) + [p for p, _, _ in tiny.eval_prompts(world)[::40]]
    for d in docs:
        ids = enc.encode(d)
        assert enc.decode(ids) == d
        assert hf(d)["input_ids"] == ids == slow(d)["input_ids"], d
    single = [n for items in world.names().values() for n in items if len(enc.encode(" " + n)) == 1]
    assert len(single) >= 0.95 * sum(len(v) for v in world.names().values())  # names are (almost all) one token


# -----------------------------------------------------------------------------
# the shipped model


@shipped
def test_shipped_model_loads_in_clt_and_transformers():
    transformers = pytest.importorskip("transformers")
    model = clt.GPT.from_pretrained(TINY)
    ref = transformers.GPT2LMHeadModel.from_pretrained(TINY).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max() <= 1e-4
    size = sum(os.path.getsize(os.path.join(TINY, f)) for f in os.listdir(TINY))
    assert size <= 10 * 2**20, f"models/tiny is {size / 2**20:.1f} MB"


@shipped
def test_shipped_model_answers_heldout_prompts():
    enc = clt.load_tokenizer(TINY)
    model = clt.GPT.from_pretrained(TINY)
    prompts = tiny.eval_prompts(tiny.load_world(TINY), seed=7)
    rng = random.Random(0)
    bounds = {"one_hop": 0.8, "ioi": 0.8, "two_hop": 0.5, "counting": 0.5}  # measured numbers are in the README
    for kind, bound in bounds.items():
        sample = rng.sample([p for p in prompts if p[2] == kind], 25)
        acc = sum(tiny.greedy_match(model, enc, p, a) for p, a, _ in sample) / len(sample)
        assert acc >= bound, f"{kind}: {acc:.2f} < {bound}"
