"""Static configuration and numeric hyperparameters of a federated simulation.

Shapes, counts and names are static (a frozen, hashable dataclass validated on construction); floats
that a sweep may vary (σ₀, the perturbation rate, the dropout rate, learning rates) live in the
:class:`HParams` pytree passed to every call, so a sweep is a ``vmap``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .. import objective, prompt

SERVER_VARIANTS = ("reference", "paper")
SERVER_RANKINGS = ("fitness", "random")
CLIENT_KEYS = ("independent", "shared")
PERTURB_EVERY = ("round", "generation")
SAMPLING = ("uniform", "weighted")
SIGMA_SCHEDULES = ("none", "clamp")

#: Accepted ranges of the numeric hyperparameters (closed intervals, finite values only). Anything
#: outside is rejected at ``init`` and by :meth:`HParams.validate` with the value and the range: a σ₀ of
#: 1e30 overflows the first CMA-ES samples (NaN prompts from round 1), 1e-30 freezes the search.
HPARAM_RANGES = {
    "sigma0": (1e-6, 1e3),
    "perturb_rate": (0.0, 1.0),
    "dropout_rate": (0.0, 1.0),
    "learning_rate": (1e-8, 1e2),
}


def _choice(default: str, choices: tuple[str, ...]):
    """A string field with a closed set of values: ``metadata["choices"]`` lists them for the command line
    (:mod:`fedbpt_jax.cli_options`), which derives its flags from these dataclasses."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


