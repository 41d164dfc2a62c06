"""
forge/toyworld.py: the toy world behind the embedded default model (models/tiny): a generated world
with known facts, the corpus written from it, per-token ground-truth labels, evaluation sets and a
byte-level BPE. models/build_tiny.py trains the model on it; cache.py reads its corpus ("toy");
interp.py scores features against its labels.

Data flow.  make_world(seed) -> World (world.json) -> make_corpus(world, n_docs, seed) -> documents
            -> train_bpe(docs) -> save_tokenizer: vocab.json + merges.txt (GPT-2's byte-level BPE)
            label_tokens(text, enc, world) -> per-token labels, on eval_corpus(world) or any text
            eval_prompts(world) -> (prompt, answer, kind): the model's held-out table

The world (seed 0): 40 countries ("The capital of Zapokor is Tes.", "People in Zapokor speak
Rigunish."), each with a capital and one more city; 100 people with a home city, a job and a best
friend ("Batris lives in Fafes."); 25 objects with a colour and a category; the numbers 0..99.
Every name is one token.

Label families (label_tokens), each on the token where a causal model can know it: input
("entity:Tes", "category:city"), output ("output:Tes", before an answer the world forces), latent
("latent:country=Zapokor", ending a two-hop question), structure ("role:subject", ...; not scored).

What "held-out" means. Every relation has several paraphrases; the last (TEMPLATES[r][HELDOUT])
never occurs in training (*_paraphrase kinds). A fifth of the people are held out of every two-hop
document, so for them "The language Batris speaks is" is never trained: with the bridge in context
("Batris lives in Fafes. ...", kind two_hop) the model composes the bridge with a city fact; without
it (two_hop_latent) it composes its own one-hop facts in its weights. IOI stories are new random
instances, counting starts at held-out numbers (7, 17, ...), comparisons use held-out pairs.
One-hop facts are all trained (an unseen fact cannot be known); their prompts are bare.

References: GPT-2 (Radford et al. 2019) for the tokenizer (byte-to-unicode map, pre-tokenization
pattern, BPE of Sennrich et al. 2016); IOI from Wang et al. 2022; greater-than from Hanna et al.
2023; two-hop prompts after Ameisen et al. 2025 ("the capital of the state containing Dallas").
Differences from GPT-2's BPE:
- it stops when no pair occurs twice: every word of the world is one token (vocab 1772, not 50257);
- a merge whose string is already a token is skipped: tiktoken ranks byte strings, not pairs.
"""

import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import accumulate

import regex
from tqdm import tqdm

from forge.files import atomic_path
from forge.hub import DEFAULT_MODEL, ENDOFTEXT, GPT2_PATTERN, bytes_to_unicode

# -----------------------------------------------------------------------------
# the world

JOBS = (
    "baker farmer painter doctor teacher sailor miner potter singer tailor weaver hunter "
    "builder dancer writer nurse pilot judge cook guard"
).split()
COLOURS = "red blue green yellow black white grey brown".split()
OBJECTS = {  # category -> objects (no vowel onsets: "a pear")
    "fruit": "pear plum lemon cherry peach".split(),
    "tool": "hammer saw drill spade chisel".split(),
    "animal": "horse goat mouse crow mole".split(),
    "vehicle": "cart boat sled wagon barge".split(),
    "instrument": "drum flute harp lute horn".split(),
}
PLACES = "market river school garden harbour temple tavern station library bakery".split()
ONSETS = "b d f g k l m n p r s t v z br dr gr kr tr st".split()
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m"]


