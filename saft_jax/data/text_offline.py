"""Offline text suite: four GLUE-like text-to-text tasks from a fixed grammar.

Nothing is downloaded or read: every sentence comes from the small lexicon and
grammar below, drawn with NumPy from ``seed``. The suite mirrors the paper's
four GLUE tasks (same label words, same label order as TFDS):

=================  =====================================  ===============================
task               input                                  label words (class 0, 1)
=================  =====================================  ===============================
``sentiment``      ``sentiment sentence: <s>``            negative, positive
``acceptability``  ``acceptability sentence: <s>``        unacceptable, acceptable
``paraphrase``     ``paraphrase sentence1: <a>``          not_equivalent, equivalent
                   ``sentence2: <b>``
``entailment``     ``entailment premise: <p>``            entailment, not_entailment
                   ``hypothesis: <h>``
=================  =====================================  ===============================

Grammar and labels:

* **sentiment** (like SST-2): ``the <thing> was|is [not|never|hardly]
  [very|really|quite|so] <adjective>``, alone or two clauses joined by
  ``", but "`` (opposite polarities; the clause after *but* decides) or
  ``" and "`` (same polarity). A clause is positive iff its adjective is in
  :data:`POSITIVE` xor it is negated.
* **acceptability** (like CoLA): present-tense sentences
  ``NP [PREP NP] VERB NP`` with ``NP = the [adjective] noun`` (at most one
  adjective per sentence) and the verb agreeing in number with the *first*
  noun (the optional prepositional phrase carries an "attractor" noun, often of
  the other number). Unacceptable sentences break the grammar: wrong verb
  number (half of them), two adjacent words swapped, a determiner dropped or
  doubled, the verb or the object dropped, or the words shuffled; each is
  checked to be outside the grammar.
* **paraphrase** (like MRPC): two past-tense event sentences, active
  ``A VERBED B [PP]`` or passive ``B was VERBED by A [PP]``. Equivalent iff both
  describe the same event: same verb, agent, patient (nouns and adjectives up
  to the synonyms of :data:`NOUNS`, :data:`ADJECTIVES`, :data:`VERBS`) and
  place. Equivalent pairs differ by synonyms and/or voice; non-equivalent
  ones additionally change one thing (swap agent and patient, change a
  verb, noun, adjective or place, add or drop an adjective or place, or
  replace a noun by its hypernym ``animal``/``person``).
* **entailment** (like RTE): the same sentences; the hypothesis is entailed iff
  it has the premise's verb (up to synonyms) and each of its noun phrases is
  implied by the premise's (same noun, a synonym, or the hypernym; adjective
  absent or a synonym of the premise's) and its place is absent or the
  premise's. Entailed hypotheses drop adjectives or the place, generalize nouns,
  use synonyms or the other voice; the others swap roles, change a word, add
  an adjective or place, or specialize a hypernym.

Each split is exactly balanced (class 0 gets the extra example of an odd
size), every input is unique across the task's train/val/test, and inputs are
ASCII of at most :data:`MAX_INPUT_CHARS` (128) bytes, longer draws being
redrawn. Single-sentence inputs average about 60 bytes (at most about 90);
the pair tasks average about 100 bytes, 34 of which are the GLUE-style field
names (``sentence1:``/``sentence2:``, ``premise:``/``hypothesis:``). Task ``t``'s examples are drawn
from ``np.random.default_rng([seed, crc32(t)])``, so each task depends only on
``(seed, sizes)``, not on which other tasks are built.

Pre-training text (:func:`pretext_corpus`) is drawn from the same grammar
(grammatical sentences of all three kinds, independently of the tasks);
:func:`span_corruption` turns a sentence into a T5 span-corruption pair with
plain-text sentinels ``<X0>``, ``<X1>``, ... (Raffel et al., 2020, §3.1.4).
"""
from __future__ import annotations

import zlib
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from saft_jax.data.text_tasks import SPLITS, TextSplit, TextTask

# ----------------------------------------------------------------------------- lexicon

