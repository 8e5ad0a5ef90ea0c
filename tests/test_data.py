"""Data: loaders (shared folder, local files, hub, embedded), few-shot, tokenising, partitions."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import tokenizers_util as tu
from fedbpt_jax import assets, data, templates
from fedbpt_jax.types import TokenBatch

DATA = tu.data_dir()
# Optional integration tests on the shared-data layout (../shared/data or $FEDBPT_JAX_DATA); everything else
# uses data the tests write or the registry-shipped Rotten Tomatoes snippets.
needs_data = pytest.mark.skipif(
    not (DATA / "sst2").is_dir(),
    reason=f"optional: no shared data folder at {DATA} (set FEDBPT_JAX_DATA to a folder with sst2/, ag_news/, mr/)",
)
needs_rt = pytest.mark.skipif(not assets.is_cached("rotten-tomatoes-csv"), reason="Rotten Tomatoes asset not cached")


def _ex(task, rows):
    return data.Examples.from_rows(task, rows)


# ------------------------------------------------------------------------------------------------ loading


@needs_data
def test_shared_folder_loader():
    train = data.load_task_data("sst2")
    test = data.load_task_data("sst2", split="test")
    assert len(train) == 66983 and len(test) == 872
    assert train.labels.dtype == np.int32 and set(np.unique(train.labels)) == {0, 1}
    assert test[0] == data.Example("it 's a charming and often affecting journey .", 1)
    ag = data.load_task_data("ag_news", DATA, split="train")  # folder of task folders
    assert len(ag) == 9987 and ag.class_counts().shape == (4,)
    # CSV-quoted fields are unquoted; raw fields that merely contain quotes are left alone
    assert any('said on Tuesday "major neglect" by U.S.-led' in t for t in ag.texts)
    mr = data.load_task_data("mr", DATA / "mr")  # the task folder itself
    assert any(t.startswith('" brown sugar " admirably') for t in mr.texts)


def test_env_var_overrides_the_data_dir(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\ngood film\t1\nbad film\t0\n")
    monkeypatch.setenv("FEDBPT_JAX_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    ex = data.load_task_data("sst2")
    assert ex.texts == ("good film", "bad film") and ex.labels.tolist() == [1, 0]
    with pytest.raises(FileNotFoundError, match="test"):
        data.load_task_data("sst2", split="test")


def test_local_files_csv_tsv_json_jsonl_parquet(tmp_path):
    import pandas as pd

    rows = pd.DataFrame({"sentence": ["a fine film", "dull", "NA"], "label": ["positive", "negative", "1"]})
    rows.to_csv(tmp_path / "d.csv", index=False)
    rows.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    rows.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    (tmp_path / "d.json").write_text(json.dumps(rows.to_dict(orient="records")))
    rows.assign(label=[1, 0, 1]).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.tsv", "d.jsonl", "d.json", "d.parquet"):
        ex = data.load_task_data("sst2", tmp_path / name, cache_dir=str(tmp_path / "cache"))
        assert ex.texts == ("a fine film", "dull", "NA"), name  # "NA" stays text
        assert ex.labels.tolist() == [1, 0, 1], name


def test_local_pair_file_and_column_mapping(tmp_path):
    import pandas as pd

    pd.DataFrame(
        {
            "p": ["A man sleeps.", "It rains."],
            "h": ["A person rests.", "It is dry."],
            "gold": ["entailment", "not_entailment"],
        }
    ).to_csv(tmp_path / "rte.csv", index=False)
    ex = data.load_task_data(
        "rte",
        tmp_path / "rte.csv",
        cache_dir=str(tmp_path / "c"),
        columns={"text_a": "p", "text_b": "h", "label": "gold"},
    )
    assert ex[0] == data.Example(("A man sleeps.", "A person rests."), 0) and ex.labels.tolist() == [0, 1]


def test_missing_columns_error_names_file_columns_and_needs(tmp_path):
    import pandas as pd

    pd.DataFrame({"review_body": ["x"], "stars": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError) as err:
        data.load_task_data("sst2", tmp_path / "bad.csv", cache_dir=str(tmp_path / "c"))
    msg = str(err.value)
    assert "bad.csv" in msg and "review_body" in msg and "stars" in msg and "'text'" in msg and "columns=" in msg


def test_bad_label_values_error(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["x", "y", "z"], "label": ["positive", "neutral", "7"]}).to_csv(
        tmp_path / "l.csv", index=False
    )
    with pytest.raises(ValueError) as err:
        data.load_task_data("sst2", tmp_path / "l.csv", cache_dir=str(tmp_path / "c"))
    msg = str(err.value)
    assert "'neutral'" in msg and "'7'" in msg and "'positive'" not in msg.split("accepted")[0]
    assert "0..1" in msg and "negative" in msg
    with pytest.raises(ValueError, match=r"labels \[2, 5\]"):
        _ex("sst2", [("a", 2), ("b", 5), ("c", 1)])


def test_unknown_file_type_and_missing_path(tmp_path):
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="unknown file type"):
        data.load_task_data("sst2", tmp_path / "x.xlsx")
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        data.load_task_data("sst2", str(tmp_path / "nope.csv"))


def test_single_data_file_is_split_into_disjoint_pool_and_test(tmp_path, dec_tok):
    """One --data file never becomes both the training pool and the test set: it is split (seeded,
    class-stratified, identical texts on one side), or refused when too small."""
    import pandas as pd

    texts = [f"review number {i} {'good' if i % 2 else 'bad'}" for i in range(60)]
    texts += texts[:6]  # exact duplicates must stay on one side
    labels = [i % 2 for i in range(60)] + [i % 2 for i in range(6)]
    pd.DataFrame({"sentence": texts, "label": labels}).to_csv(tmp_path / "all.csv", index=False)
    cache = str(tmp_path / "c")
    pool, test = data.pool_and_test("sst2", tmp_path / "all.csv", cache_dir=cache)
    assert len(pool) + len(test) == 66
    assert not set(pool.texts) & set(test.texts)
    assert test.class_counts().tolist() == [round(0.2 * 33)] * 2  # stratified: 20 % of each class
    again_pool, again_test = data.pool_and_test("sst2", tmp_path / "all.csv", cache_dir=cache)
    assert again_test.texts == test.texts and again_pool.texts == pool.texts  # seeded
    other = data.pool_and_test("sst2", tmp_path / "all.csv", split_seed=1, cache_dir=cache)[1]
    assert other.texts != test.texts
    # Through data.federated (what --data FILE uses): train, dev and test hold disjoint texts.
    fed = data.federated(
        "sst2", dec_tok, "decoder", num_clients=2, shots_per_class=4, n_prompt=2, source=str(tmp_path / "all.csv")
    )
    assert len(fed.test.labels) == len(test)
    # A file too small to give every class a pool example and a test set is refused, naming it.
    pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}).to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(ValueError, match=r"tiny.csv.*2 examples.*too small to split"):
        data.pool_and_test("sst2", tmp_path / "tiny.csv", cache_dir=cache)
    # Sources with their own splits are unchanged (a folder in the shared-data layout, written here).
    (tmp_path / "layout" / "sst2").mkdir(parents=True)
    (tmp_path / "layout" / "sst2" / "train.tsv").write_text("text\tlabel\ngood film\t1\nbad film\t0\nfine\t1\n")
    (tmp_path / "layout" / "sst2" / "test.tsv").write_text("text\tlabel\ndull\t0\n")
    pool2, test2 = data.pool_and_test("sst2", tmp_path / "layout")
    assert pool2.texts == ("good film", "bad film", "fine") and test2.texts == ("dull",)


def test_hub_source_maps_columns_splits_and_drops(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        if name == "stanfordnlp/snli":
            return datasets.Dataset.from_dict(
                {"premise": ["p1", "p2", "p3"], "hypothesis": ["h1", "h2", "h3"], "label": [0, -1, 2]}
            )
        return datasets.Dataset.from_dict({"idx": [0, 1], "sentence": ["s0", "s1"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    snli = data.load_task_data("snli", split="test")  # no shared folder for snli: the hub
    assert calls[-1] == ("stanfordnlp/snli", None, "test")
    assert snli.texts == (("p1", "h1"), ("p3", "h3")) and snli.labels.tolist() == [0, 2]  # -1 dropped
    sst = data.load_task_data("sst2", "hub", split="test")
    assert calls[-1] == ("nyu-mll/glue", "sst2", "validation") and sst.texts == ("s0", "s1")
    data.load_task_data("sst2", "glue", split="train")  # BBT's name resolves to the task's hub id
    assert calls[-1] == ("nyu-mll/glue", "sst2", "train")
    data.load_task_data("sst2", "someone/my-sst:default")
    assert calls[-1] == ("someone/my-sst", "default", "train")

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="Offline, pass a local file or folder"):
        data.load_task_data("dbpedia", "hub")


@needs_rt
def test_rotten_tomatoes_split_is_group_aware_stratified_and_seeded():
    train = data.load_task_data("rotten_tomatoes")
    test = data.load_task_data("rotten_tomatoes", split="test")
    assert set(train.groups.tolist()).isdisjoint(test.groups.tolist())  # a movie is on one side only
    n = len(train) + len(test)
    assert 12_000 < n < 12_808  # 12,808 fresh/rotten snippets, exact duplicates kept once
    assert abs(len(test) / n - 0.2) < 0.005
    p_all = (train.labels.sum() + test.labels.sum()) / n
    assert abs(test.labels.mean() - p_all) < 0.005 and abs(train.labels.mean() - p_all) < 0.005
    assert not set(train.texts) & set(test.texts)
    again = data.load_task_data("rotten_tomatoes", split="test")
    assert again.texts == test.texts
    other = data.load_task_data("rotten_tomatoes", split="test", seed=1)
    assert other.texts != test.texts and not set(other.groups.tolist()) & set(
        data.load_task_data("rotten_tomatoes", seed=1).groups.tolist()
    )


def test_group_stratified_split_unit():
    labels = np.array([0, 1] * 50)
    groups = np.repeat(np.arange(25), 4)
    m = data.group_stratified_split(labels, groups, 0.2, seed=3)
    assert m.sum() == 20 and labels[m].sum() == 10
    assert all(len(set(m[groups == g])) == 1 for g in range(25))


# ------------------------------------------------------------------------------------------------ few-shot


def test_few_shot_counts_disjoint_and_deterministic():
    labels = np.array([0] * 30 + [1] * 50 + [2] * 20)
    tr, dv = data.few_shot_indices(labels, 4, seed=7, num_labels=3)
    assert np.bincount(labels[tr], minlength=3).tolist() == [4, 4, 4]
    assert np.bincount(labels[dv], minlength=3).tolist() == [4, 4, 4]
    assert not set(tr) & set(dv)
    tr2, dv2 = data.few_shot_indices(labels, 4, seed=7, num_labels=3)
    assert tr.tolist() == tr2.tolist() and dv.tolist() == dv2.tolist()
    tr3, _ = data.few_shot_indices(labels, 4, seed=8, num_labels=3)
    assert tr.tolist() != tr3.tolist()
    # BBT's walk: train is the first k of each class in the seeded shuffle
    perm = np.random.default_rng(7).permutation(len(labels))
    first = [i for c in range(3) for i in [j for j in perm if labels[j] == c][:4]]
    assert sorted(first) == sorted(tr.tolist())
    a, b = data.few_shot_indices(labels, -1, seed=0)
    assert len(a) == 90 and len(b) == 10 and not set(a) & set(b)
    _, d1 = data.few_shot_indices(labels, 4, seed=7, num_labels=3, dev_shots_per_class=0)
    assert len(d1) == 0


def test_few_shot_too_few_error_names_class_and_counts():
    ex = _ex("ag_news", [("t", 0)] * 10 + [("t", 1)] * 3 + [("t", 2)] * 10 + [("t", 3)] * 10)
    with pytest.raises(ValueError) as err:
        data.few_shot(ex, 2, seed=0)
    msg = str(err.value)
    assert "class 1 has 3" in msg and "1=Sports" in msg and "2 train + 2 dev" in msg
    tr, dv = data.few_shot(ex, 1, seed=0)
    assert tr.class_counts().tolist() == [1, 1, 1, 1] and len(dv) == 4


@needs_data
def test_few_shot_on_shared_data():
    pool = data.load_task_data("sst2")
    tr, dv = data.few_shot(pool, 16, seed=42)
    assert tr.class_counts().tolist() == [16, 16] and dv.class_counts().tolist() == [16, 16]
    tr2, _ = data.few_shot(pool, 16, seed=42)
    tr3, _ = data.few_shot(pool, 16, seed=43)
    assert tr.texts == tr2.texts and tr.texts != tr3.texts


# ------------------------------------------------------------------------------------------------ tokenising

SENTS = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the plot is nothing but boilerplate clichés", 0),
    ("it 's a charming and often affecting journey .", 1),
]


def test_encoder_layout_matches_whole_string_bbt(enc_tok):
    n = 5  # decode/re-encode of ids 1000..1004 round-trips on this tokenizer
    b = data.encode_encoder("sst2", _ex("sst2", SENTS), enc_tok, n_prompt=n)
    assert isinstance(b, TokenBatch) and b.input_ids.dtype == np.int32
    ph = enc_tok.decode(list(range(1000, 1000 + n)))
    for i, (text, label) in enumerate(SENTS):
        real = b.input_ids[i][b.attention_mask[i] == 1].tolist()
        # BBT: tokenizer.encode("<P> . {sentence} . It was <mask> .")
        assert real == enc_tok(f"{ph} . {text} . It was <mask> .")["input_ids"]
        assert real[0] == enc_tok.bos_token_id and real[-1] == enc_tok.eos_token_id
        assert b.input_ids[i, 1 : n + 1].tolist() == list(range(1000, 1000 + n))
        assert b.input_ids[i, b.answer_pos[i]] == enc_tok.mask_token_id
        k = int(b.attention_mask[i].sum())
        assert b.attention_mask[i, :k].all() and not b.attention_mask[i, k:].any()  # right padding
        assert (b.input_ids[i, k:] == enc_tok.pad_token_id).all()
    assert b.labels.tolist() == [1, 0, 1] and b.example_mask.tolist() == [1, 1, 1]
    assert b.seq_len % 8 == 0


def test_encoder_placeholder_falls_back_to_raw_ids(enc_tok):
    # 50 ids do not re-tokenise to 50 tokens with this tokenizer: the ids themselves fill 1..50
    ids = data.placeholder_ids(enc_tok, 50)
    assert ids.tolist() == list(range(1000, 1050))
    with pytest.raises(ValueError, match="gives"):
        data.placeholder_ids(enc_tok, 50, mode="retokenize")
    b = data.encode_encoder("ag_news", _ex("ag_news", [("Stocks fell sharply on Monday .", 2)]), enc_tok)
    assert b.input_ids[0, 1:51].tolist() == list(range(1000, 1050))
    assert b.answer_pos[0] == 51 + len(enc_tok(" .", add_special_tokens=False)["input_ids"])  # "<P> . <mask>"
    with pytest.raises(ValueError, match="vocabulary has 1500"):
        data.placeholder_ids(enc_tok, 600)


def test_encoder_truncates_text_not_template(enc_tok):
    long = " ".join(["wonderful"] * 400)
    b = data.encode_encoder("sst2", _ex("sst2", [(long, 1), ("short .", 0)]), enc_tok, n_prompt=50)
    assert b.seq_len == 512  # capped at the tokenizer's model_max_length
    row = b.input_ids[0].tolist()
    tail = enc_tok(" . It was", add_special_tokens=False)["input_ids"]
    assert row[-1] == enc_tok.eos_token_id and row[b.answer_pos[0]] == enc_tok.mask_token_id
    assert row[b.answer_pos[0] - len(tail) : b.answer_pos[0]] == tail
    b2 = data.encode_encoder("sst2", _ex("sst2", [(long, 1)]), enc_tok, n_prompt=50, max_length=80)
    assert b2.seq_len == 80 and b2.attention_mask.sum() == 80
    pair = data.encode_encoder(
        "rte", _ex("rte", [(("x " * 300, "short hypothesis ."), 0)]), enc_tok, n_prompt=5, max_length=64
    )
    assert pair.attention_mask.sum() == 64
    assert enc_tok.decode(pair.input_ids[0]).endswith("? <mask> , short hypothesis .</s>".replace(" <mask>", "<mask>"))
    with pytest.raises(ValueError) as err:
        data.encode_encoder("sst2", _ex("sst2", SENTS), enc_tok, n_prompt=50, max_positions=40)
    assert "template alone is" in str(err.value) and "context of 40" in str(err.value)


def test_text_with_special_token_strings_stays_text(enc_tok):
    b = data.encode_encoder("sst2", _ex("sst2", [("a <mask> in the text", 1)]), enc_tok, n_prompt=5)
    assert (b.input_ids[0] == enc_tok.mask_token_id).sum() == 1


def test_decoder_left_padding_and_cue(dec_tok):
    b = data.encode_decoder("sst2", _ex("sst2", SENTS), dec_tok, n_prompt=10, max_positions=2048)
    T = b.seq_len
    assert b.answer_pos.tolist() == [T - 1] * 3
    for i, (text, _) in enumerate(SENTS):
        real = b.input_ids[i][b.attention_mask[i] == 1].tolist()
        assert real == dec_tok(f"Review: {text}", add_special_tokens=False)["input_ids"]  # no BOS
        k = len(real)
        assert not b.attention_mask[i, : T - k].any() and b.attention_mask[i, T - k :].all()  # left padding
        assert (b.input_ids[i, : T - k] == dec_tok.pad_token_id).all()
    cue = data.decoder_cue_ids("sst2", dec_tok)
    assert cue.tolist() == dec_tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    spec = data.scoring_spec("sst2", dec_tok, "decoder")
    assert spec.cue_ids.tolist() == cue.tolist() and spec.vocab_size == len(dec_tok)


def test_decoder_chat_style_layout(dec_tok):
    b = data.encode_decoder("mrpc", _ex("mrpc", [(("One .", "Two ."), 1)]), dec_tok, n_prompt=0, style="chat")
    s = dec_tok.decode(b.input_ids[0][b.attention_mask[0] == 1])
    assert s.startswith("<|im_start|>user\nDo the following two sentences mean the same thing?")
    assert s.endswith("Sentence 1: One .\nSentence 2: Two .")
    cue = data.decoder_cue_ids("mrpc", dec_tok, style="chat")
    assert dec_tok.decode(cue) == "<|im_end|>\n<|im_start|>assistant\n"


def test_decoder_bos_only_when_the_tokenizer_adds_one(enc_tok):
    # a tokenizer whose post-processor adds <s> gets it (and no </s>)
    b = data.encode_decoder("sst2", _ex("sst2", SENTS[:1]), enc_tok, n_prompt=0)
    real = b.input_ids[0][b.attention_mask[0] == 1].tolist()
    assert real[0] == enc_tok.bos_token_id and real[-1] != enc_tok.eos_token_id
    assert real[1:] == enc_tok("Review: " + SENTS[0][0], add_special_tokens=False)["input_ids"]


def test_decoder_context_errors_and_truncation(dec_tok):
    long = " ".join(["boring"] * 300)
    ex = _ex("sst2", [(long, 0), ("fine .", 1)])
    with pytest.raises(ValueError) as err:
        data.encode_decoder("sst2", ex, dec_tok, n_prompt=50, max_positions=256)
    msg = str(err.value)
    assert "example 0" in msg and "prompt (50)" in msg and "cue (3)" in msg and "context of 256" in msg
    assert "max_length<=203" in msg and "--max-length 203" in msg
    with pytest.raises(
        ValueError,
        match=r"the prompt and cue alone take 256: use fewer prompt tokens "
        r"\(n_prompt / --n-prompt at most 252\)",
    ):
        data.encode_decoder("sst2", ex, dec_tok, n_prompt=253, max_positions=256)
    with pytest.raises(ValueError, match=r"= 313 tokens exceeds the model's context of 256"):
        data.encode_decoder("sst2", ex, dec_tok, n_prompt=50, max_positions=256, max_length=260)
    b = data.encode_decoder("sst2", ex, dec_tok, n_prompt=50, max_positions=256, max_length=64)
    assert b.seq_len == 64 and b.attention_mask[0].all()
    text0 = dec_tok.decode(b.input_ids[0])
    assert text0.startswith("Review: boring boring")
    assert dec_tok.decode(b.input_ids[1][b.attention_mask[1] == 1]) == "Review: fine ."


def test_tokenize_dispatch_and_scoring_spec(enc_tok):
    ex = _ex("sst2", SENTS)
    assert (
        data.tokenize("sst2", ex, enc_tok, "encoder", n_prompt=5).seq_len
        == data.encode_encoder("sst2", ex, enc_tok, n_prompt=5).seq_len
    )
    spec = data.scoring_spec("sst2", enc_tok, "encoder", n_prompt=5, exempt_pad_to=16)
    assert spec.cue_ids.shape == (0,) and spec.vocab_size == 1500
    ex_ids = spec.exempt_ids[spec.exempt_ids >= 0].tolist()
    assert set(enc_tok.all_special_ids) | {1000, 1001, 1002, 1003, 1004, enc_tok.mask_token_id} == set(ex_ids)
    assert spec.exempt_ids.shape == (16,) and (spec.exempt_ids[len(ex_ids) :] == -1).all()
    assert spec.label_ids.tolist() == templates.label_token_ids("sst2", enc_tok, "encoder").tolist()
    with pytest.raises(ValueError, match="unknown backbone kind"):
        data.tokenize("sst2", ex, enc_tok, "rnn")


# ------------------------------------------------------------------------------------------------ partitions


def _covers_once(part, n):
    assert np.sort(np.concatenate(list(part.parts))).tolist() == list(range(n))
    assert part.counts.sum() == n and [len(p) for p in part.parts] == part.counts.tolist()


def test_partition_iid():
    p = data.partition_iid(np.zeros(103), 10, seed=0)
    _covers_once(p, 103)
    assert sorted(set(p.counts.tolist())) == [10, 11]
    assert [a.tolist() for a in p.parts] == [a.tolist() for a in data.partition_iid(103, 10, seed=0).parts]
    assert p.parts.order.tolist() != data.partition_iid(103, 10, seed=1).parts.order.tolist()
    with pytest.raises(ValueError, match="5 examples cannot give each of 8 clients"):
        data.partition_iid(5, 8, seed=0)


def test_partition_dirichlet_covers_once_and_skew_grows_as_alpha_shrinks():
    labels = np.repeat([0, 1, 2, 3], 100)
    skew = {}
    for alpha in (100.0, 1.0, 0.1):
        vals = []
        for seed in range(5):
            p = data.partition_dirichlet(labels, 10, alpha, seed)
            _covers_once(p, len(labels))
            assert p.counts.min() >= 1
            vals.append(data.label_skew(labels, p))
        skew[alpha] = np.mean(vals)
    assert skew[100.0] + 0.1 < skew[1.0] < skew[0.1] - 0.05
    a = data.partition_dirichlet(labels, 10, 0.5, seed=3)
    b = data.partition_dirichlet(labels, 10, 0.5, seed=3)
    assert a.parts.order.tolist() == b.parts.order.tolist()
    u = data.partition_dirichlet(labels, 10, 0.5, seed=3, prior="uniform")
    _covers_once(u, len(labels))
    f = data.partition_dirichlet(labels, 10, 0.5, seed=3, method="per_class")
    _covers_once(f, len(labels))


def test_partition_dirichlet_min_size_and_errors():
    labels = np.repeat([0, 1], 40)  # the paper's SST-2 setting: 80 examples, 10 clients
    for seed in range(10):
        p = data.partition_dirichlet(labels, 10, 0.01, seed, min_size=4)
        _covers_once(p, 80)
        assert p.counts.min() >= 4
    with pytest.raises(ValueError, match="80 examples cannot give each of 30 clients at least 3"):
        data.partition_dirichlet(labels, 30, 1.0, 0, min_size=3)
    with pytest.raises(ValueError, match="alpha"):
        data.partition_dirichlet(labels, 2, 0.0, 0)


def test_min_norm_sizes_solves_the_reference_qp():
    scipy_opt = pytest.importorskip("scipy.optimize")
    n_c = np.array([300.0, 200.0, 100.0])
    # seed 0 draws an infeasible system (n_c outside the cone of the 8 proportion vectors): None
    assert data.min_norm_sizes(np.random.default_rng(0).dirichlet([0.5, 0.5, 0.5], size=8), n_c) is None
    pi = np.random.default_rng(1).dirichlet([0.5, 0.5, 0.5], size=8)
    x = data.min_norm_sizes(pi, n_c)
    assert x is not None and (x >= 0).all() and np.allclose(pi.T @ x, n_c)
    ref = scipy_opt.minimize(
        lambda v: v @ v,
        np.full(8, 50.0),
        jac=lambda v: 2 * v,
        method="SLSQP",
        bounds=[(0, None)] * 8,
        options={"ftol": 1e-12, "maxiter": 500},
        constraints=[{"type": "eq", "fun": lambda v: pi.T @ v - n_c}],
    )
    assert ref.success and abs(x @ x - ref.fun) < 1e-6 * ref.fun
    # infeasible (class 2 wanted by nobody): None, so the caller falls back
    assert data.min_norm_sizes(np.array([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]), n_c) is None


def test_ten_thousand_clients_is_fast():
    labels = np.random.default_rng(0).integers(0, 4, size=100_000)
    t0 = time.perf_counter()
    p = data.partition_dirichlet(labels, 10_000, 0.5, seed=0)
    q = data.partition_iid(labels, 10_000, seed=0)
    B, T = len(labels), 16
    batch = TokenBatch(
        np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        np.ones((B, T), np.int32),
        np.zeros(B, np.int32),
        labels.astype(np.int32),
        np.ones(B, np.float32),
    )
    fed, counts = data.federated_batches(batch, p)
    assert time.perf_counter() - t0 < 2.0
    _covers_once(p, B)
    _covers_once(q, B)
    assert fed.input_ids.shape == (10_000, counts.max(), T)
    assert (fed.labels[fed.example_mask > 0] == labels[p.parts.order]).all()


def test_federated_batches_padding_and_masks():
    B, T = 7, 4
    batch = TokenBatch(
        np.arange(B * T, dtype=np.int32).reshape(B, T),
        np.ones((B, T), np.int32),
        np.arange(B, dtype=np.int32),
        np.arange(B, dtype=np.int32) % 2,
        np.ones(B, np.float32),
    )
    parts = [np.array([3, 1]), np.array([0, 2, 4, 6]), np.array([5])]
    fed, counts = data.federated_batches(batch, parts)
    assert counts.tolist() == [2, 4, 1] and fed.input_ids.shape == (3, 4, T)
    assert fed.example_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert fed.answer_pos[1].tolist() == [0, 2, 4, 6] and fed.answer_pos[0, :2].tolist() == [3, 1]
    assert fed.answer_pos[2].tolist() == [5, 5, 5, 5]  # padding rows copy the client's own example
    assert fed.input_ids[0, 0].tolist() == batch.input_ids[3].tolist()
    padded, _ = data.federated_batches(batch, parts, pad_to=6)
    assert padded.input_ids.shape == (3, 6, T) and padded.example_mask.sum() == 7
    with pytest.raises(ValueError, match="pad_to=3 is smaller than the largest client"):
        data.federated_batches(batch, parts, pad_to=3)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        data.federated_batches(batch, [np.array([7])])


def test_federated_end_to_end(enc_tok, dec_tok):
    fed = data.federated(
        "rotten_tomatoes",
        enc_tok,
        "encoder",
        num_clients=10,
        shots_per_class=8,
        alpha=1.0,
        seed=0,
        n_prompt=5,
        test_size=50,
    )
    assert fed.train.input_ids.shape[:1] == (10,) and fed.train_counts.sum() == 16
    assert fed.dev.labels.shape == (16,) and fed.test.labels.shape == (50,)
    assert fed.spec.label_ids.shape == (2,)
    assert fed.train.example_mask.sum(1).tolist() == fed.train_counts.tolist()
    d = data.federated(
        "rotten_tomatoes",
        dec_tok,
        "decoder",
        num_clients=4,
        shots_per_class=4,
        seed=1,
        n_prompt=5,
        max_positions=2048,
        test_size=10,
        style="chat",
    )
    assert d.train.input_ids.shape[:2] == (4, 2) and d.spec.cue_ids.size > 0
    assert (d.train.answer_pos == d.train.input_ids.shape[-1] - 1).all()


def test_max_length_bounds_but_does_not_force_the_padded_length(enc_tok, dec_tok):
    """Short texts are padded to the longest example present (rounded to 8), not to max_length, unless a
    fixed shape is asked for; the tokens themselves are the same either way."""
    ex = _ex("sst2", [("a fine film .", 1), ("dull .", 0)])
    short = data.encode_decoder("sst2", ex, dec_tok, n_prompt=5, max_length=256)
    fixed = data.encode_decoder("sst2", ex, dec_tok, n_prompt=5, max_length=256, pad_to_max_length=True)
    longest = int(short.attention_mask.sum(1).max())
    assert short.seq_len == -(-longest // 8) * 8 < 256 and fixed.seq_len == 256
    for i in range(2):
        assert (
            short.input_ids[i][short.attention_mask[i] == 1].tolist()
            == fixed.input_ids[i][fixed.attention_mask[i] == 1].tolist()
        )
    e_short = data.encode_encoder("sst2", ex, enc_tok, n_prompt=5, max_length=256)
    e_fixed = data.encode_encoder("sst2", ex, enc_tok, n_prompt=5, max_length=256, pad_to_max_length=True)
    assert e_short.seq_len < 256 and e_fixed.seq_len == 256
    np.testing.assert_array_equal(e_short.answer_pos, e_fixed.answer_pos)


def test_one_name_per_type_host_splits_and_device_arrays():
    """The host-side result of ``data.federated`` is ``FederatedSplits``; ``fedbpt_jax.FederatedData`` is the
    device-side type; the host type's earlier name still works, with a deprecation warning."""
    import fedbpt_jax as fb

    assert data.FederatedSplits is not fb.FederatedData
    with pytest.warns(DeprecationWarning, match="now fedbpt_jax.data.FederatedSplits"):
        assert data.FederatedData is data.FederatedSplits