@dataclass
class World:
    """The facts of the toy world, exactly what world.json holds."""

    seed: int
    countries: list  # {"name", "capital", "language", "currency"}
    cities: list  # {"name", "country"}; a country's capital comes first
    people: list  # {"name", "home" (a city), "job", "friend" (a person)}
    objects: list  # {"name", "colour", "category"}
    heldout_people: list  # names never in a two-hop document
    max_number: int = 99
    lookup: dict = field(default_factory=dict, repr=False, compare=False)  # derived, not saved

    def __post_init__(self):
        kinds = ("country", "city", "person", "object")
        lists = (self.countries, self.cities, self.people, self.objects)
        self.lookup = {k: {x["name"]: x for x in xs} for k, xs in zip(kinds, lists)}

    def names(self):
        """concept type -> list of names; the entities the labeler knows."""
        return {
            "country": [c["name"] for c in self.countries],
            "city": [c["name"] for c in self.cities],
            "language": [c["language"] for c in self.countries],
            "currency": [c["currency"] for c in self.countries],
            "person": [p["name"] for p in self.people],
            "job": list(JOBS),
            "colour": list(COLOURS),
            "object": [o["name"] for o in self.objects],
            "category": list(OBJECTS),
            "place": list(PLACES),
            "number": [str(n) for n in range(self.max_number + 1)],
        }

    def country_of(self, name):
        """The country a country, city, language or currency belongs to (None otherwise)."""
        for c in self.countries:
            if name in (c["name"], c["language"], c["currency"]):
                return c["name"]
        return self.lookup["city"][name]["country"] if name in self.lookup["city"] else None

    def facts(self):
        """Every one-hop fact as (relation, subject, answer); computed once."""
        if "facts" in self.lookup:
            return self.lookup["facts"]
        out = []
        for c in self.countries:
            out += [(r, c["name"], c[r]) for r in ("capital", "language", "currency")]
        for city in self.cities:
            country = self.lookup["country"][city["country"]]
            out.append(("located", city["name"], city["country"]))
            out += [(f"city_{r}", city["name"], country[r]) for r in ("language", "currency")]
        for p in self.people:
            out += [(r, p["name"], p[r]) for r in ("home", "job", "friend")]
        for o in self.objects:
            out += [(r, o["name"], o[r]) for r in ("colour", "category")]
        self.lookup["facts"] = out
        return out

    def answer(self, relation, subject):
        """The answer of a one-hop fact (None if the world has no such fact)."""
        if "answers" not in self.lookup:
            self.lookup["answers"] = {(r, s): a for r, s, a in self.facts()}
        return self.lookup["answers"].get((relation, subject))

    def two_hop(self, person, relation):
        """The answer of a two-hop relation (person_language, person_currency, person_country)."""
        home = self.lookup["person"][person]["home"]
        country = self.lookup["country"][self.lookup["city"][home]["country"]]
        fields = dict(person_language="language", person_currency="currency", person_country="name")
        return country[fields[relation]]

    def to_json(self):
        d = {k: v for k, v in asdict(self).items() if k != "lookup"}
        facts = [list(f) for f in self.facts()]
        return dict(d, facts=facts, templates=TEMPLATES, heldout_template=HELDOUT)


def make_world(seed=0, n_countries=40, n_people=100, n_heldout_people=20):
    """A deterministic world: names invented from syllables, facts drawn by random.Random(seed)."""
    literal = " ".join(SLOT_RE.sub("", t) for ts in TEMPLATES.values() for t in ts)
    used = {w.lower() for w in regex.findall(r"[a-zA-Z]+", literal)}
    # a name is never a word of a template or of the lists above
    used |= set(JOBS + COLOURS + PLACES + [o for v in OBJECTS.values() for o in v])
    rng = random.Random(seed)

    def name(n_syl, suffix="", lower=False):
        while True:
            syllables = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n_syl))
            s = syllables + rng.choice(CODAS) + suffix
            s = s if lower else s.capitalize()
            if s.lower() not in used and len(s) <= 9:
                used.add(s.lower())
                return s

    countries = []
    cities = []
    for _ in range(n_countries):
        country = name(2, rng.choice(["ia", "a", "and", "or", "en"]))
        language = name(2, rng.choice(["ic", "ish", "ese"]))
        currency = name(2, lower=True)
        towns = [name(rng.choice([1, 2])) for _ in range(2)]
        countries.append(dict(name=country, language=language, currency=currency, capital=towns[0]))
        cities += [dict(name=t, country=country) for t in towns]
    names = [name(2) for _ in range(n_people)]
    ring = rng.sample(names, len(names))  # a friend: the next on a random ring, never oneself
    friend = {a: b for a, b in zip(ring, ring[1:] + ring[:1])}
    people = [
        dict(name=n, home=rng.choice(cities)["name"], job=rng.choice(JOBS), friend=friend[n])
        for n in names
    ]
    items = [(o, c) for c, objs in OBJECTS.items() for o in objs]
    objects = [dict(name=o, colour=rng.choice(COLOURS), category=c) for o, c in items]
    heldout = sorted(rng.sample(names, n_heldout_people))
    return World(seed, countries, cities, people, objects, heldout)


def load_world(path=DEFAULT_MODEL):
    """The World saved in path/world.json (make_world(0) if path has none: it is the same world)."""
    f = os.path.join(path, "world.json")
    if not os.path.exists(f):
        if os.path.abspath(path) != os.path.abspath(DEFAULT_MODEL):
            raise FileNotFoundError(f"{path} has no world.json: not a models/build_tiny.py model")
        return make_world(0)
    with open(f) as fh:
        d = json.load(fh)
    keys = ("seed", "countries", "cities", "people", "objects", "heldout_people", "max_number")
    return World(**{k: d[k] for k in keys})


