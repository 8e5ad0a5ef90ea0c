"""The registry of backbone kinds is what the loaders, the scorers, the data encoders and the CLI read."""

import pytest

from fedbpt_jax import objective, tasks, testing
from fedbpt_jax.cli import main
from fedbpt_jax.federated import FedConfig
from fedbpt_jax.models import kind_of, kinds


def test_every_kind_names_modules_and_functions_that_exist():
    for k in kinds.KINDS.values():
        assert hasattr(k.backbone(), "word_embeddings"), k.name
        assert hasattr(k.hf(), "config_from_hf") and hasattr(k.hf(), "params_from_hf"), k.name
        assert callable(k.scorer_builder()) and callable(k.encoder_fn()), k.name
        assert k.layouts and set(k.layout_caches) <= set(k.layouts), k.name
        assert set(k.caches()) <= set(objective.SCORER_CACHES) - {"auto", "none"}, k.name
        for t in k.model_types:
            assert kind_of(t) == k.name
    assert objective.LAYOUTS == {k.name: k.layouts for k in kinds.KINDS.values()}
    # the task registry (which imports no model code) names the same kinds: a new kind needs its templates
    assert tasks.KINDS == tuple(kinds.KINDS)


def test_unknown_kinds_and_model_types_name_what_is_accepted():
    with pytest.raises(ValueError, match=r"unknown model kind 'rnn'; accepted: \('encoder', 'decoder'\)"):
        kinds.get("rnn")
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; accepted encoders \('roberta'.*decoders"):
        kinds.of_model_type("gpt2")


def test_the_scorer_is_the_kind_s_builder_and_its_default_layout():
    for lm in (testing.tiny_encoder(0), testing.tiny_decoder(0)):
        kind = kinds.get(lm.kind)
        s = objective.make_scorer(lm)
        assert s.layout == kind.layouts[0]
        assert (s.cache if hasattr(s, "cache") else "none") in (kind.layout_caches.get(s.layout, "none"), None)


def test_a_layout_no_kind_has_is_refused_before_anything_loads(capsys):
    with pytest.raises(ValueError, match=r"unknown layout 'sideways'; accepted: encoders \('add', 'cat'\)"):
        FedConfig(layout="sideways")
    # the CLI says it in one line, from the same registry
    assert main(["simulate", "--layout", "sideways", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "--layout 'sideways': accepted: 'after' or 'before' (decoders), 'add' or 'cat' (encoders)" in err