# noun -> (plural, concept, hypernym); synonyms share a concept.
NOUNS: dict = {
    "cat": ("cats", "cat", "animal"),
    "dog": ("dogs", "dog", "animal"),
    "hound": ("hounds", "dog", "animal"),
    "bird": ("birds", "bird", "animal"),
    "horse": ("horses", "horse", "animal"),
    "fox": ("foxes", "fox", "animal"),
    "cow": ("cows", "cow", "animal"),
    "girl": ("girls", "girl", "person"),
    "boy": ("boys", "boy", "person"),
    "man": ("men", "man", "person"),
    "woman": ("women", "woman", "person"),
    "lady": ("ladies", "woman", "person"),
    "child": ("children", "child", "person"),
    "kid": ("kids", "child", "person"),
    "doctor": ("doctors", "doctor", "person"),
    "medic": ("medics", "doctor", "person"),
    "farmer": ("farmers", "farmer", "person"),
}
HYPERNYMS = ("animal", "person")  # nouns of the event grammar, with "a"/"an"

# adjective -> concept (synonyms share one)
ADJECTIVES: dict = {
    "big": "big", "large": "big",
    "small": "small", "little": "small",
    "happy": "happy", "glad": "happy",
    "angry": "angry", "mad": "angry",
    "quick": "quick", "fast": "quick",
    "old": "old",
    "young": "young",
    "tall": "tall",
}

# verb base -> (3rd person singular, past = past participle, concept)
VERBS: dict = {
    "chase": ("chases", "chased", "chase"),
    "pursue": ("pursues", "pursued", "chase"),
    "help": ("helps", "helped", "help"),
    "aid": ("aids", "aided", "help"),
    "watch": ("watches", "watched", "watch"),
    "observe": ("observes", "observed", "watch"),
    "follow": ("follows", "followed", "follow"),
    "trail": ("trails", "trailed", "follow"),
    "greet": ("greets", "greeted", "greet"),
    "welcome": ("welcomes", "welcomed", "greet"),
    "push": ("pushes", "pushed", "push"),
    "shove": ("shoves", "shoved", "push"),
    "visit": ("visits", "visited", "visit"),
    "kick": ("kicks", "kicked", "kick"),
}

PLACE_PREPS = ("in", "near", "by")
PLACES = ("park", "garden", "yard", "field", "barn", "lake")
ATTRACTOR_PREPS = ("near", "with", "behind", "beside")

THINGS = ("movie", "food", "book", "hotel", "show", "song", "game", "room", "trip", "meal",
          "plot", "staff")
POSITIVE = ("good", "great", "fine", "superb", "lovely", "fun", "nice", "excellent", "charming")
NEGATIVE = ("bad", "awful", "dull", "poor", "boring", "terrible", "weak", "bland", "horrible")
NEGATORS = ("not", "never", "hardly")
INTENSIFIERS = ("very", "really", "quite", "so")

# task -> label words (index = class id; the TFDS order of the GLUE counterpart)
TASKS: dict = {
    "sentiment": ("negative", "positive"),
    "acceptability": ("unacceptable", "acceptable"),
    "paraphrase": ("not_equivalent", "equivalent"),
    "entailment": ("entailment", "not_entailment"),
}
DEFAULT_SIZES: dict = {"train": 2000, "val": 200, "test": 500}
MAX_INPUT_CHARS = 128
SENTINEL = "<X{}>"
LEVELS = ("standard", "lexical")

_NOUN_LIST = tuple(NOUNS)
_ADJ_LIST = tuple(ADJECTIVES)
_VERB_LIST = tuple(VERBS)
_PLURALS = {v[0]: k for k, v in NOUNS.items()}
_VERB_3SG = {v[0]: k for k, v in VERBS.items()}
_VERB_PAST = {v[1]: k for k, v in VERBS.items()}


def _pick(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.random() * len(seq))]


# ------------------------------------------------------------------- event sentences
# An event is (agent, verb, patient, place, passive): noun phrases are
# (noun, adjective or None), verb a key of VERBS, place (prep, place) or None.


def noun_concept(noun: str) -> str:
  """Meaning of a noun: its synonym class (hypernyms are their own class)."""
  return noun if noun in HYPERNYMS else NOUNS[noun][1]


def noun_hypernym(noun: str) -> str:
  """``animal`` or ``person`` (a hypernym is its own hypernym)."""
  return noun if noun in HYPERNYMS else NOUNS[noun][2]