# -----------------------------------------------------------------------------
# templates and the corpus
# The last paraphrase of each relation (index HELDOUT) is never trained. {slot} names map to concept
# types through SLOT_TYPES; the last slot of a template is its answer.

# fmt: off
TEMPLATES = {
    "capital": ["The capital of {country} is {city}.", "{country}'s capital is {city}.",
        "{country} is ruled from {city}.", "The capital city of {country} is {city}."],
    "located": ["{city} is a city in {country}.", "{city} lies in {country}.",
        "The city of {city} is in {country}.", "{city} is a city of {country}."],
    "language": ["People in {country} speak {language}.",
        "The language of {country} is {language}.", "In {country}, most people speak {language}.",
        "Most people in {country} speak {language}."],
    "currency": ["The currency of {country} is the {currency}.",
        "In {country}, people pay with the {currency}.", "{country} uses the {currency}.",
        "People in {country} pay with the {currency}."],
    "city_language": ["In {city}, people speak {language}.", "People in {city} speak {language}.",
        "The language of {city} is {language}.", "Most people in {city} speak {language}."],
    "city_currency": ["In {city}, people pay with the {currency}.",
        "The currency of {city} is the {currency}.", "The shops in {city} take the {currency}.",
        "People in {city} pay with the {currency}."],
    "home": ["{person} lives in {city}.", "{person}'s home is in {city}.",
        "{person} has a house in {city}.", "The home of {person} is in {city}."],
    "job": ["{person} works as a {job}.", "{person} earns a living as a {job}.",
        "By trade, {person} is a {job}.", "{person} has a job as a {job}."],
    "friend": ["{person} is a friend of {friend}.", "{person}'s best friend is {friend}.",
        "{person} often visits {friend}.", "The best friend of {person} is {friend}."],
    "colour": ["The {object} is coloured {colour}.", "A {object} is always {colour}.",
        "The colour of the {object} is {colour}.", "Every {object} is always {colour}."],
    "category": ["The {object} is a kind of {category}.", "A {object} is a type of {category}.",
        "The {object} is one sort of {category}.", "Every {object} is a kind of {category}."],
    "person_language": ["The language {person} speaks is {language}.",
        "{person} speaks {language}.", "So {person} speaks {language} at home.",
        "At home, {person} speaks {language}."],
    "person_currency": ["{person} pays with the {currency}.",
        "The money {person} uses is the {currency}.", "So {person} pays with the {currency}.",
        "In the shops, {person} pays with the {currency}."],
    "person_country": ["The country {person} lives in is {country}.",
        "So {person} is from {country}.", "{person} is a citizen of {country}.",
        "{person} comes from {country}."],
    "ioi": ["When {io} and {s} went to the {place}, {s} gave a {object} to {io}.",
        "When {s} and {io} went to the {place}, {s} gave a {object} to {io}.",
        "After {io} and {s} met at the {place}, {s} handed the {object} to {io}.",
        "After {s} and {io} met at the {place}, {s} handed the {object} to {io}.",
        "{io} and {s} were at the {place}. {s} passed a {object} to {io}.",
        "{s} and {io} were at the {place}. {s} passed a {object} to {io}.",
        "When {s} and {io} were at the {place}, {s} handed a {object} to {io}."],
    "greater": ["Of {a} and {b}, the larger is {max}.",
        "Between {a} and {b}, the bigger number is {max}.",
        "{a} or {b}: the larger number is {max}.", "Of {a} and {b}, the bigger number is {max}."],
    "successor": ["After {n} comes {succ}.", "The number after {n} is {succ}.",
        "{n} is followed by {succ}.", "Right after {n} comes {succ}."],
    "category_list": ["Some {category}s: the {object1}, the {object2} and the {object3}."],
}
HELDOUT = -1
TWO_HOP = ["person_language", "person_currency", "person_country"]
SLOT_TYPES = {"country": "country", "city": "city", "language": "language", "currency": "currency",
    "person": "person", "friend": "person", "io": "person", "s": "person", "job": "job",
    "colour": "colour", "object": "object", "object1": "object", "object2": "object",
    "object3": "object", "category": "category", "place": "place", "a": "number", "b": "number",
    "max": "number", "n": "number", "succ": "number"}
SLOT_RE = regex.compile(r"\{(\w+)\}")
SUBJECT_SLOT = {"capital": "country", "language": "country", "currency": "country",
    "located": "city", "city_language": "city", "city_currency": "city", "home": "person",
    "job": "person", "friend": "person", "colour": "object", "category": "object"}
# fmt: on


def answer_slot(relation):
    return SLOT_RE.findall(TEMPLATES[relation][0])[-1]


