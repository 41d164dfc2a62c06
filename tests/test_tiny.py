"""forge/toyworld.py and models/build_tiny.py: the toy world, its corpus and labels, the BPE
tokenizer, and the shipped models/tiny."""

import json
import os
import random
from collections import Counter

import pytest
import torch

from forge import toyworld
from forge.hub import DEFAULT_MODEL, load_tokenizer
from model import GPT
from models import build_tiny

TINY = DEFAULT_MODEL
built = os.path.exists(os.path.join(TINY, "model.safetensors"))
shipped = pytest.mark.skipif(not built, reason="models/tiny not built")


@pytest.fixture(scope="module")
def world():
    return toyworld.make_world(0)


@pytest.fixture(scope="module")
def enc(world, tmp_path_factory):
    """The shipped tokenizer; before models/tiny exists, a small one trained here."""
    if os.path.exists(os.path.join(TINY, "vocab.json")):
        return load_tokenizer(TINY)
    path = tmp_path_factory.mktemp("tok")
    merges, _ = toyworld.train_bpe(toyworld.make_corpus(world, 1000, seed=0), max_merges=500)
    toyworld.save_tokenizer(path, merges)
    return load_tokenizer(path)


# -----------------------------------------------------------------------------
# world and corpus


def test_generator_is_deterministic(world):
    assert toyworld.make_world(0).to_json() == world.to_json()
    assert toyworld.make_world(1).to_json() != world.to_json()
    assert toyworld.make_corpus(world, 300, seed=5) == toyworld.make_corpus(world, 300, seed=5)
    assert toyworld.make_corpus(world, 300, seed=5) != toyworld.make_corpus(world, 300, seed=6)


def test_world_is_consistent(world):
    names = [n for items in world.names().values() for n in items]
    assert len(names) == len(set(names)), "a name stands for two things"
    for p in world.people:
        assert p["home"] in world.lookup["city"] and p["friend"] in world.lookup["person"]
        assert p["friend"] != p["name"]
    for c in world.countries:
        assert world.lookup["city"][c["capital"]]["country"] == c["name"]
    assert len(world.heldout_people) == 20
    assert set(world.heldout_people) <= set(world.lookup["person"])


def test_heldout_is_never_trained(world):
    docs = toyworld.make_corpus(world, 4000, seed=0)
    text = "\n".join(docs)
    for relation, templates in toyworld.TEMPLATES.items():
        if len(templates) > 1:
            held = toyworld.template_regex(templates[toyworld.HELDOUT], world)
            assert not held.search(text), f"held-out template of {relation} occurs in training"
    templates = [t for r in toyworld.TWO_HOP for t in toyworld.TEMPLATES[r]]
    two_hop = [toyworld.template_regex(t, world) for t in templates]
    for doc in docs:
        for rx in two_hop:
            for m in rx.finditer(doc):
                assert m.group("person__0") not in world.heldout_people, doc
    counting = [d for d in docs if d.startswith("Counting:")]
    starts = [int(d.split()[1].rstrip(",")) for d in counting]
    assert counting and not any(toyworld.is_heldout_start(n) for n in starts)


def test_shipped_world_is_the_generated_one(world):
    if not os.path.exists(os.path.join(TINY, "world.json")):
        pytest.skip("models/tiny not built")
    assert toyworld.load_world(TINY).to_json() == world.to_json()
    with open(os.path.join(TINY, "world.json")) as f:
        assert len(json.load(f)["facts"]) == len(world.facts())


# -----------------------------------------------------------------------------
# labels


def labels_of(text, enc, world, span):
    """The union of the labels of the tokens that cover text[span]."""
    start, end = span
    out = []
    pos = 0
    for i, labs in zip(enc.encode(text), toyworld.label_tokens(text, enc, world)):
        nxt = pos + len(enc.decode_single_token_bytes(i))
        if pos < end and start < nxt and text[pos:nxt].strip():
            out.append(labs)
        pos = nxt
    return out


def test_labels_match_templates(world, enc):
    rng = random.Random(0)
    for relation, subject, answer in rng.sample(world.facts(), 60):
        for template in toyworld.TEMPLATES[relation]:
            slot = toyworld.SLOT_RE.findall(template)[-1]
            text = template.format(**{toyworld.SUBJECT_SLOT[relation]: subject, slot: answer})
            a = text.rindex(answer)
            for labs in labels_of(text, enc, world, (a, a + len(answer))):
                assert {f"entity:{answer}", "role:answer"} <= labs, (text, labs)
            s = text.index(subject)
            for labs in labels_of(text, enc, world, (s, s + len(subject))):
                assert {f"entity:{subject}", "role:subject"} <= labs, (text, labs)
                assert "role:answer" not in labs, (text, labs)
            prompt, _ = toyworld.split_prompt(text, answer)
            last = toyworld.label_tokens(prompt, enc, world)[-1]
            assert {"role:query", f"output:{answer}"} <= last, (prompt, last)