def np_text(phrase) -> str:
  """``the [adj] noun``, or ``a``/``an [adj] animal|person`` for hypernyms."""
  noun, adj = phrase
  words = [adj, noun] if adj else [noun]
  if noun in HYPERNYMS:
    det = "an" if words[0][0] in "aeiou" else "a"
  else:
    det = "the"
  return " ".join([det] + words)


def event_text(event) -> str:
  """Past-tense sentence of an event, active or passive."""
  agent, verb, patient, place, passive = event
  past = VERBS[verb][1]
  if passive:
    words = [np_text(patient), "was", past, "by", np_text(agent)]
  else:
    words = [np_text(agent), past, np_text(patient)]
  if place:
    words += [place[0], "the", place[1]]
  return " ".join(words)


def _np_meaning(phrase):
  noun, adj = phrase
  return noun_concept(noun), ADJECTIVES[adj] if adj else None


def event_meaning(event):
  """What an event sentence says: concepts of agent, verb, patient and place."""
  agent, verb, patient, place, _ = event
  return _np_meaning(agent), VERBS[verb][2], _np_meaning(patient), place


def _np_implies(premise, hypothesis) -> bool:
  p_noun, p_adj = _np_meaning(premise)
  h_noun, h_adj = _np_meaning(hypothesis)
  noun_ok = h_noun == p_noun or h_noun == noun_hypernym(premise[0])
  return noun_ok and (h_adj is None or h_adj == p_adj)


def event_entails(premise, hypothesis) -> bool:
  """The entailment rule of the ``entailment`` task (see module doc)."""
  p_agent, p_verb, p_patient, p_place, _ = premise
  h_agent, h_verb, h_patient, h_place, _ = hypothesis
  return (VERBS[h_verb][2] == VERBS[p_verb][2] and _np_implies(p_agent, h_agent)
          and _np_implies(p_patient, h_patient) and (h_place is None or h_place == p_place))


def _synonyms(table, word, key):
  return [w for w in table if w != word and key(w) == key(word)]


def _noun_synonyms(noun):
  return [] if noun in HYPERNYMS else _synonyms(NOUNS, noun, lambda w: NOUNS[w][1])


def _adj_synonyms(adj):
  return _synonyms(ADJECTIVES, adj, ADJECTIVES.get)


def _verb_synonyms(verb):
  return _synonyms(VERBS, verb, lambda w: VERBS[w][2])


def _random_np(rng, hypernym_p=0.0, adj_p=0.3, exclude=()):
  hypernyms = [h for h in HYPERNYMS if h not in exclude]
  if rng.random() < hypernym_p:
    noun = _pick(rng, hypernyms)
  else:
    noun = _pick(rng, [n for n in NOUNS if NOUNS[n][1] not in exclude])
  return noun, (_pick(rng, _ADJ_LIST) if rng.random() < adj_p else None)


def _random_place(rng):
  return _pick(rng, PLACE_PREPS), _pick(rng, PLACES)


def _random_event(rng, hypernym_p, place_p, passive_p=0.3):
  agent = _random_np(rng, hypernym_p)
  patient = _random_np(rng, hypernym_p, exclude=(noun_concept(agent[0]),))
  place = _random_place(rng) if rng.random() < place_p else None
  return (agent, _pick(rng, _VERB_LIST), patient, place, bool(rng.random() < passive_p))


def _with_np(event, role, phrase):
  e = list(event)
  e[0 if role == "agent" else 2] = phrase
  return tuple(e)


def _get_np(event, role):
  return event[0 if role == "agent" else 2]


# Edits of an event: fn(rng, event) -> new event or None (not applicable).

def _op_voice(rng, e):
  del rng
  return e[:4] + (not e[4],)


def _op_verb_synonym(rng, e):
  syn = _verb_synonyms(e[1])
  return (e[0], _pick(rng, syn)) + e[2:] if syn else None


def _op_noun_synonym(rng, e, role):
  noun, adj = _get_np(e, role)
  syn = _noun_synonyms(noun)
  return _with_np(e, role, (_pick(rng, syn), adj)) if syn else None