def templates_for(relation, heldout):
    """The training paraphrases of a relation, or (heldout=True) only its held-out one."""
    ts = TEMPLATES[relation]
    return [ts[HELDOUT]] if heldout and len(ts) > 1 else ts[:HELDOUT] if len(ts) > 1 else ts


def fact_sentence(world, rng, fact, heldout=False):
    relation, subject, answer = fact
    template = rng.choice(templates_for(relation, heldout))
    return template.format(**{SUBJECT_SLOT[relation]: subject, answer_slot(relation): answer})


def doc_facts(world, rng, heldout):
    """2-6 one-hop facts; half the time all about one entity (for 'about' features to learn)."""
    facts = world.facts()
    if rng.random() < 0.5:
        subject = rng.choice(facts)[1]
        facts = [f for f in facts if f[1] == subject or f[2] == subject]
    picked = rng.sample(facts, min(len(facts), rng.randint(2, 6)))
    return [fact_sentence(world, rng, f, heldout) for f in picked]


def doc_two_hop(world, rng, heldout):
    """A bridge ("Mira lives in Tarn."), distractors, then a two-hop question on that person."""
    trained = [p["name"] for p in world.people if p["name"] not in world.heldout_people]
    person, other = rng.sample(world.heldout_people if heldout else trained, 2)
    relation = rng.choice(TWO_HOP)
    before = [fact_sentence(world, rng, f) for f in rng.sample(world.facts(), rng.randint(0, 2))]
    if rng.random() < 0.5:  # a distractor bridge about someone else
        before.append(fact_sentence(world, rng, ("home", other, world.answer("home", other))))
    rng.shuffle(before)
    bridge = fact_sentence(world, rng, ("home", person, world.answer("home", person)))
    middle = [bridge] if heldout or rng.random() < 0.8 else []  # no bridge: from the weights
    if middle and rng.random() < 0.5:
        middle.append(fact_sentence(world, rng, rng.choice(world.facts())))
    question = rng.choice(templates_for(relation, heldout))
    answer = {answer_slot(relation): world.two_hop(person, relation)}
    return before + middle + [question.format(person=person, **answer)]


def ioi_story(world, rng, heldout):
    """(story, io): an IOI story about two random people; io (the indirect object) is its answer."""
    io, s = rng.sample([p["name"] for p in world.people], 2)
    template = rng.choice(templates_for("ioi", heldout))
    place = rng.choice(PLACES)
    obj = rng.choice(world.objects)["name"]
    return template.format(io=io, s=s, place=place, object=obj), io


def doc_ioi(world, rng, heldout):
    story, _ = ioi_story(world, rng, heldout)
    extra = [fact_sentence(world, rng, rng.choice(world.facts()))] if rng.random() < 0.3 else []
    return extra + [story]


def doc_numbers(world, rng, heldout):
    """Counting sequences (never starting at a held-out start), successors and comparisons."""
    kind = rng.random()
    top = world.max_number
    if kind < 0.4:
        length = rng.randint(3, 8)
        start = rng.choice([n for n in range(top - length + 2) if is_heldout_start(n) == heldout])
        return ["Counting: " + ", ".join(str(start + i) for i in range(length)) + "."]
    out = []
    for _ in range(rng.randint(2, 4)):
        if kind < 0.7:
            n = rng.randint(0, top - 1)
            out.append(rng.choice(templates_for("successor", heldout)).format(n=n, succ=n + 1))
        else:
            a, b = number_pair(rng, top, heldout)
            template = rng.choice(templates_for("greater", heldout))
            out.append(template.format(a=a, b=b, max=max(a, b)))
    return out


def is_heldout_start(n):
    return n % 10 == 7


def number_pair(rng, top, heldout):
    """Two numbers in 0..top: a held-out pair ((7 a + 3 b) % 10 == 0) or (heldout=False) not."""
    a, b = rng.sample(range(top + 1), 2)
    while ((7 * a + 3 * b) % 10 == 0) != heldout:
        a, b = rng.sample(range(top + 1), 2)
    return a, b


def doc_objects(world, rng, heldout):
    category = rng.choice(list(OBJECTS))
    objects = {f"object{i + 1}": o for i, o in enumerate(rng.sample(OBJECTS[category], 3))}
    out = [TEMPLATES["category_list"][0].format(category=category, **objects)]
    facts = [f for f in world.facts() if f[0] in ("colour", "category")]
    picked = rng.sample(facts, rng.randint(1, 4))
    return out + [fact_sentence(world, rng, f, heldout) for f in picked]


# document maker -> its share of the corpus
DOC_KINDS = {doc_facts: 0.35, doc_two_hop: 0.25, doc_ioi: 0.2, doc_numbers: 0.1, doc_objects: 0.1}


