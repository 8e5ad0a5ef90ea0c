"""FedPrompt, the white-box baseline: each sampled client tunes the soft prompt's offset with local Adam on
the gradients of the same loss (optax), and the server averages the prompts weighted by example counts.

The black-box algorithms (FedBPT and its BBT baselines) are :mod:`fedbpt_jax.federated.algorithms`, whose
:data:`~fedbpt_jax.federated.algorithms.ALGORITHMS` registers this one too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from .. import accounting, objective
from ..objective import Scorer
from .config import FedConfig, HParams, check_hparams, default_scorer
from .core import (
    AlgorithmCost,
    AlgorithmSpec,
    ClientSample,
    FederatedAlgorithm,
    FederatedData,
    ModelInputs,
    map_clients,
    sample_round,
)
from .diagnostics import client_diagnostics, scalars_only
from .registry import declares, hparams_read


class LocalAdam(NamedTuple):
    """A FedPrompt client's local optimisation as it is carried through its Adam steps."""

    prompt: jax.Array  # [n, H] the prompt offset being tuned
    opt_state: Any  # optax's Adam state


@flax.struct.dataclass
class PromptState:
    """FedPrompt server state: the global soft prompt's offset ``[n, H]`` from the prompt start
    (``model.start``; the deployed prompt is start + offset) and the round counter."""

    prompt: jax.Array
    round: jax.Array


def local_adam(scorer: Scorer, loss: str, steps: int, p0: jax.Array, batch, spec, hp: HParams, model: ModelInputs):
    """One FedPrompt client: ``steps`` Adam steps (optax) on the prompt offset from ``p0`` with the gradients
    of its masked mean ``loss`` on ``batch``; returns ``(final offset [n, H], its loss)``."""
    import optax

    opt = optax.adam(hp.learning_rate)
    ctx = scorer.prepare(model.params, batch, spec)

    def loss_fn(p):
        logits = scorer.logits(model.params, ctx, spec, p if model.start is None else p + model.start)
        return objective.masked_mean(objective.per_example_loss(logits, batch.labels, loss), batch.example_mask)

    def step(carry: LocalAdam, _):
        value, g = jax.value_and_grad(loss_fn)(carry.prompt)
        # optax's Adam raises its Python-float decay rates to the int32 step count (bias correction):
        # an implicit promotion, so its update is traced under JAX's standard promotion, whatever the
        # caller set (the tests run strict). Everything of ours around it is explicitly typed.
        with jax.numpy_dtype_promotion("standard"):
            upd, opt_state = opt.update(g, carry.opt_state, carry.prompt)
        return LocalAdam(prompt=optax.apply_updates(carry.prompt, upd), opt_state=opt_state), value

    final, losses = jax.lax.scan(step, LocalAdam(prompt=p0, opt_state=opt.init(p0)), None, length=steps)
    return final.prompt, loss_fn(final.prompt)


def average_prompts(prompts: jax.Array, losses: jax.Array, counts: jax.Array, active: jax.Array, old: jax.Array):
    """FedAvg of the clients' prompts ``[K, n, H]`` weighted by example counts, over the active clients whose
    loss and prompt are finite (a non-finite one would poison the average); ``old`` when there is none.

    Returns ``(new prompt, weights [K], total weight, usable [K], finite [K])``.
    """
    finite = jnp.isfinite(losses) & jnp.all(jnp.isfinite(prompts.reshape(prompts.shape[0], -1)), axis=-1)
    usable = active & finite
    w = counts.astype(jnp.float32) * usable.astype(jnp.float32)
    total = jnp.sum(w)
    clean = jnp.where(usable[:, None, None], prompts, 0.0)
    new = jnp.where(total > 0, jnp.einsum("k,knh->nh", w, clean) / jnp.maximum(total, 1e-12), old)
    return new, w, total, usable, finite


def _round_metrics(sample: ClientSample, spec, losses, w, total, usable, finite) -> dict:
    """A FedPrompt round's metrics, with the per-client diagnostics (``"clients"``)."""
    active = sample.active
    nw = jnp.maximum(jnp.sum(usable), 1).astype(jnp.float32)  # float32 like the losses it divides
    clients, summary = client_diagnostics(
        sample.index,
        sample.batch,
        sample.counts,
        active,
        spec,
        loss=losses,
        fitness=jnp.where(finite, losses, jnp.nan),
        weight=w / jnp.maximum(total, 1e-12),
        usable=usable,
    )
    return {
        "client_loss": jnp.sum(jnp.where(usable, losses, 0.0)) / nw,
        "sigma": jnp.asarray(0.0),
        "nonfinite_fitness": jnp.sum((active & ~finite).astype(jnp.int32)),
        "active_clients": jnp.sum(active.astype(jnp.int32)),
        "weight_total": total,
        **summary,
        "clients": clients,
    }


@declares()
def fedprompt(
    config: FedConfig, lm, *, local_steps: int | None = None, mesh=None, scorer: Scorer | None = None
) -> FederatedAlgorithm:
    """FedPrompt: white-box soft-prompt tuning (gradients w.r.t. the prompt embeddings, Adam via optax),
    FedAvg of the prompts weighted by example counts. Local steps default to ``local_generations``."""
    scorer = scorer or default_scorer(config, lm)
    steps = local_steps or config.local_generations
    n, hidden = config.n_prompt_tokens, lm.hidden_size

    def init(key, hp):
        check_hparams(hp)
        # The state holds the offset from the prompt start (model.start): zero = FedBPT's z = 0 prompt.
        return PromptState(prompt=jnp.zeros((n, hidden), jnp.float32), round=jnp.asarray(0, jnp.int32))

    def round_detailed(key, state: PromptState, data: FederatedData, hp: HParams, model: ModelInputs):
        sample = sample_round(key, data, hp, config)
        prompts, losses = map_clients(
            lambda k, b: local_adam(scorer, config.loss, steps, state.prompt, b, data.spec, hp, model),
            (sample.keys, sample.batch),
            config.chunk_clients,
            mesh,
        )
        new, w, total, usable, finite = average_prompts(prompts, losses, sample.counts, sample.active, state.prompt)
        metrics = _round_metrics(sample, data.spec, losses, w, total, usable, finite)
        return PromptState(prompt=new, round=state.round + 1), metrics

    def global_prompt(state: PromptState, model):
        return state.prompt if model.start is None else state.prompt + model.start

    # Each local step is a forward and a backward pass (≈ 2 forwards), plus the final loss.
    cost = AlgorithmCost(
        comm=accounting.prompt_bytes(n, hidden, lm.num_params()), forward_calls=3 * steps + 1, prefix_passes=1
    )
    spec = AlgorithmSpec(
        config,
        cost,
        mesh=mesh,
        scorer=scorer,
        round_detailed=round_detailed,
        hparams=hparams_read("fedprompt", config),
        **fedprompt.declares,
    )
    return FederatedAlgorithm("fedprompt", init, scalars_only(round_detailed), global_prompt, spec)