def where(text, enc, world, family):
    """[(token text, sorted labels of `family`)] for the tokens of text that carry any."""
    out = []
    for i, labs in zip(enc.encode(text), toyworld.label_tokens(text, enc, world)):
        mine = sorted(lab for lab in labs if toyworld.family_of(lab) == family)
        if mine:
            out.append((enc.decode([i]), mine))
    return out


def test_each_family_sits_on_its_token(world, enc):
    """Hand-checked examples: input labels on the name, output on the token before the forced answer,
    latent on the last token of a two-hop question, with or without the bridge, and nowhere else."""
    country = world.countries[0]  # Zapokor, capital Tes, in the shipped world
    text = f"The capital of {country['name']} is {country['capital']}."
    name = f" {country['name']}"
    capital = f" {country['capital']}"
    assert where(text, enc, world, "entity") == [
        (name, [f"entity:{country['name']}"]),
        (capital, [f"entity:{country['capital']}"]),
    ]
    assert where(text, enc, world, "category") == [
        (name, ["category:country"]),
        (capital, ["category:city"]),
    ]
    assert where(text, enc, world, "output") == [(" is", [f"output:{country['capital']}"])]
    fruit = where("The pear is a kind of fruit.", enc, world, "category")[-1]
    assert fruit == (" fruit", ["category:kind"])
    io, s = world.people[0]["name"], world.people[1]["name"]
    story = f"When {io} and {s} went to the market, {s} gave a pear to {io}."
    # the second " to", before the answer
    assert where(story, enc, world, "output") == [(" to", [f"output:{io}"])]
    prompt = story[: story.rindex(" " + io)]
    assert where(prompt, enc, world, "output") == [(" to", [f"output:{io}"])]
    commas = [(",", ["output:8"]), (",", ["output:9"]), (",", ["output:10"])]
    assert where("Counting: 7, 8, 9,", enc, world, "output") == commas
    commas = [(",", ["output:4"]), (",", ["output:5"])]
    assert where("Counting: 3, 4, 5.", enc, world, "output") == commas
    assert where("After 5 comes 6.", enc, world, "output") == [(" comes", ["output:6"])]
    person = world.people[0]
    bridge_country = world.lookup["city"][person["home"]]["country"]
    language = world.lookup["country"][bridge_country]["language"]
    latent = [(" is", [f"latent:country={bridge_country}"])]
    question = f"The language {person['name']} speaks is"
    bridged = f"{person['name']} lives in {person['home']}. {question}"
    for text in (question, bridged, f"{question} {language}."):
        assert where(text, enc, world, "latent") == latent, text
        assert (" is", [f"output:{language}"]) in where(text, enc, world, "output"), text
    currency = world.lookup["country"][bridge_country]["currency"]
    # another relation: the same latent, another output
    text = f"{person['name']} pays with the {currency}."
    assert where(text, enc, world, "latent") == [(" the", [f"latent:country={bridge_country}"])]
    assert where(text, enc, world, "output") == [(" the", [f"output:{currency}"])]
    one_hop = f"The language of {country['name']} is"
    assert where(one_hop, enc, world, "latent") == []  # one hop: nothing latent


def test_labels_ioi_and_two_hop_roles(world, enc):
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
    text = f"{person['name']} lives in {city}. The language {person['name']} speaks is"
    c = text.index(city)
    for labs in labels_of(text, enc, world, (c, c + len(city))):
        assert {"role:bridge", "category:city", "role:answer"} <= labs, labs
    assert "role:query" in toyworld.label_tokens(text, enc, world)[-1]


def test_eval_corpus_supports_every_concept(world, enc):
    """Every concept the world can produce reaches the support asked for, counted by the labeler."""
    docs = toyworld.eval_corpus(world, seed=3, support=4)
    assert docs == toyworld.eval_corpus(world, seed=3, support=4)
    assert docs != toyworld.eval_corpus(world, seed=4, support=4)
    labels = [toyworld.label_tokens(d, enc, world) for d in docs]
    counts = Counter(lab for doc in labels for labs in doc for lab in labs)
    lived_in = {world.lookup["city"][p["home"]]["country"] for p in world.people}
    want = [f"entity:{n}" for names in world.names().values() for n in names]
    want += [f"category:{toyworld.CATEGORY_OF.get(c, c)}" for c in world.names()]
    want += [f"latent:country={c}" for c in lived_in]
    want += [f"output:{p['name']}" for p in world.people]
    want += [f"output:{n}" for n in range(1, world.max_number + 1)]
    want += [f"output:{r[2]}" for r in world.facts()]
    short = {w: counts[w] for w in want if counts[w] < 4}
    assert not short, short
    assert not any(toyworld.family_of(lab) not in toyworld.FAMILIES for lab in counts)
    # support 4: small; interp's default 32 is ~107k tokens
    assert sum(len(enc.encode(d)) for d in docs) < 30_000