def make_corpus(world, n_docs, seed=0, heldout=False):
    """n_docs documents, deterministic in (world, seed); heldout: held-out templates, people."""
    rng = random.Random(seed)
    makers = list(DOC_KINDS)
    weights = list(DOC_KINDS.values())
    return [" ".join(rng.choices(makers, weights)[0](world, rng, heldout)) for _ in range(n_docs)]


def toy_corpus(n_docs=1000, seed=0):
    """Documents from the shipped world (models/tiny/world.json): the "toy" corpus for cache.py."""
    return make_corpus(load_world(DEFAULT_MODEL), n_docs, seed)


# -----------------------------------------------------------------------------
# the labeler: per-token ground truth for autointerp scoring and graph checks. FAMILIES: a label
# family -> its kind; CATEGORY_OF: a names() type -> its category ("category:category" says nothing)

FAMILIES = dict(
    entity="input", category="input", output="output", latent="latent", role="structure"
)
CATEGORY_OF = {"category": "kind"}


def family_of(label):
    """A label's family: what comes before its first colon ("latent:country=K" -> "latent")."""
    return label.split(":", 1)[0]


def alternation(names):
    """A regex matching any of names, longest first (a name never stops at a shorter one)."""
    return "|".join(map(regex.escape, sorted(names, key=len, reverse=True)))


def template_regex(template, world, prompt=False):
    """A template as a regex: each slot occurrence its own group `slot__k` over its concept's names.
    prompt=True keeps only the text before the answer (the last slot), anchored at the end."""
    names = world.names()
    parts = []
    pos = 0
    k = Counter()
    slots = list(SLOT_RE.finditer(template))
    for m in slots[:-1] if prompt else slots:
        slot = m.group(1)
        parts.append(regex.escape(template[pos : m.start()]))
        parts.append(f"(?P<{slot}__{k[slot]}>{alternation(names[SLOT_TYPES[slot]])})")
        k[slot] += 1
        pos = m.end()
    tail = template[pos : slots[-1].start()].rstrip() if prompt else template[pos:]
    end = r"\s*\Z" if prompt else r"(?![\w])"
    return regex.compile(r"(?<![\w])" + "".join(parts) + regex.escape(tail) + end)


def slot_role(relation, slot, k, is_last):
    if relation == "ioi" and slot in ("io", "s"):
        if is_last:
            return ["role:io", "role:answer"]
        return ["role:io"] if slot == "io" else [f"role:s{k + 1}"]
    if is_last:
        return ["role:answer"]
    subject = "person" if relation in TWO_HOP else "n" if relation == "successor" else ""
    return ["role:subject"] if slot == SUBJECT_SLOT.get(relation, subject) else ["role:filler"]


def template_matches(text, world):
    """(relation, prompt, match, {slot: name}) for every template matching text."""
    if "regex" not in world.lookup:  # compiled once per world
        world.lookup["regex"] = [
            (r, prompt, template_regex(t, world, prompt))
            for r, ts in TEMPLATES.items()
            for t in ts
            for prompt in (False, True)
        ]
    for relation, prompt, rx in world.lookup["regex"]:
        for m in rx.finditer(text, overlapped=True):
            values = {}
            for g, v in m.groupdict().items():  # a slot used twice must hold one name
                values.setdefault(g.rsplit("__", 1)[0], set()).add(v)
            if all(len(v) == 1 for v in values.values()):
                yield relation, prompt, m, {slot: v.pop() for slot, v in values.items()}


def determined_answer(world, relation, values):
    """The answer the world forces after a template's prompt, from its other slots (a stated one
    that contradicts the world does not count); None if nothing forces it (a category list)."""
    if relation in SUBJECT_SLOT:
        return world.answer(relation, values[SUBJECT_SLOT[relation]])
    if relation in TWO_HOP:
        return world.two_hop(values["person"], relation)
    if relation == "ioi":
        return values["io"]
    if relation == "successor":
        return str(int(values["n"]) + 1)
    if relation == "greater":
        return str(max(int(values["a"]), int(values["b"])))
    return None