@dataclasses.dataclass(frozen=True)
class FedConfig:
    """Static configuration of a federated prompt-tuning simulation.

    Defaults follow the paper's setting (docs/algorithm.md, "Options and defaults"): d = 500, 50 prompt tokens, λ = 5 local
    candidates, I = 8 local generations, 10 clients all participating, CE loss, perturbation on with
    the reference's r_p default 0.5 (in :class:`HParams`), the reference server.

    Attributes:
      num_clients: N, clients held (as padded arrays).
      clients_per_round: K, clients sampled each round (static; without replacement, see sampling).
      population_size: λ, local CMA-ES population.
      local_generations: I, local CMA-ES generations per round.
      intrinsic_dim: d, the dimension of the searched subspace (the prompt is start + A z, z in R^d).
      n_prompt_tokens: soft prompt length.
      loss: "ce" | "hinge" | "accuracy".
      perturb: use the perturbation-regularised fitness (reference flag ``perturb``).
      fitness_form: "ratio_of_means" (reference code, default) | "mean_of_ratios" (paper eq. 7).
      perturb_every: "round" (reference: one perturbed copy per round) | "generation".
      exempt_special: keep special/placeholder/mask tokens out of the perturbation (reference: no).
      server_variant: "reference" (pycma-3.4-like server, default) | "paper" (eq. 6 σ').
      server_ranking: "fitness" (the paper and the reference: the server CMA-ES ranks the client means by
        their uploaded fitness) | "random" (a mechanism study, not FedBPT: the ranking is drawn at random
        each round from the round's key, so the recombination weights no longer follow the fitness; FedBPT
        only, FedAvg-BBT does not rank).
      client_keys: "independent" (every client and round its own key, default) | "shared" (the
        reference's identical CMA-ES draws on all clients, every round).
      sampling: "uniform" (default) | "weighted" (probability ∝ example count), without replacement.
      projection: "normal" | "uniform" (see :mod:`fedbpt_jax.prompt`).
      layout: prompt placement (encoder "add"/"cat", decoder "before"/"after"; None = backbone default:
        "add" for encoders, "before" for decoders, the paper's and every reference's layout). Decoder
        "after" is the fast variant (the text's cache is shared by every candidate; 1.9x faster a round at
        n = 10 on SST-2, slower at n = 50), but there FedBPT's global prompt drifted into a label bias
        (8 of 12 runs of the experiment grids reached >= 0.85 of predictions on one label).
      scorer_cache: "auto" (the layout's cache: decoders "before" the per-candidate prompt cache with the
        texts packed by length, "after" the text-prefix cache; encoders none) | "prompt" | "prefix" | "none"
        (every row computed in full, padding included: only to measure what the caches save).
      chunk_clients: clients scored per vmapped chunk (0 = all K at once); bounds peak memory.
      projection_alpha: BBT's projection scale α (``A ~ N(0, (α σ̂_E / √d)²)``); named so that it is not
        confused with the Dirichlet concentration, which "alpha" means everywhere else (data, CLI, grids).
      norm_clip: optional stabiliser, off by default (the reference's ``norm_prompt``): every local
        candidate and the uploaded mean whose ‖z‖ exceeds the threshold τ_t is scaled back to norm τ_t.
        τ starts at ``norm_clip_threshold`` (15) and grows by 1 at the start of every round whose
        broadcast mean has ‖z_t‖ < ``norm_clip_upper`` (20), as in the reference client (where only the
        evaluating client, site-1, grows it; here every client uses the same τ_t).
      norm_clip_threshold: τ's start (the norm_clip stabiliser's first threshold).
      norm_clip_upper: τ grows by 1 each round while the broadcast ‖z‖ is below this.
      sigma_schedule: optional stabiliser for the server's broadcast σ, off by default: "none" (the
        reference's behaviour: its clamps are no-ops) | "clamp" (what the reference's clamps intend:
        σ_{t+1} = min(max(σ_t · CSA factor, ``sigma_floor``), σ_t), never above the previous σ and
        not pushed below the floor).
      sigma_floor: the "clamp" schedule's floor (reference: 0.5).
    """

    num_clients: int = 10
    clients_per_round: int = 10
    population_size: int = 5
    local_generations: int = 8
    intrinsic_dim: int = 500
    n_prompt_tokens: int = 50
    loss: str = _choice("ce", objective.LOSSES)
    perturb: bool = True
    fitness_form: str = _choice("ratio_of_means", objective.FITNESS_FORMS)
    perturb_every: str = _choice("round", PERTURB_EVERY)
    exempt_special: bool = False
    server_variant: str = _choice("reference", SERVER_VARIANTS)
    server_ranking: str = _choice("fitness", SERVER_RANKINGS)
    client_keys: str = _choice("independent", CLIENT_KEYS)
    sampling: str = _choice("uniform", SAMPLING)
    projection: str = _choice("normal", prompt.PROJECTIONS)
    layout: str | None = None
    scorer_cache: str = _choice("auto", objective.SCORER_CACHES)
    chunk_clients: int = 0
    projection_alpha: float = 1.0
    norm_clip: bool = False
    norm_clip_threshold: float = 15.0
    norm_clip_upper: float = 20.0
    sigma_schedule: str = _choice("none", SIGMA_SCHEDULES)
    sigma_floor: float = 0.5

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}")
        need(
            1 <= self.clients_per_round <= self.num_clients,
            f"clients_per_round (K={self.clients_per_round}) must be in [1, num_clients={self.num_clients}]",
        )
        need(self.population_size >= 2, f"population_size must be >= 2, got {self.population_size}")
        need(self.local_generations >= 1, f"local_generations must be >= 1, got {self.local_generations}")
        need(self.intrinsic_dim >= 1, f"intrinsic_dim (d) must be >= 1, got {self.intrinsic_dim}")
        need(self.n_prompt_tokens >= 1, f"n_prompt_tokens must be >= 1, got {self.n_prompt_tokens}")
        need(self.loss in objective.LOSSES, f"unknown loss {self.loss!r}; accepted: {objective.LOSSES}")
        need(
            not (self.perturb and self.loss == "accuracy"),
            "the perturbation ratio needs a positive loss: use loss 'ce' or 'hinge', or perturb=False",
        )
        need(
            self.fitness_form in objective.FITNESS_FORMS,
            f"unknown fitness_form {self.fitness_form!r}; accepted: {objective.FITNESS_FORMS}",
        )
        need(
            self.perturb_every in PERTURB_EVERY,
            f"unknown perturb_every {self.perturb_every!r}; accepted: {PERTURB_EVERY}",
        )
        need(
            self.server_variant in SERVER_VARIANTS,
            f"unknown server_variant {self.server_variant!r}; accepted: {SERVER_VARIANTS}",
        )
        need(
            self.server_ranking in SERVER_RANKINGS,
            f"unknown server_ranking {self.server_ranking!r}; accepted: {SERVER_RANKINGS}",
        )
        need(self.client_keys in CLIENT_KEYS, f"unknown client_keys {self.client_keys!r}; accepted: {CLIENT_KEYS}")
        need(self.sampling in SAMPLING, f"unknown sampling {self.sampling!r}; accepted: {SAMPLING}")
        need(
            self.projection in prompt.PROJECTIONS,
            f"unknown projection {self.projection!r}; accepted: {prompt.PROJECTIONS}",
        )
        need(self.chunk_clients >= 0, f"chunk_clients must be >= 0, got {self.chunk_clients}")
        need(
            self.layout is None or any(self.layout in k.layouts for k in objective.KINDS.values()),
            f"unknown layout {self.layout!r}; accepted: "
            + "; ".join(f"{k.name}s {k.layouts}" for k in objective.KINDS.values())
            + " (None: the backbone's default, the first)",
        )
        need(
            self.scorer_cache in objective.SCORER_CACHES,
            f"unknown scorer_cache {self.scorer_cache!r}; accepted: {objective.SCORER_CACHES}",
        )
        need(
            math.isfinite(self.projection_alpha) and self.projection_alpha > 0,
            f"projection_alpha must be finite and > 0, got {self.projection_alpha}",
        )
        need(
            self.sigma_schedule in SIGMA_SCHEDULES,
            f"unknown sigma_schedule {self.sigma_schedule!r}; accepted: {SIGMA_SCHEDULES}",
        )
        for name in ("norm_clip_threshold", "norm_clip_upper", "sigma_floor"):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0, f"{name} must be finite and > 0, got {v}")