@shipped
def test_entity_labels_are_token_identities_latent_labels_are_not(world, enc):
    """Well-posedness of the families on the shipped tokenizer: each entity label sits on one token (its
    name after a space) that carries it wherever it occurs, so a token detector at layer 0 scores F1 ~1
    (the rest of the label: a name opening a document, without its space); no single token marks a latent
    country (the query's last token, "is" / "speaks" / "the" / "from", ends every two-hop question)."""
    docs = toyworld.eval_corpus(world, seed=3, support=4)
    on = Counter()  # (label, token) -> rows
    n_tok = Counter()
    support = Counter()
    opening = Counter()  # label -> rows among a document's first 3 tokens
    for d in docs:
        for i, (t, labs) in enumerate(zip(enc.encode(d), toyworld.label_tokens(d, enc, world))):
            n_tok[t] += 1
            for lab in labs:
                on[lab, t] += 1
                support[lab] += 1
                opening[lab] += i < 3
    best = Counter()
    for (lab, t), n in on.items():
        best[lab] = max(best[lab], 2 * n / (n_tok[t] + support[lab]))  # F1 of "fires on token t"
    for names in world.names().values():
        for name in names:
            t = enc.encode(" " + name)
            assert len(t) == 1, name
            lab = f"entity:{name}"
            assert on[lab, t[0]] == n_tok[t[0]] > 0, name
            assert on[lab, t[0]] + opening[lab] >= support[lab], name
    entity = [f for lab, f in best.items() if lab.startswith("entity:")]
    latent = [f for lab, f in best.items() if lab.startswith("latent:")]
    assert sum(entity) / len(entity) >= 0.95
    assert len(entity) == sum(len(v) for v in world.names().values())
    assert latent and max(latent) < 0.3


# -----------------------------------------------------------------------------
# tokenizer


def test_bpe_training_roundtrip(tmp_path, world):
    docs = toyworld.make_corpus(world, 500, seed=1)
    merges, segmented = toyworld.train_bpe(docs, max_merges=300)
    toyworld.save_tokenizer(tmp_path, merges)
    enc = load_tokenizer(tmp_path)
    assert enc.n_vocab == 256 + len(merges) + 1 and enc.eot_token == enc.n_vocab - 1
    toyworld.check_tokenizer(enc, segmented)
    assert all(enc.decode(enc.encode(d)) == d for d in docs)
    # merges actually compress
    assert sum(len(enc.encode(d)) for d in docs) < 0.5 * sum(len(d) for d in docs)


@shipped
def test_tokenizer_matches_transformers_and_roundtrips(world):
    enc = load_tokenizer(TINY)
    transformers = pytest.importorskip("transformers")
    # from_pretrained reads vocab.json + merges.txt exactly as from a hub snapshot (in transformers 5 the fast
    # and slow names may be one class; both are checked so older versions test both implementations)
    hf = transformers.GPT2TokenizerFast.from_pretrained(TINY)
    slow = transformers.GPT2Tokenizer.from_pretrained(TINY)
    assert hf.eos_token_id == slow.eos_token_id == enc.eot_token == enc.n_vocab - 1
    docs = toyworld.toy_corpus(200, seed=3) + [p for p, _, _ in toyworld.eval_prompts(world)[::40]]
    for d in docs:
        ids = enc.encode(d)
        assert enc.decode(ids) == d
        assert hf(d)["input_ids"] == ids == slow(d)["input_ids"], d
    single = [n for items in world.names().values() for n in items if len(enc.encode(" " + n)) == 1]
    # names are (almost all) one token
    assert len(single) >= 0.95 * sum(len(v) for v in world.names().values())


# -----------------------------------------------------------------------------
# the shipped model


@shipped
def test_shipped_model_loads_in_clt_and_transformers():
    transformers = pytest.importorskip("transformers")
    model = GPT.from_pretrained(TINY)
    ref = transformers.GPT2LMHeadModel.from_pretrained(TINY).eval()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.n_ctx), generator=gen)
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max() <= 1e-4
    size = sum(os.path.getsize(os.path.join(TINY, f)) for f in os.listdir(TINY))
    assert size <= 10 * 2**20, f"models/tiny is {size / 2**20:.1f} MB"


@shipped
def test_shipped_model_answers_heldout_prompts():
    enc = load_tokenizer(TINY)
    model = GPT.from_pretrained(TINY)
    prompts = toyworld.eval_prompts(toyworld.load_world(TINY), seed=7)
    rng = random.Random(0)
    # measured numbers are in RESULTS.md
    bounds = {"one_hop": 0.8, "ioi": 0.8, "two_hop": 0.5, "counting": 0.5}
    for kind, bound in bounds.items():
        sample = rng.sample([p for p in prompts if p[2] == kind], 25)
        acc = sum(build_tiny.greedy_match(model, enc, p, a) for p, a, _ in sample) / len(sample)
        assert acc >= bound, f"{kind}: {acc:.2f} < {bound}"