def template_spans(text, world):
    """(start, end, label) char spans of every template matching text (whole, or as a final prompt):
    its slots' roles, and the output and latent labels on the token before its answer."""
    spans = []
    homes = {}
    questions = []
    for relation, prompt, m, values in template_matches(text, world):
        spans.append((m.start(), m.end(), "role:template"))
        groups = sorted((m.start(g), g) for g in m.groupdict())
        for j, (start, g) in enumerate(groups):
            slot, k = g.rsplit("__", 1)
            roles = slot_role(relation, slot, int(k), j == len(groups) - 1 and not prompt)
            spans += [(start, m.end(g), r) for r in roles]
        if prompt:
            spans.append((m.end() - 1, m.end(), "role:query"))
        # the last non-space character before the answer: the token before it
        p = len(text[: m.end() if prompt else groups[-1][0]].rstrip())
        before = (p - 1, p)
        answer = determined_answer(world, relation, values)
        if answer is not None:
            spans.append((*before, f"output:{answer}"))
        if relation in TWO_HOP:
            country = world.two_hop(values["person"], "person_country")
            spans.append((*before, f"latent:country={country}"))
            questions.append((values["person"], m.start()))
        if relation == "home" and not prompt:
            city = (m.start("city__0"), m.end("city__0"), m.start())
            homes.setdefault(values["person"], []).append(city)
    for person, q_start in questions:  # the bridge: the home stated before the question
        spans += [(s, e, "role:bridge") for s, e, start in homes.get(person, []) if start < q_start]
    return spans


def entity_spans(text, world):
    """Spans of every name (entity, category) and of counting sequences (roles, next numbers)."""
    if "names" not in world.lookup:
        world.lookup["names"] = [
            (CATEGORY_OF.get(c, c), regex.compile(rf"(?<![\w])({alternation(items)})(?![\w])"))
            for c, items in world.names().items()
        ]
    spans = []
    for category, pattern in world.lookup["names"]:
        for m in pattern.finditer(text):
            spans.append((m.start(), m.end(), f"entity:{m.group(1)}"))
            spans.append((m.start(), m.end(), f"category:{category}"))
    # a sequence, or a prompt ending in ","
    for m in regex.finditer(r"Counting:(?: \d+,)* \d+(\.|,\s*\Z)?", text):
        spans.append((m.start(), m.end(), "role:template"))
        numbers = list(regex.finditer(r"\d+", m.group()))
        for j, n in enumerate(numbers):
            last = j == len(numbers) - 1
            start = m.start() + n.start()
            end = m.start() + n.end()
            role = "role:answer" if last and m.group(1) == "." else "role:filler"
            spans.append((start, end, role))
            if not last or (m.group(1) or "").startswith(","):  # a comma: the next is forced
                spans.append((end, end + 1, f"output:{int(n.group()) + 1}"))
    return spans


def label_tokens(text, enc, world):
    """Per token of enc.encode(text): the labels of every span it overlaps, each family (FAMILIES)
    on the token where a causal model can know it:
      entity:NAME     input: a name's token ("entity:Tes" on " Tes"). Names are one token, so this
                      tests for token detectors (a name opening a document has no space: ~8 %).
      category:TYPE   input: the token of any name of TYPE (country, city, language, currency,
                      person, job, colour, object, kind (an object's category), place, number).
      output:X        output: the token after which the world forces X, before a fact's answer
                      ("The capital of Zapokor is| Tes"), a two-hop answer, IOI's indirect object
                      ("gave a pear to| Mira"), the next number ("Counting: 3,| 4"; "After 5 comes|
                      6"); a feature matching it says X, no evidence of a computation before it.
      latent:country=K  latent: the last token of a two-hop question ("The language Batris speaks
                      is|"): K, the country of the person's home, is what the answer needs and
                      is not said there (bridge in context or not). Answers differ per relation,
                      so a "say X" feature matches one relation at most, a country feature all.
      role:...        structure, not scored: subject | answer | bridge (the city a later two-hop
                      question needs) | io | s1 | s2 (IOI's indirect object, subject mentions) |
                      filler | template | query (a prompt's last token).
    Labels never depend on later text, except that a template must be complete to its answer.
    """
    ids = enc.encode(text, allowed_special="all")
    char_to_byte = [0, *accumulate(len(ch.encode("utf-8")) for ch in text)]  # tokens count bytes
    spans = entity_spans(text, world) + template_spans(text, world)
    spans = [(char_to_byte[s], char_to_byte[e], lab) for s, e, lab in spans]
    labels = []
    pos = 0
    raw = text.encode("utf-8")
    for i in ids:
        end = pos + len(enc.decode_single_token_bytes(i))
        labs = {lab for s, e, lab in spans if s < end and pos < e}
        if not raw[pos:end].strip():  # a whitespace token joins spans, plays no role in them
            labs = {lab for lab in labs if not lab.startswith(("role:", "entity:", "category:"))}
        # role:template marks the literal words only, not a token with another role
        if {lab for lab in labs if lab.startswith("role:")} - {"role:template", "role:query"}:
            labs.discard("role:template")
        labels.append(labs)
        pos = end
    return labels


# -----------------------------------------------------------------------------
# evaluation sets: prompts for the model, documents for concept scores


def split_prompt(sentence, answer):
    i = sentence.rindex(answer)
    return sentence[:i].rstrip(), " " + answer


