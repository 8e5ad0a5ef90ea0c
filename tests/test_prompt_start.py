"""Prompt start (the soft prompt at z = 0), template and verbalizer overrides, and their errors.

Tiny random backbones with small real tokenizers: the start must give, at z = 0, exactly the prompt it
names (decoders: the same logits as the tokens written into the text; encoders in "add" mode: the same
logits as the placeholders replaced by the tokens), and the manual-prompt baseline must be that prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedbpt_jax as fb
from fedbpt_jax import cli, data, objective, prompt, tasks, testing
from fedbpt_jax import federated as fl
from fedbpt_jax.federated.core import ModelInputs
from fedbpt_jax.models import decoder, encoder

N = 3


@pytest.fixture(scope="module")
def dec_lm(dec_tok):
    return testing.tiny_decoder(
        0, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, tokenizer=dec_tok
    )


@pytest.fixture(scope="module")
def enc_lm(enc_tok):
    return testing.tiny_encoder(0, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, tokenizer=enc_tok)


def _examples(n=6):
    return data.Examples.from_rows(
        "sst2",
        [
            ("a fine , warm and funny film", 1),
            ("dull and far too long", 0),
            ("the best movie of the year", 1),
            ("a mess", 0),
            ("i loved every minute", 1),
            ("nothing works here", 0),
        ][:n],
    )


def _cfg(**kw):
    base = dict(
        num_clients=2, clients_per_round=2, population_size=4, local_generations=2, intrinsic_dim=8, n_prompt_tokens=N
    )
    base.update(kw)
    return fl.FedConfig(**base)


# ------------------------------------------------------------------------------------------------
# Parsing and building
# ------------------------------------------------------------------------------------------------
def test_parse_start_forms(tmp_path):
    assert prompt.parse_start(None) == prompt.PromptStart("zeros")
    assert prompt.parse_start("zeros").kind == "zeros"
    assert prompt.parse_start("tokens:5, 6,7") == prompt.PromptStart("tokens", (5, 6, 7))
    assert prompt.parse_start([5, 6]) == prompt.PromptStart("tokens", (5, 6))
    assert prompt.parse_start("phrase: In short:") == prompt.PromptStart("phrase", " In short:")
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "p.npy", arr)
    s = prompt.parse_start(str(tmp_path / "p.npy"))
    assert s.kind == "array" and np.array_equal(s.value, arr) and s.describe() == "array[2, 3]"


@pytest.mark.parametrize(
    "bad, match",
    [
        ("ones", r"unknown prompt start 'ones'; accepted: zeros, reference, tokens:"),
        ("tokens:a,b", r"'tokens:a,b'.*integer token ids"),
        ("tokens:", r"names no token id"),
        ("phrase:", r"non-empty text"),
        ("missing.npy", r"'missing.npy': no such .npy file"),
        (np.zeros((2, 3, 4), np.float32), r"shape \(2, 3, 4\); expected \[n_prompt_tokens, hidden_size\]"),
        (np.full((2, 3), np.nan, np.float32), r"non-finite"),
    ],
)
def test_parse_start_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        prompt.parse_start(bad)


def test_build_start_decoder_tokens_phrase_array_and_errors(dec_lm):
    emb = np.asarray(dec_lm.input_embeddings())
    assert prompt.build_start(dec_lm, "zeros", N) is None
    got = prompt.build_start(dec_lm, "tokens:10,11,12", N)
    np.testing.assert_array_equal(np.asarray(got), emb[[10, 11, 12]])
    phrase = " In short:"
    ids = dec_lm.tokenizer(phrase, add_special_tokens=False)["input_ids"]
    assert prompt.start_length("phrase:" + phrase, dec_lm.tokenizer) == len(ids)
    got = prompt.build_start(dec_lm, "phrase:" + phrase, len(ids))
    np.testing.assert_array_equal(np.asarray(got), emb[ids])
    arr = np.random.default_rng(0).normal(size=(N, dec_lm.hidden_size)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(prompt.build_start(dec_lm, arr, N)), arr)
    with pytest.raises(
        ValueError,
        match=rf"the phrase ' In short:' is {len(ids)} tokens .* but "
        rf"n_prompt_tokens={len(ids) + 1}; set n_prompt_tokens={len(ids)}",
    ):
        prompt.build_start(dec_lm, "phrase:" + phrase, len(ids) + 1)
    with pytest.raises(ValueError, match=r"shape \(3, 32\); expected \[n_prompt_tokens, hidden_size\] = \[4, 32\]"):
        prompt.build_start(dec_lm, arr, 4)
    with pytest.raises(ValueError, match=r"shape \(3, 16\); expected .* = \[3, 32\]"):
        prompt.build_start(dec_lm, arr[:, :16], N)
    vocab = emb.shape[0]
    with pytest.raises(ValueError, match=rf"token ids \[{vocab}\] are outside the vocabulary \[0, {vocab}\)"):
        prompt.build_start(dec_lm, f"tokens:1,2,{vocab}", N)
    with pytest.raises(ValueError, match="unknown prompt start 'ones'"):
        ModelInputs.build(jax.random.key(0), dec_lm, _cfg(), start="ones")


def test_to_prompt_is_start_plus_Az():
    a = jax.random.normal(jax.random.key(0), (4, N * 2))
    start = jax.random.normal(jax.random.key(1), (N, 2))
    z = jax.random.normal(jax.random.key(2), (5, 4))
    got = prompt.to_prompt(a, z, 2, start)
    np.testing.assert_allclose(np.asarray(got), np.asarray((z @ a).reshape(5, N, 2) + start), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(prompt.to_prompt(a, jnp.zeros(4), 2, start)), np.asarray(start))
    np.testing.assert_array_equal(np.asarray(prompt.to_prompt(a, z, 2)), np.asarray((z @ a).reshape(5, N, 2)))


# ------------------------------------------------------------------------------------------------
# z = 0 is the named prompt
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["after", "before"])
def test_decoder_token_start_at_z0_equals_tokens_written_in(dec_lm, layout):
    batch = data.encode_decoder("sst2", _examples(), dec_lm.tokenizer, n_prompt=N)
    spec = data.scoring_spec("sst2", dec_lm.tokenizer, "decoder")
    ids = [40, 41, 42]
    start = prompt.build_start(dec_lm, ids, N, layout)
    got = decoder.label_logits(dec_lm.config, dec_lm.params, batch, spec, start, layout)
    b = batch.input_ids.shape[0]
    tok = np.broadcast_to(np.asarray(ids, np.int32), (b, N))
    one = np.ones((b, N), np.int32)
    if layout == "after":
        written = batch.replace(
            input_ids=np.concatenate([batch.input_ids, tok], 1),
            attention_mask=np.concatenate([batch.attention_mask, one], 1),
        )
    else:  # [tokens, (pads), text]: positions and attention follow the mask
        written = batch.replace(
            input_ids=np.concatenate([tok, batch.input_ids], 1),
            attention_mask=np.concatenate([one, batch.attention_mask], 1),
        )
    want = decoder.label_logits(dec_lm.config, dec_lm.params, written, spec, None, layout)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    bare = decoder.label_logits(dec_lm.config, dec_lm.params, batch, spec, None, layout)
    assert not np.allclose(np.asarray(got), np.asarray(bare), atol=1e-3)  # the tokens do change the logits


def test_encoder_add_token_start_at_z0_equals_placeholders_replaced(enc_lm):
    batch = data.encode_encoder("sst2", _examples(), enc_lm.tokenizer, n_prompt=N)
    spec = data.scoring_spec("sst2", enc_lm.tokenizer, "encoder", n_prompt=N)
    ids = [300, 301, 302]
    start = prompt.build_start(enc_lm, ids, N, "add")
    got = encoder.label_logits(enc_lm.config, enc_lm.params, batch, spec, start, mode="add")
    ph = data.placeholder_ids(enc_lm.tokenizer, N)
    assert np.all(batch.input_ids[:, 1 : 1 + N] == ph)
    written = batch.replace(input_ids=batch.input_ids.copy())
    written.input_ids[:, 1 : 1 + N] = ids
    want = encoder.label_logits(enc_lm.config, enc_lm.params, written, spec, None, mode="add")
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    assert err < 2e-6, err
    placeholders = encoder.label_logits(enc_lm.config, enc_lm.params, batch, spec, None, mode="add")
    # the random tiny encoder's logits are small: the tokens move them far more than the rounding error
    assert np.abs(np.asarray(got) - np.asarray(placeholders)).max() > 20 * max(err, 1e-6)
    # "zeros" in "add" mode adds nothing: BBT's placeholders, the reference's manual prompt
    zero = encoder.label_logits(enc_lm.config, enc_lm.params, batch, spec, prompt.start_prompt(None, N, 32), mode="add")
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(placeholders))


def _logits_of(lm, layout, p, kind):
    if kind == "decoder":
        batch = data.encode_decoder("sst2", _examples(), lm.tokenizer, n_prompt=N)
    else:
        batch = data.encode_encoder("sst2", _examples(), lm.tokenizer, n_prompt=N)
    spec = data.scoring_spec("sst2", lm.tokenizer, kind, n_prompt=N)
    scorer = objective.make_scorer(lm, layout, n_prompt_tokens=N)
    return np.asarray(scorer.logits(lm.params, scorer.prepare(lm.params, batch, spec), spec, p))


@pytest.mark.parametrize(
    "kind, layout", [("decoder", "after"), ("decoder", "before"), ("encoder", "add"), ("encoder", "cat")]
)
@pytest.mark.parametrize("start", ["zeros", "tokens:300,301,302", "phrase: In short", "array"])
def test_manual_prompt_equals_fedbpt_z0_under_every_start(dec_lm, enc_lm, kind, layout, start):
    lm = dec_lm if kind == "decoder" else enc_lm
    if start == "array":
        start = np.random.default_rng(3).normal(0, 0.02, (N, lm.hidden_size)).astype(np.float32)
    if isinstance(start, str) and start.startswith("phrase"):
        assert prompt.start_length(start, lm.tokenizer) == N, lm.tokenizer.tokenize(" In short")
    cfg = _cfg(layout=layout)
    model = ModelInputs.build(jax.random.key(0), lm, cfg, start=start)
    hp = fl.HParams().validate()
    fed_state = fl.fedbpt(cfg, lm).init(jax.random.key(1), hp)
    p_fed = fl.fedbpt(cfg, lm).global_prompt(fed_state, model)
    manual = fl.manual_prompt(cfg, lm)
    p_manual = manual.global_prompt(manual.init(jax.random.key(1), hp), model)
    p_central = fl.centralized_bbt(cfg, lm).global_prompt(
        fl.centralized_bbt(cfg, lm).init(jax.random.key(1), hp), model
    )
    fp = fl.fedprompt(cfg, lm)
    p_fedprompt = fp.global_prompt(fp.init(jax.random.key(1), hp), model)
    for p in (p_fed, p_central, p_fedprompt):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(p_manual))
    np.testing.assert_array_equal(_logits_of(lm, layout, p_fed, kind), _logits_of(lm, layout, p_manual, kind))
    is_zeros = isinstance(start, str) and start == "zeros"
    assert (np.abs(np.asarray(p_manual)).sum() == 0) == is_zeros


def test_run_manual_equals_fedbpt_round0_with_a_phrase_start(dec_lm):
    """Through ``run``: the manual baseline's evaluation equals FedBPT's round-0 evaluation (z = 0)."""
    fed = data.federated(
        "rotten_tomatoes",
        dec_lm.tokenizer,
        "decoder",
        num_clients=2,
        shots_per_class=2,
        alpha=None,
        n_prompt=N,
        test_size=12,
    )
    d = fl.FederatedData.from_host(fed)
    cfg = _cfg()
    model = ModelInputs.build(jax.random.key(0), dec_lm, cfg, start="phrase: In short")
    runs = {}
    for name in ("manual", "fedbpt"):
        algo = fl.make(name, cfg, dec_lm)
        _, hist = fl.run(
            algo, jax.random.key(2), d, fed.test, dec_lm, model, num_rounds=1, eval_chunk=6, progress=False
        )
        runs[name] = hist.evals
    assert runs["manual"][0]["loss"] == pytest.approx(runs["fedbpt"][0]["loss"], rel=1e-6)
    assert runs["manual"][0]["accuracy"] == runs["fedbpt"][0]["accuracy"]
    zeros = ModelInputs.build(jax.random.key(0), dec_lm, cfg)
    _, hist0 = fl.run(
        fl.make("manual", cfg, dec_lm),
        jax.random.key(2),
        d,
        fed.test,
        dec_lm,
        zeros,
        num_rounds=1,
        eval_chunk=6,
        progress=False,
    )
    assert hist0.evals[0]["loss"] != pytest.approx(runs["manual"][0]["loss"], rel=1e-4)


def test_start_is_a_jit_argument_not_a_closure(dec_lm):
    """Two starts of one shape: one trace, two different prompts (the start flows as an argument)."""
    cfg = _cfg()
    algo = fl.fedbpt(cfg, dec_lm)
    state = algo.init(jax.random.key(0), fl.HParams().validate())
    traces = []

    def f(model):
        traces.append(1)
        return algo.global_prompt(state, model)

    jf = jax.jit(f)
    a = jf(ModelInputs.build(jax.random.key(0), dec_lm, cfg, start=[10, 11, 12]))
    b = jf(ModelInputs.build(jax.random.key(0), dec_lm, cfg, start=[20, 21, 22]))
    assert len(traces) == 1 and not np.allclose(np.asarray(a), np.asarray(b))
    hlo = jf.lower(ModelInputs.build(jax.random.key(0), dec_lm, cfg, start=[10, 11, 12])).as_text()
    assert len(hlo) < 20_000  # no [n, H] constant embedded


# ------------------------------------------------------------------------------------------------
# Templates and verbalizers
# ------------------------------------------------------------------------------------------------
def test_bbt_style_mirrors_bbt_template(dec_tok):
    t = tasks.get("sst2").decoder_template("bbt")
    assert (t.text, t.cue, t.label_words) == ("{text}", " It was", (" terrible", " great"))
    assert "bbt" in tasks.get("mr").styles and "bbt" not in tasks.get("ag_news").styles
    with pytest.raises(
        ValueError,
        match=r"unknown decoder template style 'bbt' for task ag_news; known styles: "
        r"\['completion', 'chat', 'reference'\]",
    ):
        tasks.get("ag_news").decoder_template("bbt")
    ex = _examples(2)
    t2 = tasks.override("sst2", kind="decoder", style="bbt", label_words=(" bad", " great"))
    batch = data.encode_decoder(t2, ex, dec_tok, n_prompt=N, style="bbt")
    row = batch.input_ids[0][batch.attention_mask[0] > 0].tolist()
    assert row == dec_tok(ex.texts[0], add_special_tokens=False)["input_ids"]
    cue = data.decoder_cue_ids(t2, dec_tok, style="bbt")
    assert dec_tok.decode(cue.tolist()) == " It was"
    spec = data.scoring_spec(t2, dec_tok, "decoder", style="bbt")
    assert [dec_tok.decode([i]) for i in np.asarray(spec.label_ids)] == [" bad", " great"]


def test_override_decoder_and_encoder_templates(dec_tok, enc_tok):
    t = tasks.override("sst2", kind="decoder", template="Text: {text}", cue="\nAnswer:", label_words=[" bad", " great"])
    assert t.name == "sst2" and t.decoder_template().text == "Text: {text}"
    assert t.decoder_template("chat") == tasks.get("sst2").decoder_template("chat")
    spec = data.scoring_spec(t, dec_tok, "decoder")
    assert [dec_tok.decode([i]) for i in np.asarray(spec.label_ids)] == [" bad", " great"]
    e = tasks.override(
        "sst2", kind="encoder", template="{prompt} {text} . All in all , {mask} .", label_words=("bad", "great")
    )
    batch = data.encode_encoder(e, _examples(2), enc_tok, n_prompt=N)
    assert enc_tok.decode(batch.input_ids[0][batch.attention_mask[0] > 0].tolist()).endswith(
        ". All in all ,<mask> .</s>"
    )
    # A DecoderTemplate passed as the style is used as it is.
    own = tasks.DecoderTemplate("completion", "Q: {text}", " A:", (" no", " yes"))
    assert tasks.get("sst2").decoder_template(own) is own


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(kind="decoder", template="Review:"),
            r"decoder template text 'Review:' has no text slot; it needs \{text\}",
        ),
        (
            dict(kind="decoder", template="{text_a} vs {text_b}"),
            r"has slots \['text_a', 'text_b'\]; it needs exactly \{text\}",
        ),
        (dict(kind="decoder", cue=""), r"the completion decoder template 'Review: \{text\}' has no answer cue"),
        (dict(kind="decoder", label_words=(" bad",)), r"1 label words \(' bad',\) for 2 classes"),
        (dict(kind="encoder", template="{text} . It was {mask} ."), r"needs one \{prompt\} and one \{mask\}"),
        (dict(kind="encoder", template="{prompt} . It was {mask} ."), r"it needs exactly \{text\}"),
        (dict(kind="encoder", cue="x"), r"encoder templates have no cue"),
    ],
)
def test_override_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tasks.override("sst2", **kw)


def test_multi_token_verbalizer_is_an_error_unless_first_token(dec_tok):
    t = tasks.override("sst2", kind="decoder", label_words=(" terrible", " great"))
    assert len(dec_tok(" terrible", add_special_tokens=False)["input_ids"]) > 1
    with pytest.raises(ValueError, match=r"label word ' terrible' is \d+ tokens .* pass first_token=True"):
        data.scoring_spec(t, dec_tok, "decoder")
    first = dec_tok(" terrible", add_special_tokens=False)["input_ids"][0]
    assert int(data.scoring_spec(t, dec_tok, "decoder", first_token=True).label_ids[0]) == first


def test_dev_split_too_small_names_the_shots_and_what_fits():
    ex = data.Examples.from_rows("sst2", [("a", 0)] * 5 + [("b", 1)] * 9)
    with pytest.raises(ValueError, match=r"3 train \+ 3 dev shots per class: class 0 has 5.*at most 2 train \+ 2 dev"):
        data.few_shot(ex, 3, seed=0)
    with pytest.raises(ValueError, match=r"2 train \+ 4 dev shots per class: class 0 has 5.*at most 3 dev"):
        data.few_shot(ex, 2, seed=0, dev_shots_per_class=4)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_cli_prompt_start_template_and_errors(dec_lm, monkeypatch, capsys):
    monkeypatch.setattr(fb.models, "load", lambda name, **kw: dec_lm)
    rc = cli.main(["simulate", "--prompt-start", "ones", "--no-progress"])
    assert rc == 2 and "unknown prompt start 'ones'; accepted: zeros" in capsys.readouterr().err
    rc = cli.main(
        [
            "simulate",
            "--task",
            "rotten_tomatoes",
            "--prompt-start",
            "phrase: In short",
            "--n-prompt",
            "5",
            "--no-progress",
        ]
    )
    assert rc == 2 and "n_prompt_tokens=5; set n_prompt_tokens=3" in capsys.readouterr().err
    rc = cli.main(["simulate", "--task", "rotten_tomatoes", "--style", "bbt", "--no-progress"])
    assert rc == 2 and "label word ' terrible' is" in capsys.readouterr().err
    rc = cli.main(["simulate", "--task", "rotten_tomatoes", "--template", "no slot here", "--no-progress"])
    assert rc == 2 and "has no text slot" in capsys.readouterr().err
    rc = cli.main(
        [
            "simulate",
            "--task",
            "rotten_tomatoes",
            "--algorithm",
            "manual",
            "--style",
            "bbt",
            "--verbalizer",
            " bad| great",
            "--prompt-start",
            "phrase: In short",
            "--clients",
            "2",
            "--shots",
            "2",
            "--rounds",
            "1",
            "--d",
            "8",
            "--test-size",
            "8",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prompt start (the prompt at z = 0 and the manual baseline): phrase: In short, 3 tokens" in out
    # "auto" (the default): the task's measured start for decoders; its token count sets --n-prompt ...
    assert tasks.get("rotten_tomatoes").decoder_prompt_start == "phrase: (movie review)"
    n_movie = prompt.start_length("phrase: (movie review)", dec_lm.tokenizer)
    common = [
        "--algorithm",
        "manual",
        "--clients",
        "2",
        "--shots",
        "2",
        "--rounds",
        "1",
        "--d",
        "8",
        "--test-size",
        "8",
        "--no-progress",
    ]
    assert cli.main(["simulate", "--task", "rotten_tomatoes", *common]) == 0
    assert f"phrase: (movie review), {n_movie} tokens" in capsys.readouterr().out
    # ... and an explicit --n-prompt that does not fit it, or a task without one, gives zeros
    assert cli.main(["simulate", "--task", "rotten_tomatoes", "--n-prompt", "2", *common]) == 0
    out = capsys.readouterr().out
    assert "differs from the task's default start" in out and "manual baseline): zeros, 2 tokens" in out
    assert tasks.get("ag_news").decoder_prompt_start is None


def _prompt_start_experiment():
    """experiments/prompt_start.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "prompt_start.py"
    spec = importlib.util.spec_from_file_location("prompt_start_experiment", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prompt_start_experiment_runs_on_a_tiny_config(tmp_path):
    import json

    mod = _prompt_start_experiment()
    assert mod.main(["--tiny", "--task", "rotten_tomatoes", "--size", "12", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "prompt_start.json").read_text())
    assert out["meta"]["split"].startswith("train") and out["meta"]["size"] == 12
    assert len(out["rows"]) == len(mod.STARTS) * len(mod.STYLES)
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["share_positive"] <= 1.0 for r in out["rows"])
    assert "| phrase ' In short:' |" in (tmp_path / "prompt_start.md").read_text()


def test_prompt_start_experiment_scores_the_test_split_for_reporting(tmp_path):
    import json

    mod = _prompt_start_experiment()
    args = ["--tiny", "--task", "rotten_tomatoes", "--split", "test", "--size", "10", "--out", str(tmp_path)]
    assert mod.main(args) == 0
    out = json.loads((tmp_path / "prompt_start.json").read_text())
    assert out["meta"]["split"].startswith("test") and out["meta"]["size"] == 10
    assert out["meta"]["excluded_few_shot_candidates"] == 0
    assert "test examples" in (tmp_path / "prompt_start.md").read_text()