def _op_adj_synonym(rng, e, role):
  noun, adj = _get_np(e, role)
  syn = _adj_synonyms(adj) if adj else []
  return _with_np(e, role, (noun, _pick(rng, syn))) if syn else None


def _op_drop_adj(rng, e, role):
  del rng
  noun, adj = _get_np(e, role)
  return _with_np(e, role, (noun, None)) if adj else None


def _op_generalize(rng, e, role):
  del rng
  noun, adj = _get_np(e, role)
  return None if noun in HYPERNYMS else _with_np(e, role, (noun_hypernym(noun), adj))


def _op_drop_place(rng, e):
  del rng
  return e[:3] + (None, e[4]) if e[3] else None


def _op_swap(rng, e):
  del rng
  return (e[2], e[1], e[0], e[3], e[4])


def _op_change_verb(rng, e):
  other = [v for v in VERBS if VERBS[v][2] != VERBS[e[1]][2]]
  return (e[0], _pick(rng, other)) + e[2:]


def _op_change_noun(rng, e, role):
  noun, adj = _get_np(e, role)
  if noun in HYPERNYMS:
    return _with_np(e, role, ([h for h in HYPERNYMS if h != noun][0], adj))
  # mostly a noun of the same kind (cat -> dog), the harder case
  same = rng.random() < 0.7
  pool = [n for n in NOUNS if NOUNS[n][1] != NOUNS[noun][1]
          and (NOUNS[n][2] == NOUNS[noun][2]) == same]
  return _with_np(e, role, (_pick(rng, pool), adj))


def _op_change_adj(rng, e, role):
  noun, adj = _get_np(e, role)
  pool = [a for a in ADJECTIVES if adj is None or ADJECTIVES[a] != ADJECTIVES[adj]]
  return _with_np(e, role, (noun, _pick(rng, pool)))


def _op_specialize(rng, e, role):
  noun, adj = _get_np(e, role)
  if noun not in HYPERNYMS:
    return None
  return _with_np(e, role, (_pick(rng, [n for n in NOUNS if NOUNS[n][2] == noun]), adj))


def _op_change_place(rng, e):
  place = _random_place(rng)
  return None if place == e[3] else e[:3] + (place, e[4])


def _roles(fn):
  return [lambda rng, e, fn=fn: fn(rng, e, "agent"), lambda rng, e, fn=fn: fn(rng, e, "patient")]


_SAME_MEANING = ([_op_voice, _op_verb_synonym] + _roles(_op_noun_synonym)
                 + _roles(_op_adj_synonym))
_WEAKER = _roles(_op_drop_adj) + _roles(_op_generalize) + [_op_drop_place]
# (op, weight) of the edits that change the meaning
_CHANGES = ([(_op_swap, 3.0), (_op_change_verb, 1.5), (_op_change_place, 1.0)]
            + [(f, 1.0) for f in _roles(_op_change_noun)]
            + [(f, 1.0) for f in _roles(_op_change_adj)])
# The "lexical" level: active voice, no hypernyms, no role swaps (word-for-word alignment).
_LEXICAL_SAME = [f for f in _SAME_MEANING if f is not _op_voice]
_LEXICAL_WEAKER = _roles(_op_drop_adj) + [_op_drop_place]
_LEXICAL_CHANGES = [(f, w) for f, w in _CHANGES if f is not _op_swap]


def _apply_some(rng, event, ops, k):
  for i in rng.permutation(len(ops))[:k]:
    new = ops[i](rng, event)
    event = event if new is None else new
  return event


def _weighted(rng, pairs):
  w = np.asarray([p[1] for p in pairs])
  return pairs[int(rng.choice(len(pairs), p=w / w.sum()))][0]


def _paraphrase_pair(rng, label, level="standard"):
  """(sentence1, sentence2) with ``label`` 1 = equivalent, 0 = not."""
  lexical = level == "lexical"
  while True:
    if lexical:
      first = _random_event(rng, hypernym_p=0.0, place_p=0.25, passive_p=0.0)
      changes = _LEXICAL_CHANGES + [(f, 1.0) for f in _LEXICAL_WEAKER]
    else:
      first = _random_event(rng, hypernym_p=0.1, place_p=0.25)
      changes = (_CHANGES + [(f, 1.0) for f in _WEAKER]
                 + [(f, 0.5) for f in _roles(_op_specialize)])
    second = first
    if label == 0:
      change = _weighted(rng, changes)
      second = change(rng, second) or second
    second = _apply_some(rng, second, _LEXICAL_SAME if lexical else _SAME_MEANING,
                         int(rng.integers(1, 4)))
    same = event_meaning(first) == event_meaning(second)
    if same == bool(label) and event_text(first) != event_text(second):
      return event_text(first), event_text(second)