def eval_prompts(world, seed=0, n_random=200):
    """(prompt, " answer", kind): held-out evaluation prompts (the module docstring says what is
    held out) of the kinds one_hop, one_hop_paraphrase, two_hop, two_hop_latent, two_hop_paraphrase,
    ioi, ioi_paraphrase, counting, greater_than."""
    rng = random.Random(seed)
    out = []
    for fact in world.facts():
        for kind, heldout in (("one_hop", False), ("one_hop_paraphrase", True)):
            out.append((*split_prompt(fact_sentence(world, rng, fact, heldout), fact[2]), kind))
    for person in world.heldout_people:
        bridge = TEMPLATES["home"][0].format(person=person, city=world.answer("home", person))
        for relation in TWO_HOP:
            answer = world.two_hop(person, relation)
            slot = answer_slot(relation)
            for i, template in enumerate(TEMPLATES[relation]):
                prompt, ans = split_prompt(template.format(person=person, **{slot: answer}), answer)
                kind = "two_hop" if i < len(TEMPLATES[relation]) - 1 else "two_hop_paraphrase"
                out.append((bridge + " " + prompt, ans, kind))
                if kind == "two_hop":
                    out.append((prompt, ans, "two_hop_latent"))
    for kind, heldout in (("ioi", False), ("ioi_paraphrase", True)):
        for _ in range(n_random):
            story, io = ioi_story(world, rng, heldout)
            out.append((story[: story.rindex(" " + io)], " " + io, kind))
    for start in [n for n in range(world.max_number - 5) if is_heldout_start(n)]:
        for length in (3, 4, 5):
            prompt = "Counting: " + ", ".join(str(start + i) for i in range(length)) + ","
            out.append((prompt, f" {start + length}", "counting"))
    for _ in range(n_random):
        a, b = number_pair(rng, world.max_number, heldout=True)
        prompt = TEMPLATES["greater"][0].format(a=a, b=b, max="")[:-2]
        out.append((prompt, f" {max(a, b)}", "greater_than"))
    return out