@flax.struct.dataclass
class HParams:
    """Numeric hyperparameters (a pytree: sweeps are a ``vmap`` over it).

    Attributes:
      sigma0: initial server σ (σ₁ = 1 in the paper and code).
      perturb_rate: r_p ∈ [0, 1] (reference default 0.5; the paper's best 0.6 SST-2, 0.4 AG's News).
      dropout_rate: probability that a sampled client drops out of a round (straggler simulation);
        1 drops every client (the round then leaves the server state as it was).
      learning_rate: FedPrompt's local Adam learning rate.
    """

    sigma0: float = 1.0
    perturb_rate: float = 0.5
    dropout_rate: float = 0.0
    learning_rate: float = 0.3

    def validate(self) -> "HParams":
        """Host-side check of concrete values (call before jitting): every value finite and inside
        :data:`HPARAM_RANGES`; returns the hyperparameters as float32 arrays.

        Raises:
          ValueError: naming the value and the accepted range.
        """
        check_hparams(self)
        return jax_tree_asarray(self)


def check_hparams(hp: HParams) -> None:
    """Rejects non-finite or out-of-range hyperparameters (see :data:`HPARAM_RANGES`).

    Values that are tracers (``init`` called under ``jit``/``vmap`` for a sweep) cannot be read and are
    not checked; concrete values always are. Called by every algorithm's ``init``.

    Raises:
      ValueError: e.g. ``"sigma0 must be a finite value in [1e-06, 1000], got 1e+30"``.
    """
    for f in dataclasses.fields(hp):
        v = getattr(hp, f.name)
        if isinstance(v, jax.core.Tracer):
            continue
        arr = np.asarray(v, np.float64)
        lo, hi = HPARAM_RANGES[f.name]
        bad = arr[~(np.isfinite(arr) & (arr >= lo) & (arr <= hi))]
        if bad.size:
            raise ValueError(f"{f.name} must be a finite value in [{lo:g}, {hi:g}], got {float(bad.flat[0])!r}")


def jax_tree_asarray(hp: HParams) -> HParams:
    return HParams(**{f.name: jnp.asarray(getattr(hp, f.name), jnp.float32) for f in dataclasses.fields(hp)})


def default_scorer(config: FedConfig, lm) -> objective.Scorer:
    """The scorer an algorithm built from ``config`` uses unless given one: ``lm``'s, for the config's layout,
    prompt length and scorer cache."""
    return objective.make_scorer(lm, config.layout, n_prompt_tokens=config.n_prompt_tokens, cache=config.scorer_cache)