def _entailment_pair(rng, label, level="standard"):
  """(premise, hypothesis) with ``label`` 0 = entailment, 1 = not_entailment."""
  lexical = level == "lexical"
  while True:
    if lexical:
      premise = _random_event(rng, hypernym_p=0.0, place_p=0.5, passive_p=0.0)
      changes, weaker, same = _LEXICAL_CHANGES, _LEXICAL_WEAKER, _LEXICAL_SAME
    else:
      premise = _random_event(rng, hypernym_p=0.15, place_p=0.5)
      changes = _CHANGES + [(f, 1.5) for f in _roles(_op_specialize)]
      weaker, same = _WEAKER, _SAME_MEANING
    hyp = premise
    if label == 1:
      change = _weighted(rng, changes)
      hyp = change(rng, hyp) or hyp
    hyp = _apply_some(rng, hyp, weaker, int(rng.integers(0, 3)))
    hyp = _apply_some(rng, hyp, same, int(rng.integers(0, 3)))
    entailed = event_entails(premise, hyp)
    if entailed == (label == 0) and event_text(premise) != event_text(hyp):
      return event_text(premise), event_text(hyp)


# ------------------------------------------------------------------------- sentiment


def _clause(rng, positive: bool, negate_p: float) -> str:
  negated = bool(rng.random() < negate_p)
  adj = _pick(rng, POSITIVE if positive != negated else NEGATIVE)
  words = ["the", _pick(rng, THINGS), _pick(rng, ("was", "is"))]
  if negated:
    words.append(_pick(rng, NEGATORS))
  if rng.random() < 0.35:
    words.append(_pick(rng, INTENSIFIERS))
  return " ".join(words + [adj])


def _sentiment_sentence(rng, label, level="standard"):
  """A review sentence with polarity ``label`` (1 = positive)."""
  positive = bool(label)
  kind = rng.random()
  if kind < 0.5:
    return _clause(rng, positive, 0.4)
  if kind < 0.8 and level != "lexical":
    return f"{_clause(rng, not positive, 0.4)}, but {_clause(rng, positive, 0.4)}"
  return f"{_clause(rng, positive, 0.4)} and {_clause(rng, positive, 0.4)}"


# --------------------------------------------------------------------- acceptability


def _np_words(rng, plural, adj):
  noun = _pick(rng, _NOUN_LIST)
  return ["the"] + ([_pick(rng, _ADJ_LIST)] if adj else []) + \
      [NOUNS[noun][0] if plural else noun]


def _grammatical(rng, level="standard"):
  """Words of an acceptable present-tense sentence."""
  slots = 3
  adj_at = int(rng.integers(slots + 1))  # at most one adjective (slot 3: none)
  plural = bool(rng.random() < 0.5)
  words = _np_words(rng, plural, adj_at == 0)
  if rng.random() < 0.5 and level != "lexical":  # attractor, usually of the other number
    other = plural if rng.random() < 0.3 else not plural
    words += [_pick(rng, ATTRACTOR_PREPS)] + _np_words(rng, other, adj_at == 1)
  verb = _pick(rng, _VERB_LIST)
  words.append(verb if plural else VERBS[verb][0])
  return words + _np_words(rng, bool(rng.random() < 0.5), adj_at == 2)


def _parse_np(words, i):
  if i < len(words) and words[i] == "the":
    i += 1
    if i < len(words) and words[i] in ADJECTIVES:
      i += 1
    if i < len(words) and words[i] in NOUNS:
      return "sg", i + 1
    if i < len(words) and words[i] in _PLURALS:
      return "pl", i + 1
  return None, i