def _folder(tmp_path, train_rows, test_rows, task="sst2"):
    d = tmp_path / "data" / task
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in train_rows))
    (d / "test.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in test_rows))
    return tmp_path / "data"


def test_a_pool_with_duplicates_and_test_texts_gives_disjoint_splits(tmp_path, dec_tok):
    """Duplicate pool texts keep one copy (none when their labels conflict), test texts leave the pool, and
    train, dev and test are disjoint by text on every seed; what went is counted and warned about."""
    from fedbpt_jax.data.integrity import DataOverlapWarning, clean_pool

    rows = [(f"film number {i} was {'good' if i % 2 else 'bad'}", i % 2) for i in range(40)]
    rows += rows[:10] * 2  # 20 extra copies, same labels
    rows += [("the same words", 0), ("the same words", 1)]  # conflicting labels: both go
    test_rows = [(f"test film {i}", i % 2) for i in range(8)] + [rows[20], rows[21]]  # 2 pool texts in test
    folder = _folder(tmp_path, rows, test_rows)
    pool, test = data.pool_and_test("sst2", folder)
    with pytest.warns(DataOverlapWarning, match="20 duplicate copies, 2 copies of texts with conflicting labels and 2"):
        clean, report = clean_pool(pool, test)
    assert (report.pool_before, report.pool_after) == (62, 38) and len(clean) == 38
    assert len(set(clean.texts)) == 38 and not set(clean.texts) & set(test.texts)
    for seed in range(5):
        with pytest.warns(DataOverlapWarning):
            fed = data.federated(
                "sst2",
                dec_tok,
                "decoder",
                num_clients=2,
                shots_per_class=6,
                dev_shots_per_class=6,
                n_prompt=2,
                source=str(folder),
                seed=seed,
            )

        def texts(b):
            ids = np.asarray(b.input_ids).reshape(-1, b.input_ids.shape[-1])
            mask = np.asarray(b.attention_mask).reshape(ids.shape) > 0
            keep = np.asarray(b.example_mask).reshape(-1) > 0 if b.example_mask is not None else np.ones(len(ids), bool)
            return [tuple(r[m]) for r, m, k in zip(ids, mask, keep) if k]

        tr, dv, te = texts(fed.train), texts(fed.dev), texts(fed.test)
        assert len(set(tr)) == len(tr) == 12 and len(set(dv)) == len(dv) == 12
        assert not set(tr) & set(dv) and not set(tr) & set(te) and not set(dv) & set(te)
    # clean=False keeps the earlier draws (duplicates and all), for reproducing runs made before the rule
    data.federated(
        "sst2", dec_tok, "decoder", num_clients=2, shots_per_class=6, n_prompt=2, source=str(folder), clean=False
    )


def test_empty_texts_a_folder_of_another_task_and_a_test_size_too_large_are_refused(tmp_path, dec_tok):
    folder = _folder(tmp_path, [("good", 1), ("  ", 0), ("bad", 0)], [("ok", 1)])
    with pytest.raises(ValueError, match=r"train.tsv: line 3 has an empty text"):
        data.load_task_data("sst2", folder)
    good = _folder(tmp_path / "g", [(f"t{i}", i % 2) for i in range(20)], [("ok", 1), ("no", 0)])
    with pytest.raises(ValueError, match=r"named after task 'sst2', but the task is 'mr'"):
        data.load_task_data("mr", good / "sst2")
    with pytest.raises(ValueError, match=r"test_size 3 for task sst2: its test split has 2 examples; accepted: 1..2"):
        data.federated(
            "sst2", dec_tok, "decoder", num_clients=2, shots_per_class=2, n_prompt=2, source=str(good), test_size=3
        )


def test_the_data_source_identity_names_files_and_hashes(tmp_path):
    from fedbpt_jax.data.sources import source_identity

    folder = _folder(tmp_path, [("good", 1), ("bad", 0)], [("ok", 1)])
    ident = source_identity("sst2", folder)
    assert ident["kind"] == "folder" and set(ident["sha256"]) == {"train.tsv", "test.tsv"}
    (folder / "sst2" / "test.tsv").write_text("text\tlabel\nok\t0\n")
    assert source_identity("sst2", folder)["sha256"]["test.tsv"] != ident["sha256"]["test.tsv"]
