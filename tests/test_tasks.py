"""Tasks: registry, BBT templates (docs/algorithm.md, "Data"), decoder templates, verbalizer ids."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

import tokenizers_util as tu
from fedbpt_jax import tasks, templates

HAS_JINJA = importlib.util.find_spec("jinja2") is not None


def test_registry_names_aliases_and_unknown():
    assert set(tasks.TASK_NAMES) == {
        "sst2",
        "yelp_polarity",
        "ag_news",
        "mr",
        "dbpedia",
        "mrpc",
        "rte",
        "snli",
        "rotten_tomatoes",
    }
    assert tasks.get("SST-2") is tasks.get("sst2") is tasks.get(tasks.get("sst2"))
    with pytest.raises(KeyError) as err:
        tasks.get("imdb")
    msg = str(err.value)
    assert "imdb" in msg and all(n in msg for n in tasks.TASK_NAMES)


def test_tasks_are_frozen_and_hashable():
    t = tasks.get("sst2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "x"
    assert len({tasks.get(n) for n in tasks.TASK_NAMES}) == len(tasks.TASK_NAMES)


def test_reference_templates_and_verbalizers():
    """BBT's RoBERTa templates, verbatim."""
    expect = {
        "sst2": ("{prompt} . {text} . It was {mask} .", ("bad", "great")),
        "yelp_polarity": ("{prompt} . {text} . It was {mask} .", ("bad", "great")),
        "ag_news": ("{prompt} . {mask} News: {text}", ("World", "Sports", "Business", "Tech")),
        "dbpedia": (
            "{prompt} [ Category: {mask} ] {text}",
            (
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
        ),
        "mrpc": ("{prompt} . {text_a} ? {mask} , {text_b}", ("No", "Yes")),
        "rte": ("{prompt} . {text_a} ? {mask} , {text_b}", ("Yes", "No")),
        "snli": ("{prompt} . {text_a} ? {mask} , {text_b}", ("Yes", "Maybe", "No")),
    }
    for name, (tmpl, words) in expect.items():
        t = tasks.get(name)
        assert t.encoder_template == tmpl, name
        assert t.encoder_label_words == words, name
        assert t.num_labels == len(words)
    assert tasks.get("sst2").hub_split("test") == "validation"
    assert tasks.get("mrpc").hub_split("test") == "validation"
    assert tasks.get("rte").hub_split("test") == "validation"
    assert tasks.get("ag_news").hub_split("test") == "test"
    assert tasks.get("mrpc").metric == "f1"
    assert {tasks.get(n).metric for n in tasks.TASK_NAMES if n != "mrpc"} == {"accuracy"}
    assert tasks.get("snli").hub_drop_labels == (-1,)
    assert tasks.get("yelp_polarity").preprocess(" a\\nb ") == "a b"
    assert tasks.get("rte").is_pair and not tasks.get("sst2").is_pair
    assert tasks.get("rotten_tomatoes").hub_id is None


def test_parse_encoder_template_attaches_spaces_to_what_follows():
    P = templates.EncoderPiece
    assert templates.parse_encoder_template("{prompt} . {text} . It was {mask} .") == (
        P("prompt"),
        P("literal", " ."),
        P("text", " "),
        P("literal", " . It was"),
        P("mask"),
        P("literal", " ."),
    )
    assert templates.parse_encoder_template("{prompt} . {mask} News: {text}") == (
        P("prompt"),
        P("literal", " ."),
        P("mask"),
        P("literal", " News:"),
        P("text", " "),
    )
    assert templates.parse_encoder_template("{prompt} . {text_a} ? {mask} , {text_b}") == (
        P("prompt"),
        P("literal", " ."),
        P("text_a", " "),
        P("literal", " ?"),
        P("mask"),
        P("literal", " ,"),
        P("text_b", " "),
    )


def test_decoder_templates_styles_and_default():
    assert tasks.DEFAULT_DECODER_STYLE == "completion"
    for name in tasks.TASK_NAMES:
        t = tasks.get(name)
        comp, chat = t.decoder_template("completion"), t.decoder_template("chat")
        assert t.decoder_template() is comp
        # completion: the cue ends without whitespace, the words carry a leading space
        assert comp.cue and not comp.cue[-1].isspace()
        assert all(w.startswith(" ") for w in comp.label_words)
        assert chat.style == "chat"
    sst = tasks.get("sst2").decoder_template("completion")
    assert (sst.text, sst.cue, sst.label_words) == ("Review: {text}", "\nSentiment:", (" negative", " positive"))
    with pytest.raises(ValueError, match="known styles"):
        tasks.get("sst2").decoder_template("fancy")


def test_chat_fallback_is_chatml(dec_tok):
    r = templates.render_decoder_template("sst2", dec_tok, "chat")  # no chat_template on this tokenizer
    assert r.head == "<|im_start|>user\n"
    assert r.cue == "<|im_end|>\n<|im_start|>assistant\n"
    assert r.body.endswith("Review: {text}") and r.label_words == ("negative", "positive")
    db = templates.render_decoder_template("dbpedia", dec_tok, "chat")
    assert db.cue.endswith("<|im_start|>assistant\nCategory:")
    comp = templates.render_decoder_template("rte", dec_tok)
    assert comp.head == "" and comp.body == "Premise: {text_a}\nHypothesis: {text_b}"


@pytest.mark.skipif(not HAS_JINJA, reason="jinja2 not installed (apply_chat_template needs it)")
def test_chat_uses_the_tokenizers_chat_template():
    tok = tu.chatml_tokenizer(chat_template=True)
    r = templates.render_decoder_template("sst2", tok, "chat")
    assert r.head == "<|im_start|>system\nYou are a test assistant.<|im_end|>\n<|im_start|>user\n"
    assert r.cue == "<|im_end|>\n<|im_start|>assistant\n"
    forced = templates.render_decoder_template("sst2", tok, "chat", use_chat_template=False)
    assert forced.head == "<|im_start|>user\n"


def test_encoder_label_ids_bbt_rule(enc_tok):
    ids = templates.label_token_ids("sst2", enc_tok, "encoder")
    assert ids.dtype.name == "int32" and ids.shape == (2,)
    # BBT: encoded WITHOUT a leading space
    assert ids.tolist() == [
        enc_tok("bad", add_special_tokens=False)["input_ids"][0],
        enc_tok("great", add_special_tokens=False)["input_ids"][0],
    ]
    assert ids.tolist() != [
        enc_tok(" bad", add_special_tokens=False)["input_ids"][0],
        enc_tok(" great", add_special_tokens=False)["input_ids"][0],
    ]
    for name in tasks.TASK_NAMES:
        assert len(templates.label_token_ids(name, enc_tok, "encoder")) == tasks.get(name).num_labels


def test_multi_token_label_word_error_and_first_token_opt_in(enc_tok):
    t = dataclasses.replace(tasks.get("ag_news"), encoder_label_words=("World", "Sports", "Business", "Sci/Tech"))
    with pytest.raises(ValueError) as err:
        templates.label_token_ids(t, enc_tok, "encoder")
    msg = str(err.value)
    assert "'Sci/Tech'" in msg and "first_token=True" in msg and "tokens" in msg
    ids = templates.label_token_ids(t, enc_tok, "encoder", first_token=True)
    assert ids[3] == enc_tok("Sci/Tech", add_special_tokens=False)["input_ids"][0]


def test_duplicate_label_ids_error(enc_tok):
    t = dataclasses.replace(tasks.get("sst2"), encoder_label_words=("great", "great"))
    with pytest.raises(ValueError, match="share token ids"):
        templates.label_token_ids(t, enc_tok, "encoder")
    # first-token scoring that collapses two words is an error too
    t2 = dataclasses.replace(tasks.get("sst2"), encoder_label_words=("Sci/Tech", "Sci/Fi"))
    with pytest.raises(ValueError, match="share token ids"):
        templates.label_token_ids(t2, enc_tok, "encoder", first_token=True)


def test_decoder_label_ids_follow_the_cue(dec_tok):
    comp = templates.label_token_ids("sst2", dec_tok, "decoder")
    assert comp.tolist() == [
        dec_tok(" negative", add_special_tokens=False)["input_ids"][0],
        dec_tok(" positive", add_special_tokens=False)["input_ids"][0],
    ]
    chat = templates.label_token_ids("sst2", dec_tok, "decoder", style="chat")
    assert chat.tolist() == [
        dec_tok("negative", add_special_tokens=False)["input_ids"][0],
        dec_tok("positive", add_special_tokens=False)["input_ids"][0],
    ]
    with pytest.raises(ValueError, match="unknown backbone kind"):
        templates.label_token_ids("sst2", dec_tok, "seq2seq")


@pytest.fixture(scope="module")
def smollm2_tok():
    tok = tu.smollm2_tokenizer()
    if tok is None:
        pytest.skip("SmolLM2 GGUF asset not cached")
    return tok


def test_smollm2_every_decoder_label_word_is_one_token(smollm2_tok):
    for name in tasks.TASK_NAMES:
        for style in tasks.get(name).styles:
            ids = templates.label_token_ids(name, smollm2_tok, "decoder", style=style)
            assert len(set(ids.tolist())) == tasks.get(name).num_labels
    # the ids measured in docs/measurements.md
    assert templates.label_token_ids("sst2", smollm2_tok, "decoder").tolist() == [3524, 2731]
    assert templates.label_token_ids("sst2", smollm2_tok, "decoder", style="chat").tolist() == [17728, 16185]
    assert [
        smollm2_tok.decode([i]) for i in templates.label_token_ids("sst2", smollm2_tok, "decoder", style="bbt")
    ] == [
        " terrible",
        " great",
    ]


@pytest.mark.skipif(not HAS_JINJA, reason="jinja2 not installed (apply_chat_template needs it)")
def test_smollm2_chat_template_renders_as_measured(smollm2_tok):
    tok = tu.smollm2_tokenizer(chat_template=True)
    r = templates.render_decoder_template("sst2", tok, "chat")
    assert r.head == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\n"
    )
    assert r.body.startswith(
        "Is the sentiment of the following movie review positive or negative? Answer with one word.\n\nReview: "
    )
    assert r.cue == "<|im_end|>\n<|im_start|>assistant\n"
    assert templates.label_token_ids("sst2", tok, "decoder", style="chat").tolist() == [17728, 16185]