def is_acceptable(words: Sequence[str]) -> bool:
  """Whether ``words`` is in the ``acceptability`` grammar (see module doc)."""
  number, i = _parse_np(words, 0)
  if number is None:
    return False
  if i < len(words) and words[i] in ATTRACTOR_PREPS:
    attractor, i = _parse_np(words, i + 1)
    if attractor is None:
      return False
  if i >= len(words):
    return False
  verb_number = "sg" if words[i] in _VERB_3SG else "pl" if words[i] in VERBS else None
  if verb_number != number:
    return False
  obj, i = _parse_np(words, i + 1)
  return obj is not None and i == len(words)


def _corrupt(rng, words):
  words = list(words)
  kind = rng.random()
  if kind < 0.5:  # agreement
    i = next(k for k, w in enumerate(words) if w in VERBS or w in _VERB_3SG)
    w = words[i]
    words[i] = VERBS[w][0] if w in VERBS else _VERB_3SG[w]
  elif kind < 0.65:  # swap two adjacent words
    i = int(rng.integers(len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
  elif kind < 0.8:  # drop or double a determiner
    dets = [k for k, w in enumerate(words) if w == "the"]
    i = _pick(rng, dets)
    words = words[:i] + words[i + 1:] if rng.random() < 0.5 else words[:i] + ["the"] + words[i:]
  elif kind < 0.9:  # drop the verb or the object
    i = next(k for k, w in enumerate(words) if w in VERBS or w in _VERB_3SG)
    words = words[:i] + words[i + 1:] if rng.random() < 0.5 else words[:i + 1]
  else:
    words = [words[k] for k in rng.permutation(len(words))]
  return words


def _acceptability_sentence(rng, label, level="standard"):
  """A sentence with ``label`` 1 = acceptable, 0 = unacceptable."""
  while True:
    words = _grammatical(rng, level)
    if not label:
      words = _corrupt(rng, words)
    if is_acceptable(words) == bool(label):
      return " ".join(words)


# ------------------------------------------------------------------------------ suite


def _sentiment(rng, label, level):
  return f"sentiment sentence: {_sentiment_sentence(rng, label, level)}"


def _acceptability(rng, label, level):
  return f"acceptability sentence: {_acceptability_sentence(rng, label, level)}"


def _paraphrase(rng, label, level):
  a, b = _paraphrase_pair(rng, label, level)
  return f"paraphrase sentence1: {a} sentence2: {b}"


def _entailment(rng, label, level):
  p, h = _entailment_pair(rng, label, level)
  return f"entailment premise: {p} hypothesis: {h}"


_GENERATORS = {"sentiment": _sentiment, "acceptability": _acceptability,
               "paraphrase": _paraphrase, "entailment": _entailment}


def _task_rng(seed: int, name: str) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _resolve_sizes(sizes) -> dict:
  if sizes is None:
    return dict(DEFAULT_SIZES)
  if isinstance(sizes, Mapping):
    if set(sizes) != set(SPLITS):
      raise ValueError(f"sizes must have keys {SPLITS}, got {sorted(sizes)}")
    out = {k: sizes[k] for k in SPLITS}
  else:
    sizes = tuple(sizes)
    if len(sizes) != 3:
      raise ValueError(f"sizes must be (train, val, test), got {sizes}")
    out = dict(zip(SPLITS, sizes))
  for k, v in out.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"size of {k!r} must be a non-negative int, got {v!r}")
  return {k: int(v) for k, v in out.items()}


def _check_level(level: str) -> str:
  if level not in LEVELS:
    raise ValueError(f"unknown offline text level {level!r}; known: {', '.join(LEVELS)}")
  return level


def _build(name: str, seed: int, sizes: dict, level: str) -> TextTask:
  rng = _task_rng(seed, name)
  gen = _GENERATORS[name]
  seen: set = set()
  splits = {}
  for split in SPLITS:
    n = sizes[split]
    labels = rng.permutation(np.r_[np.zeros(n - n // 2, np.int32), np.ones(n // 2, np.int32)])
    inputs = []
    for y in labels:
      for _ in range(10_000):
        text = gen(rng, int(y), level)
        if text not in seen and len(text) <= MAX_INPUT_CHARS:
          break
      else:
        raise RuntimeError(f"offline text task {name!r}: could not draw {sum(sizes.values())} "
                           f"distinct examples; use smaller sizes")
      seen.add(text)
      inputs.append(text)
    splits[split] = TextSplit(inputs, labels.astype(np.int32))
  return TextTask(name=name, label_words=TASKS[name], splits=splits)


def offline_text_suite(seed: int = 0, sizes: Optional[Mapping[str, int] | Sequence[int]] = None,
                       tasks: Optional[Iterable[str]] = None, level: str = "standard") -> dict:
  """The offline text tasks as in-memory :class:`~saft_jax.data.text_tasks.TextTask` s.

  Args:
    seed: generation seed.
    sizes: ``{"train": n, "val": n, "test": n}`` or a ``(train, val, test)``
      tuple (default :data:`DEFAULT_SIZES`: 2000 / 200 / 500).
    tasks: names to build (default: all of :data:`TASKS`, in that order).
    level: ``"standard"`` (the grammar of the module docstring) or ``"lexical"``, the
      same tasks without the constructions that need structure beyond words:
      sentiment without ``", but "`` (single clauses or ``" and "``), acceptability
      without attractor phrases, paraphrase and entailment in the active voice
      without hypernyms and without swapped roles (labels follow the same rules).

  Returns:
    ``{name: TextTask}``.
  """
  names = list(TASKS) if tasks is None else list(tasks)
  unknown = [t for t in names if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown offline text task(s) {unknown}; known: {sorted(TASKS)}")
  sizes = _resolve_sizes(sizes)
  level = _check_level(level)
  return {t: _build(t, seed, sizes, level) for t in names}


# --------------------------------------------------------------------------- vocabulary
# Words of the grammar besides the lexicon: determiners, auxiliaries, conjunctions,
# punctuation and the GLUE-style field names of the inputs.
FUNCTION_WORDS = ("the", "a", "an", "was", "is", "by", "but", "and", ",", ":")
FIELD_NAMES = ("sentence", "sentence1", "sentence2", "premise", "hypothesis")


def vocabulary() -> tuple:
  """Every word the grammar, the task prefixes and the label words can produce, sorted.

  The closed word list of the offline suite's word-level vocabulary
  (:class:`saft_jax.models.WordVocab`): nouns with their plurals and hypernyms,
  adjectives, verbs in all three forms, places, prepositions, review words, function
  words, punctuation, task names, field names and label words.
  """
  words = set(FUNCTION_WORDS) | set(FIELD_NAMES) | set(TASKS) | set(HYPERNYMS)
  words |= {w for k, v in NOUNS.items() for w in (k, v[0])}
  words |= set(ADJECTIVES) | {w for k, v in VERBS.items() for w in (k, v[0], v[1])}
  words |= set(PLACE_PREPS) | set(PLACES) | set(ATTRACTOR_PREPS)
  words |= set(THINGS) | set(POSITIVE) | set(NEGATIVE) | set(NEGATORS) | set(INTENSIFIERS)
  words |= {w for labels in TASKS.values() for w in labels}
  return tuple(sorted(words))


# ------------------------------------------------------------------------ pre-training


def pretext_corpus(seed: int = 0, n: int = 10_000) -> list:
  """``n`` grammatical sentences of the suite's grammar, for pre-training.

  A mix of past-tense event sentences (40%: active or passive, with adjectives,
  places and hypernyms), present-tense sentences with agreement (30%) and
  review sentences (30%), drawn from ``np.random.default_rng([seed, 7])``
  independently of the tasks (a sentence may also occur in a task, as web text
  may contain benchmark sentences). No task prefix, no labels.

  Args:
    seed: generation seed.
    n: number of sentences.

  Returns:
    A list of ``n`` strings.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([int(seed), 7])
  out = []
  for _ in range(n):
    kind = rng.random()
    if kind < 0.4:
      out.append(event_text(_random_event(rng, hypernym_p=0.15, place_p=0.4)))
    elif kind < 0.7:
      out.append(" ".join(_grammatical(rng)))
    else:
      out.append(_sentiment_sentence(rng, int(rng.integers(2))))
  return out


def instruction_mixture(seed: int = 0, n: int = 10_000, tasks: Optional[Iterable[str]] = None,
                        exclude: Iterable[str] = (), level: str = "standard") -> list:
  """``n`` labelled task examples for Flan-style multi-task pre-training of θ0.

  The analogue of Flan-T5's instruction tuning, whose mixture contains the GLUE tasks
  the paper fine-tunes on: task, label and example are drawn from
  ``np.random.default_rng([seed, 13])`` with the tasks' own generators (uniform over
  ``tasks`` and over each task's labels), and any input in ``exclude`` (e.g. every
  input of the suite's train/val/test splits) is redrawn, so the fine-tuning tasks'
  examples are never seen in pre-training.

  Args:
    seed: generation seed.
    n: number of examples.
    tasks: task names (default: all of :data:`TASKS`).
    exclude: inputs never to return.
    level: the tasks' level (see :func:`offline_text_suite`).

  Returns:
    A list of ``n`` ``(input, label_word)`` pairs.
  """
  names = list(TASKS) if tasks is None else list(tasks)
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names:
    raise ValueError(f"unknown offline text task(s) {unknown or names}; known: {sorted(TASKS)}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  exclude = set(exclude)
  level = _check_level(level)
  rng = np.random.default_rng([int(seed), 13])
  out = []
  while len(out) < n:
    name = names[int(rng.integers(len(names)))]
    label = int(rng.integers(2))
    text = _GENERATORS[name](rng, label, level)
    if text not in exclude and len(text) <= MAX_INPUT_CHARS:
      out.append((text, TASKS[name][label]))
  return out


def sentinel(i: int) -> str:
  """The ``i``-th span-corruption sentinel, ``"<X{i}>"``."""
  return SENTINEL.format(i)


def _random_partition(rng, total, parts):
  """``parts`` positive ints summing to ``total``, uniformly over compositions."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
  return np.diff(np.r_[0, cuts, total]).astype(int)


def span_corruption(text: str, rng: np.random.Generator, noise_density: float = 0.15,
                    mean_span_length: float = 3.0) -> tuple:
  """T5 span corruption on words, with plain-text sentinels.

  Like ``t5.data.preprocessors.span_corruption`` but on whitespace-separated
  words: ``k = round(n * noise_density)`` words (at least 1, at most
  ``n - 1``) are masked in ``round(k / mean_span_length)`` spans (at least 1);
  the masked and kept lengths are random compositions, interleaved kept,
  masked, kept, masked, ..., and the mask is rolled by a random offset (seqio's
  ``random_roll``) so that no position is favoured (a span cut by the roll
  becomes two). Each masked span is replaced by the next sentinel in the input;
  the target lists each sentinel followed by its words, then a final sentinel.

  Args:
    text: a sentence of at least two words.
    rng: NumPy generator (e.g. ``np.random.default_rng([seed, step])``).
    noise_density: share of masked words.
    mean_span_length: mean masked span length in words.

  Returns:
    ``(input, target)``, e.g. ``("the dog <X0> the cat", "<X0> chased <X1>")``.
  """
  words = text.split()
  n = len(words)
  if n < 2:
    raise ValueError(f"span corruption needs at least two words, got {text!r}")
  if not 0 < noise_density < 1 or mean_span_length < 1:
    raise ValueError(f"need 0 < noise_density < 1 and mean_span_length >= 1, got "
                     f"{noise_density}, {mean_span_length}")
  n_noise = min(max(int(round(n * noise_density)), 1), n - 1)
  n_spans = min(max(int(round(n_noise / mean_span_length)), 1), n_noise, n - n_noise)
  noise = _random_partition(rng, n_noise, n_spans)
  keep = _random_partition(rng, n - n_noise, n_spans)
  mask = np.concatenate([np.r_[np.zeros(k, bool), np.ones(m, bool)] for k, m in zip(keep, noise)])
  mask = np.roll(mask, int(rng.integers(n)))
  inputs, targets, span = [], [], 0
  for i, word in enumerate(words):
    if not mask[i]:
      inputs.append(word)
      continue
    if i == 0 or not mask[i - 1]:
      inputs.append(sentinel(span))
      targets.append(sentinel(span))
      span += 1
    targets.append(word)
  targets.append(sentinel(span))
  return " ".join(inputs), " ".join(targets)