def eval_corpus(world, seed=0, support=20):
    """Documents for interp.py's concept scores, built in rounds until each concept of each family
    the world can produce has >= `support` labeled tokens (most not many more): two-hop questions
    per country with residents (the bridge before one half the time) for latent:country=K; IOI
    stories, support // 2 per indirect object; counting, successor and greater-than sentences for
    the numbers; one-hop sentences, 2-4 a document, for every name and answer. Any template may
    serve (held-out ones too: this scores a dictionary, not the model). The counts are planned; the
    labeler's differ a little (a sentence may match more templates than its own, one cut by a cache
    context boundary none), so interp.py scores from --min-support tokens on. Deterministic."""
    rng = random.Random(seed)
    have = Counter()  # planned labels so far
    docs = _eval_two_hop(world, rng, support, have)
    docs += _eval_ioi(world, rng, support // 2, have)
    docs += _eval_numbers(world, rng, support, have)
    docs += _eval_facts(world, rng, support, have)
    rng.shuffle(docs)
    return docs


def _eval_two_hop(world, rng, support, have):
    residents = {}
    for p in world.people:
        residents.setdefault(world.lookup["city"][p["home"]]["country"], []).append(p)
    docs = []
    for country, people in sorted(residents.items()):
        while have[f"latent:country={country}"] < support:
            p = rng.choice(people)
            relation = rng.choice(TWO_HOP)
            answer = world.two_hop(p["name"], relation)
            template = rng.choice(TEMPLATES[relation])
            question = template.format(person=p["name"], **{answer_slot(relation): answer})
            have.update([f"latent:country={country}", f"output:{answer}"])
            have.update([f"entity:{answer}", f"entity:{p['name']}"])
            if rng.random() < 0.5:
                bridge = fact_sentence(world, rng, ("home", p["name"], p["home"]))
                question = bridge + " " + question
                have.update([f"entity:{p['name']}", f"entity:{p['home']}", f"output:{p['home']}"])
            docs.append(question)
    return docs


def _eval_ioi(world, rng, n_stories, have):
    names = [p["name"] for p in world.people]
    docs = []
    for io in names:
        for _ in range(n_stories):
            s = rng.choice([n for n in names if n != io])
            place = rng.choice(PLACES)
            obj = rng.choice(world.objects)["name"]
            docs.append(rng.choice(TEMPLATES["ioi"]).format(io=io, s=s, place=place, object=obj))
            have.update([f"output:{io}", f"entity:{place}", f"entity:{obj}"])
            have.update([f"entity:{io}", f"entity:{s}"] * 2)
    return docs


def _eval_numbers(world, rng, support, have):
    """Each short number n gets a unit with n as its next number (n >= 1) or as a name (n = 0)."""
    top = world.max_number
    docs = []
    short = [0]
    while short:
        short = {n for n in range(top + 1) if have[f"entity:{n}"] < support}
        short = sorted(short | {n for n in range(1, top + 1) if have[f"output:{n}"] < support})
        for n in short:
            kind = rng.random()
            if n == 0:  # 0 is never a next number: it only occurs as a name
                docs.append(rng.choice(TEMPLATES["successor"]).format(n=0, succ=1))
                have.update(["entity:0", "entity:1", "output:1"])
            elif kind < 0.5:
                length = rng.randint(3, 8)
                lo = max(0, n - length + 1)
                start = rng.randint(lo, min(n - 1, top - length + 1)) if n < top - 1 else n - 1
                seq = list(range(start, min(start + length, top + 1)))
                docs.append("Counting: " + ", ".join(map(str, seq)) + ".")
                have.update([f"entity:{x}" for x in seq] + [f"output:{x}" for x in seq[1:]])
            elif kind < 0.75:
                docs.append(rng.choice(TEMPLATES["successor"]).format(n=n - 1, succ=n))
                have.update([f"entity:{n - 1}", f"entity:{n}", f"output:{n}"])
            else:
                a, b = rng.sample([n, rng.randrange(n)], 2)
                docs.append(rng.choice(TEMPLATES["greater"]).format(a=a, b=b, max=n))
                have.update([f"entity:{a}", f"entity:{b}", f"entity:{n}", f"output:{n}"])
    return docs


def _eval_facts(world, rng, support, have):
    facts = list(world.facts())
    sentences = []
    added = True
    while added:
        added = False
        rng.shuffle(facts)
        for relation, subject, answer in facts:
            wanted = [f"entity:{subject}", f"entity:{answer}", f"output:{answer}"]
            if min(have[w] for w in wanted) < support:
                slots = {SUBJECT_SLOT[relation]: subject, answer_slot(relation): answer}
                sentences.append(rng.choice(TEMPLATES[relation]).format(**slots))
                have.update(wanted)
                added = True
    docs = []
    while sentences:
        k = rng.randint(2, 4)
        docs.append(" ".join(sentences[:k]))
        del sentences[:k]
    return docs


# -----------------------------------------------------------------------------
# tokenizer: byte-level BPE (Sennrich et al. 2016) over GPT-2's byte-to-unicode alphabet, trained on
# word frequencies after GPT-2's pre-tokenization, written as the hub's vocab.json + merges.txt


def train_bpe(docs, max_merges=3000, min_count=2):
    """Merges (pairs of vocab.json strings), greedily the most frequent adjacent pair each step;
    ties break on the pair itself (deterministic). A pair whose merged string is already a token is
    skipped: tiktoken ranks byte strings, so one string must come from exactly one merge."""
    b2u = bytes_to_unicode()
    counts = Counter(regex.findall(GPT2_PATTERN, "\n".join(docs)))
    words = {tuple(b2u[b] for b in w.encode("utf-8")): c for w, c in counts.items()}
    vocab = set(b2u.values())
    merges = []
    for _ in tqdm(range(max_merges), desc="bpe", leave=False):
        pairs = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        new = ((c, p) for p, c in pairs.items() if p[0] + p[1] not in vocab)
        best = max(new, default=(0, None))
        if best[0] < min_count:
            break
        a, b = best[1]
        merged = a + b
        merges.append((a, b))
        vocab.add(merged)
        words = {merge_word(w, a, b, merged): c for w, c in words.items()}
    return merges, {"".join(w): w for w in words}


def merge_word(w, a, b, merged):
    out = []
    for x in w:
        if out and out[-1] == a and x == b:
            out[-1] = merged
        else:
            out.append(x)
    return tuple(out)


def save_tokenizer(path, merges):
    """vocab.json (ids in merge order: 256 bytes, one per merge, <|endoftext|>) and merges.txt."""
    os.makedirs(path, exist_ok=True)
    symbols = list(bytes_to_unicode().values()) + [a + b for a, b in merges] + [ENDOFTEXT]
    vocab = json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    for name, text in (("vocab.json", vocab), ("merges.txt", merges_txt)):
        with atomic_path(os.path.join(path, name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def check_tokenizer(enc, segmented):
    """tiktoken (ranks of byte strings) must segment every training word as BPE training did."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for word, pieces in segmented.items():
        ids = enc.encode_ordinary(bytes(byte_of[c] for c in word).decode("utf-8", errors="replace"))
        got = [bytes(byte_of[c] for c in p) for p in pieces]
        if [enc.decode_single_token_bytes(i) for i in ids] != got:
            raise ValueError(f"tokenizer splits {word!r} as ids {ids}, BPE training as {pieces}")