@pytest.mark.skipif(HAS_JINJA, reason="only without jinja2")
def test_chat_template_without_jinja_warns_and_falls_back():
    tok = tu.chatml_tokenizer(chat_template=True)
    with pytest.warns(UserWarning, match="jinja2"):
        r = templates.render_decoder_template("sst2", tok, "chat")
    assert r.head == "<|im_start|>user\n"


def test_reference_template_puts_an_instruction_before_the_prompt(dec_tok):
    """The "reference" style mirrors the FedBPT authors' Llama layout: SST-2's instruction is the lead (before
    the soft prompt, in the spec), then " . {text}" (the text part) and the cue " ."."""
    import numpy as np

    from fedbpt_jax import data

    for name in tasks.TASK_NAMES:
        assert "reference" in tasks.get(name).styles
    ref = tasks.get("sst2").decoder_template("reference")
    assert (ref.lead, ref.text, ref.cue) == ("What is the sentiment of this sentence:", " . {text}", " .")
    yelp = tasks.get("yelp_polarity").decoder_template("reference")
    assert (yelp.lead, yelp.cue) == ("", " . It is")
    spec = data.scoring_spec("sst2", dec_tok, "decoder", style="reference")
    want = dec_tok("What is the sentiment of this sentence:", add_special_tokens=False)["input_ids"]
    assert np.asarray(spec.lead_ids).tolist() == want
    assert data.scoring_spec("sst2", dec_tok, "decoder").lead_ids is None  # other templates: no lead
    ex = data.Examples("sst2", ["a fine film"], np.asarray([1]))
    batch = data.encode_decoder("sst2", ex, dec_tok, style="reference", n_prompt=5)
    ids = batch.input_ids[0][batch.attention_mask[0] > 0].tolist()
    assert dec_tok.decode(ids) == " . a fine film"
    # the lead, the prompt and the cue must leave room for the text in the context
    with pytest.raises(
        ValueError, match=r"the lead \(\d+ tokens\) \+ prompt \(60\) \+ cue \(\d+\).*accepted: n_prompt"
    ):
        data.encode_decoder("sst2", ex, dec_tok, style="reference", n_prompt=60, max_positions=64)
    with pytest.raises(ValueError, match="a lead .* is a string, for the completion, bbt and reference styles"):
        tasks.DecoderTemplate("chat", "{text}", "", ("a", "b"), lead="Say:")
    with pytest.raises(ValueError, match="has no text slot"):
        tasks.DecoderTemplate("reference", "no slot here", " .", ("a", "b"))
