"""Tests of fedbpt_jax.strategy: the server step against pycma 3.4.0, the client step against pycma's
own client (``_copy_light``) fed pycma's samples, lazy eigendecomposition, vmap, NaN and mask
handling, FedAvg-BBT weights."""

import collections
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbpt_jax import aggregation, cma
from fedbpt_jax import strategy as st

_server_update = jax.jit(aggregation.server_update, static_argnames=("variant", "local_population", "local_mu"))


def server_update(*args, variant="reference", local_population=5):
    """Jitted server step, always called with the same static keywords (one compilation per shape)."""
    return _server_update(*args, variant=variant, local_population=local_population)


fedavg_aggregate = jax.jit(aggregation.fedavg_aggregate)
eigendecompose = jax.jit(cma.eigendecompose)
client_init = jax.jit(st.client_init, static_argnames=("refresh_eigen",))
vask = jax.jit(jax.vmap(st.ask, in_axes=(0, 0, None)))
vtell = jax.jit(jax.vmap(st.tell, in_axes=(0, 0, 0, None)))
ask = jax.jit(st.ask)
tell = jax.jit(st.tell)


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _pycma_server(cma, d, m, sigma0=1.0):
    return cma.CMAEvolutionStrategy(np.zeros(d), sigma0, {"popsize": m, "CMA_mu": m, "seed": 1, "verbose": -9})


def _pycma_round(es, sigma_b, means, fits, sigma_hist, mu_loc):
    """The reference server (NVFlare global_es.py): σ', ask (discarded), tell, broadcast σ."""
    sigma_prime = np.sqrt(np.sum(sigma_hist**2) / len(means) / mu_loc)
    es.sigma = sigma_prime
    es.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.tell([x.copy() for x in means], list(fits))
    sigma_b = es.sigma / sigma_prime * sigma_b
    es.sigma = sigma_b
    return sigma_b


def _client_round_inputs(rng, r, mean, sigma_b, target, m, d, lam, gens=8):
    """Client uploads: a strong consistent drift in the first rounds (drives hsig to 0), noisy moves
    afterwards, and one far-away client per round (its mean gets the Mahalanobis repair)."""
    sig = sigma_b * np.exp(0.2 * rng.normal(size=(m, gens)))
    sp = np.sqrt(np.sum(sig**2) / m / (lam // 2))
    u = (target - mean) / np.linalg.norm(target - mean)
    if r < 3:
        means = mean + sp * (1.2 * np.sqrt(d) * u + 0.3 * rng.normal(size=(m, d)))
    else:
        means = mean + sigma_b * (0.3 * np.sqrt(d) * u + rng.normal(size=(m, d)))
    means[0] = mean + 6 * sigma_b * rng.normal(size=d)
    return means, np.sum((means - target) ** 2, axis=1), sig


# ------------------------------------------------------------------------------------------------
# Server vs pycma 3.4.0
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,m,rounds", [(5, 3, 8), (20, 10, 8), (100, 3, 12)])
def test_server_reference_matches_pycma(d, m, rounds):
    cma = pytest.importorskip("cma")
    lam = 5
    rng = np.random.default_rng(d * 100 + m)
    target = 3 * rng.normal(size=d)
    with jax.enable_x64(True):
        es = _pycma_server(cma, d, m)
        state = aggregation.server_init(d, 1.0, m, dtype=jnp.float64)
        sigma_b = 1.0
        worst, hsigs, eig, repaired = 0.0, set(), 0, 0
        for r in range(rounds):
            means, fits, sig = _client_round_inputs(rng, r, es.mean.copy(), sigma_b, target, m, d, lam)
            sigma_b = _pycma_round(es, sigma_b, means, fits, sig, lam // 2)
            state, met = server_update(
                state,
                jnp.asarray(means),
                jnp.asarray(fits),
                jnp.asarray(sig),
                jnp.ones(m, bool),
                variant="reference",
                local_population=lam,
            )
            worst = max(
                worst,
                _rel(state.mean, es.mean),
                _rel(state.std, sigma_b),
                _rel(state.C, es.sm.C),
                _rel(state.p_std, es.adapt_sigma.ps),
                _rel(state.p_c, es.pc),
                _rel(state.D, es.sm.D),
            )
            hsigs.add(bool(met["hsig"]))
            eig += int(met["eigen_updated"])
            repaired += int(met["num_repaired"])
            assert int(met["num_active"]) == m and int(met["num_nonfinite"]) == 0
        assert worst < 1e-5, worst
        assert hsigs == {True, False}  # both branches of hsig were exercised
        assert repaired >= rounds // 2
        assert eig == es.sm.count_eigen  # same number of lazy eigendecompositions as pycma
        assert 1 <= eig < rounds or d <= 20  # at d >= 50 the eigendecomposition really is lazy


def test_server_masked_equals_pycma_on_active_clients():
    """m = 10 slots, 3 usable each round (the rest masked or failed): pycma with popsize 3 on those 3."""
    cma = pytest.importorskip("cma")
    d, m, k, lam = 20, 10, 3, 5
    rng = np.random.default_rng(7)
    target = 3 * rng.normal(size=d)
    with jax.enable_x64(True):
        es = _pycma_server(cma, d, k)
        state = aggregation.server_init(d, 1.0, m, dtype=jnp.float64)
        sigma_b = 1.0
        for r in range(6):
            means, fits, sig = _client_round_inputs(rng, r, es.mean.copy(), sigma_b, target, k, d, lam)
            sigma_b = _pycma_round(es, sigma_b, means, fits, sig, lam // 2)
            slots = rng.permutation(m)[:k]
            all_means = rng.normal(size=(m, d)) * 1e3
            all_fits = -1e9 * np.ones(m)  # garbage that would win if it were used
            all_sig = np.full((m, 8), 1e3)
            all_means[slots], all_fits[slots], all_sig[slots] = means, fits, sig
            mask = np.zeros(m, bool)
            mask[slots] = True
            other = [i for i in range(m) if i not in slots]
            all_fits[other[0]] = np.nan  # masked *and* non-finite: not counted as a failure
            mask[other[1]] = True
            all_means[other[1], 0] = np.inf  # reported, but unusable: counted
            state, met = server_update(
                state,
                jnp.asarray(all_means),
                jnp.asarray(all_fits),
                jnp.asarray(all_sig),
                jnp.asarray(mask),
                variant="reference",
                local_population=lam,
            )
            assert int(met["num_active"]) == k and int(met["num_nonfinite"]) == 1
            assert _rel(state.mean, es.mean) < 1e-10
            assert _rel(state.std, sigma_b) < 1e-10
            assert _rel(state.C, es.sm.C) < 1e-10
            assert _rel(state.p_std, es.adapt_sigma.ps) < 1e-10 and _rel(state.p_c, es.pc) < 1e-10


def test_server_all_masked_or_failed_leaves_state_unchanged():
    d, m = 8, 5
    state = aggregation.server_init(d, 0.7, m)
    means = jnp.ones((m, d))
    fits = jnp.array([jnp.nan, jnp.inf, 1.0, 2.0, 3.0])
    sig = jnp.ones((m, 3))
    new, met = server_update(state, means, fits, sig, jnp.array([True, True, False, False, False]))
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert int(met["num_active"]) == 0 and int(met["num_nonfinite"]) == 2
    assert float(met["csa_factor"]) == 1.0


def test_server_nonfinite_client_is_dropped_not_poisoning():
    d, m = 8, 5
    rng = np.random.default_rng(0)
    state = aggregation.server_init(d, 1.0, m)
    means = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    fits = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], jnp.float32)
    sig = jnp.ones((m, 3))
    everyone = jnp.ones(m, bool)
    ref, _ = server_update(state, means, fits, sig, jnp.array([True, True, True, False, True]))
    bad_fit = fits.at[3].set(jnp.nan)
    out, met = server_update(state, means, bad_fit, sig, everyone)
    assert int(met["num_nonfinite"]) == 1 and int(met["num_active"]) == 4
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)
    bad_mean = means.at[1, 2].set(jnp.nan)
    out, met = server_update(state, bad_mean, fits, sig, everyone)
    assert int(met["num_nonfinite"]) == 1 and bool(jnp.all(jnp.isfinite(out.C)))
    assert bool(jnp.all(jnp.isfinite(out.mean))) and bool(jnp.isfinite(out.std))


def test_sigma_prime_reference_and_paper_by_hand():
    d, m, lam = 8, 5, 5
    state = aggregation.server_init(d, 1.0, m)
    means = jnp.zeros((m, d)) + 0.1
    fits = jnp.asarray([3.0, 1.0, 2.0, 4.0, 0.5])
    sig = jnp.asarray(np.arange(1, 1 + m * 3, dtype=np.float32).reshape(m, 3) / 10)
    mask = jnp.asarray([True, True, True, True, False])
    sq = np.sum(np.asarray(sig, np.float64) ** 2, axis=1)
    _, met = server_update(state, means, fits, sig, mask, variant="reference", local_population=lam)
    np.testing.assert_allclose(float(met["sigma_prime"]), math.sqrt(sq[:4].sum() / (4 * 2)), rtol=1e-6)
    _, met = server_update(state, means, fits, sig, mask, variant="paper", local_population=lam)
    # best half of the 4 usable clients: fitness 1.0 (client 1) and 2.0 (client 2)
    np.testing.assert_allclose(float(met["sigma_prime"]), 2 * math.sqrt((sq[1] + sq[2]) / (4 * lam)), rtol=1e-6)
    mask3 = jnp.asarray([True, True, False, True, False])  # odd |S| = 3: best ⌈3/2⌉ = 2 (clients 1, 0)
    _, met = server_update(state, means, fits, sig, mask3, variant="paper", local_population=lam)
    np.testing.assert_allclose(float(met["sigma_prime"]), 2 * math.sqrt((sq[1] + sq[0]) / (3 * lam)), rtol=1e-6)


def test_server_update_vmaps_over_independent_servers():
    d, m = 8, 5
    rng = np.random.default_rng(1)
    states = jax.vmap(lambda s0: aggregation.server_init(d, s0, m))(jnp.asarray([0.5, 1.0]))
    means = jnp.asarray(rng.normal(size=(2, m, d)), jnp.float32)
    fits = jnp.sum(means**2, -1)
    sig = jnp.asarray(rng.uniform(0.5, 1.0, size=(2, m, 3)), jnp.float32)
    mask = jnp.asarray([[True, True, False, True, True], [True] * m])
    batched, _ = jax.jit(jax.vmap(aggregation.server_update))(states, means, fits, sig, mask)
    for i in range(2):
        one, _ = server_update(jax.tree_util.tree_map(lambda a: a[i], states), means[i], fits[i], sig[i], mask[i])
        for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(one)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Client vs pycma's client (_copy_light) fed pycma's own samples
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,lam,m", [(20, 5, 10), (20, 10, 10), (100, 5, 3)])
def test_client_tell_matches_pycma_client(d, lam, m):
    """Local λ = 5 turns on selective mirroring and active weights; d = 100 makes the eigen lazy."""
    cma = pytest.importorskip("cma")
    gens = 8
    rng = np.random.default_rng(d + lam)
    with jax.enable_x64(True):
        es = _pycma_server(cma, d, m)
        state = aggregation.server_init(d, 1.0, m, dtype=jnp.float64)
        sigma_b = 1.0
        for r in range(3):  # a server with a non-trivial C
            means, fits, sig = _client_round_inputs(rng, r, es.mean.copy(), sigma_b, rng.normal(size=d), m, d, lam)
            sigma_b = _pycma_round(es, sigma_b, means, fits, sig, lam // 2)
            state, _ = server_update(
                state, jnp.asarray(means), jnp.asarray(fits), jnp.asarray(sig), jnp.ones(m, bool), local_population=lam
            )
        client = es._copy_light(inopts={"seed": 3, "maxiter": gens, "popsize": lam, "CMA_mu": None})
        params = st.local_params(lam, d)
        local = client_init(state, params, refresh_eigen=True)  # _copy_light decomposes C afresh
        target = rng.normal(size=d)
        worst, mirrored = 0.0, 0
        for g in range(gens):
            X = np.asarray(client.ask())
            pop, local = ask(jax.random.key(g), local, params)
            if bool(local.mirror_in_row0):
                mirrored += 1
                y = np.asarray(local.mirror_direction)
                maha = np.linalg.norm((y @ np.asarray(local.B)) / np.asarray(local.D)) / float(local.std)
                if maha <= math.sqrt(d):  # kept length: the mirror is deterministic
                    np.testing.assert_allclose(pop[0], X[0], rtol=1e-12, atol=1e-12)
            f = np.sum((X - target) ** 2, axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client.tell(X, list(f))
            local = tell(jnp.asarray(X), jnp.asarray(f), local, params)
            assert bool(local.mirror_valid) == (len(client.pop_injection_directions) == 1)
            worst = max(
                worst,
                _rel(local.mean, client.mean),
                _rel(local.std, client.sigma),
                _rel(local.C, client.sm.C),
                _rel(local.p_std, client.adapt_sigma.ps),
                _rel(local.p_c, client.pc),
                _rel(local.D, client.sm.D),
            )
        assert worst < 1e-5, worst
        assert (mirrored > 0) == (lam < 6)


def test_local_params_match_pycma_defaults():
    cma = pytest.importorskip("cma")
    for lam, d in [(5, 500), (10, 10), (3, 7)]:
        es = cma.CMAEvolutionStrategy(np.zeros(d), 1.0, {"popsize": lam, "seed": 1, "verbose": -9})
        es.adapt_sigma.initialize(es)
        with jax.enable_x64(True):
            p = st.local_params(lam, d)
            np.testing.assert_allclose(p.weights, np.asarray(es.sp.weights), rtol=1e-12)
            np.testing.assert_allclose(p.c_std, es.adapt_sigma.cs, rtol=1e-12)
            np.testing.assert_allclose(p.d_std, es.adapt_sigma.damps, rtol=1e-12)
            np.testing.assert_allclose(p.c_c, es.sp.cc, rtol=1e-12)
            np.testing.assert_allclose(p.c_1, es.sm.parameters()["c1"], rtol=1e-12)
            np.testing.assert_allclose(p.c_mu, es.sm.parameters()["cmu"], rtol=1e-12)
            np.testing.assert_allclose(p.eigen_gap, es.sm.lazy_update_gap, rtol=1e-12)
            assert p.num_mirrors == es.sp.lam_mirr


# ------------------------------------------------------------------------------------------------
# Client: convergence, lazy eigen, vmap, NaN
# ------------------------------------------------------------------------------------------------


@jax.jit
def _minimise(rosenbrock, gens, x0, key):
    """Client CMA-ES (λ = 5: mirrors and active weights on) in d = 10 from x0·1; one compilation
    serves both problems and both lengths."""
    d, lam = 10, 5
    server = aggregation.server_init(d, 1.0, 2).replace(mean=jnp.full((d,), x0, jnp.float32))
    params = st.local_params(lam, d)

    def fn(x):
        rosen = jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
        return jnp.where(rosenbrock, rosen, jnp.sum(x**2))

    def body(g, carry):
        s, best = carry
        z, s = st.ask(jax.random.fold_in(key, g), s, params)
        s = st.tell(z, jax.vmap(fn)(z), s, params)
        return s, jnp.fmin(best, fn(s.mean))

    s, best = jax.lax.fori_loop(0, gens, body, (st.client_init(server, params), jnp.asarray(jnp.inf, jnp.float32)))
    return fn(s.mean), best


def test_local_converges_on_sphere_and_rosenbrock():
    """Reaches the optimum (the best mean over the generations: a fixed generation count runs on past
    convergence, where float32 σ underflows on some CPUs and the mean goes non-finite: pycma stops there)."""
    key = jax.random.key(1)
    assert float(_minimise(False, 250, 3.0, key)[1]) < 1e-9
    assert float(_minimise(True, 1500, 0.0, key)[1]) < 1e-8


def _local_setup(d=12, lam=5, dtype=jnp.float32):
    server = aggregation.server_init(d, 0.5, 3, dtype=dtype)
    C = server.C + 0.3 * jnp.outer(jnp.linspace(-1, 1, d, dtype=dtype), jnp.linspace(-1, 1, d, dtype=dtype))
    C, B, D = eigendecompose(C, server.D)
    return server.replace(C=C, B=B, D=D), st.local_params(lam, d)


def test_lazy_eigen_schedule_and_skip():
    """B, D change only at the generations pycma would decompose C (gap 3.5 → after tells 4 and 8)."""
    server, params = _local_setup()
    params = params.replace(eigen_gap=jnp.asarray(3.5, params.eigen_gap.dtype))
    s = client_init(server, params)
    updates, B_prev = [], s.B
    for g in range(10):
        C_before = s.C
        z, s = ask(jax.random.key(g), s, params)
        if int(s.last_eigen_update) == g and g > 0:
            updates.append(g)
            _, B_ref, D_ref = eigendecompose(C_before, s.D)
            np.testing.assert_array_equal(s.B, B_ref)
            np.testing.assert_array_equal(s.D, D_ref)
        else:
            np.testing.assert_array_equal(s.B, B_prev)
        B_prev = s.B
        s = tell(z, jnp.sum(z**2, -1), s, params)
    assert updates == [4, 8]


def test_lazy_eigen_with_interval_one_equals_eager():
    """With gap ≤ 1 the lazy client decomposes before every ask, i.e. it is the eager algorithm."""
    with jax.enable_x64(True):
        server, params = _local_setup(dtype=jnp.float64)
        lazy_p = params.replace(eigen_gap=jnp.asarray(1.0, params.eigen_gap.dtype))
        eager_p = params.replace(eigen_gap=jnp.asarray(1e9, params.eigen_gap.dtype))  # decomposed by hand
        lazy = eager = client_init(server, params)
        for g in range(6):
            if g > 0:
                C, B, D = eigendecompose(eager.C, eager.D)
                eager = eager.replace(C=C, B=B, D=D)
            zl, lazy = ask(jax.random.key(g), lazy, lazy_p)
            ze, eager = ask(jax.random.key(g), eager, eager_p)
            np.testing.assert_allclose(zl, ze, rtol=1e-12, atol=1e-12)
            lazy = tell(zl, jnp.sum(zl**2, -1), lazy, lazy_p)
            eager = tell(ze, jnp.sum(ze**2, -1), eager, eager_p)
        for name in ("mean", "std", "C", "p_std", "p_c"):
            np.testing.assert_allclose(getattr(lazy, name), getattr(eager, name), rtol=1e-12, atol=1e-14)


def test_vmap_over_clients_equals_loop():
    """Deterministic pieces only: the eigendecomposition is not due in these 4 generations."""
    server, params = _local_setup()
    params = params.replace(eigen_gap=jnp.asarray(100.0, params.eigen_gap.dtype))
    keys = jax.random.split(jax.random.key(3), 3)
    targets = jnp.stack([jnp.full((12,), v) for v in (0.5, -1.0, 2.0)])
    batched = jax.vmap(lambda _: st.client_init(server, params))(jnp.arange(3))
    single = [client_init(server, params) for _ in range(3)]
    for g in range(4):
        gkeys = jax.vmap(lambda k: jax.random.fold_in(k, g))(keys)
        zb, batched = vask(gkeys, batched, params)
        batched = vtell(zb, jnp.sum((zb - targets[:, None]) ** 2, -1), batched, params)
        for i in range(3):
            z, single[i] = ask(gkeys[i], single[i], params)
            np.testing.assert_allclose(zb[i], z, rtol=1e-5, atol=1e-6)
            single[i] = tell(z, jnp.sum((z - targets[i]) ** 2, -1), single[i], params)
    for i in range(3):
        for name in ("mean", "std", "C", "p_std", "p_c", "mirror_direction"):
            np.testing.assert_allclose(getattr(batched, name)[i], getattr(single[i], name), rtol=1e-5, atol=1e-6)


def test_frozen_eigen_shared_B_equals_general_path():
    """FedBPT's fast client path (broadcast B, D shared by all clients, no covariance update) gives the
    same candidates, means, σ and paths as the general lazy-eigen path while no decomposition is due,
    also when a client sees non-finite fitness; and it never copies B per client."""
    d, lam, gens = 12, 5, 4
    gap = float(st.local_params(lam, 500).eigen_gap)  # the paper's setting: gap ≈ 18.8 > I = 8
    assert 18 < gap < 19
    assert not st.eigen_refresh_due(lam, 500, 8) and not st.eigen_refresh_due(lam, 500, 19)
    assert st.eigen_refresh_due(lam, 500, 20)
    server, params = _local_setup(d=d, lam=lam)
    params = params.replace(eigen_gap=jnp.asarray(100.0, params.eigen_gap.dtype))  # never due in 4 gens
    targets = jnp.stack([jnp.full((d,), v) for v in (0.5, -1.0, 2.0)])
    keys = jax.random.split(jax.random.key(4), 3)

    def run(frozen):
        def client(key, target, poison):
            s = st.client_init(server, params)

            def gen(s, g):
                z, s = st.ask(jax.random.fold_in(key, g), s, params, frozen_eigen=frozen)
                fit = jnp.sum((z - target) ** 2, -1)
                fit = jnp.where(poison & (g == 1), jnp.nan, fit)
                return st.tell(z, fit, s, params, track_covariance=not frozen), z

            return jax.lax.scan(gen, s, jnp.arange(gens))

        return jax.jit(jax.vmap(client))(keys, targets, jnp.array([False, True, False]))

    (fast, zf), (slow, zs) = run(True), run(False)
    np.testing.assert_allclose(zf, zs, rtol=1e-6, atol=1e-6)
    for name in ("mean", "std", "p_std", "p_c", "mirror_direction", "best_fitness"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(fast.C[0], server.C)  # left alone, C is never read by a FedBPT client
    assert not np.allclose(slow.C[0], server.C)
    # No [K, d, d] operand in the fast path's sampling: B enters every dot_general unbatched.
    jaxpr = jax.make_jaxpr(jax.vmap(lambda k, s: st.ask(k, s, params, frozen_eigen=True), in_axes=(0, None)))(
        keys, st.client_init(server, params)
    )
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(len(v.aval.shape) <= 2 or v.aval.shape[-2:] != (d, d) for e in dots for v in e.invars)


def _eigh_enclosures(jaxpr, chain=()):
    """Chains of enclosing primitives (with the cond predicate shapes) of every eigh equation."""
    found = []
    for eqn in jaxpr.eqns:
        here = chain + ((eqn.primitive.name, tuple(eqn.invars[0].aval.shape) if eqn.invars else None),)
        if eqn.primitive.name == "eigh":
            found.append(here)
        for p in eqn.params.values():
            subs = p if isinstance(p, (tuple, list)) else (p,)
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _eigh_enclosures(inner, here)
    return found


def test_eigh_stays_behind_a_scalar_cond_under_vmap():
    """A plain lax.cond with a per-client predicate would become a select and always run eigh."""
    server, params = _local_setup()
    states = jax.vmap(lambda _: st.client_init(server, params))(jnp.arange(4))
    keys = jax.random.split(jax.random.key(0), 4)
    chains = _eigh_enclosures(jax.make_jaxpr(jax.vmap(lambda k, s: st.ask(k, s, params)))(keys, states).jaxpr)
    nested = jax.vmap(jax.vmap(lambda k, s: st.ask(k, s, params)))
    keys2 = jax.random.split(jax.random.key(0), 8).reshape(2, 4)
    states2 = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), states)
    chains += _eigh_enclosures(jax.make_jaxpr(nested)(keys2, states2).jaxpr)
    assert len(chains) >= 2
    for chain in chains:
        conds = [shape for name, shape in chain if name == "cond"]
        assert conds and conds[0] == (), chain  # the outermost cond has a scalar predicate
    # And the skip is real: no client is due at generation 0, so the eigendecomposition is not run.
    _, out = vask(keys, states, params)
    np.testing.assert_array_equal(out.B, states.B)


def test_local_nan_and_inf_rank_worst():
    with jax.enable_x64(True):
        server, params = _local_setup(dtype=jnp.float64)
        s = client_init(server, params)
        z, s = ask(jax.random.key(0), s, params)
        w = np.asarray(params.weights)
        m0 = np.asarray(s.mean)
        fit = jnp.asarray([jnp.nan, 1.0, jnp.inf, 0.5, -jnp.inf])
        out = tell(z, fit, s, params)
        expected = m0 + w[0] * (np.asarray(z[3]) - m0) + w[1] * (np.asarray(z[1]) - m0)
        np.testing.assert_allclose(out.mean, expected, rtol=1e-12)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in (out.mean, out.std, out.C, out.p_std, out.p_c))
        # failures tie at "worst"; ties keep index order, so the last failing row (4) is mirrored
        np.testing.assert_allclose(out.mirror_direction, m0 - np.asarray(z[4]))
        # More failures than negative-weight slots: a failed candidate never gets a positive weight.
        out = tell(z, jnp.asarray([jnp.nan, jnp.nan, jnp.nan, jnp.nan, 2.0]), s, params)
        np.testing.assert_allclose(out.mean, m0 + w[0] * (np.asarray(z[4]) - m0), rtol=1e-12)
        # All failed: the distribution stays, the counter moves on.
        out = tell(z, jnp.full((5,), jnp.nan), s, params)
        for name in ("mean", "std", "C", "p_std", "p_c"):
            np.testing.assert_array_equal(getattr(out, name), getattr(s, name))
        assert int(out.generation_counter) == int(s.generation_counter) + 1
        assert not bool(out.mirror_valid)


def test_evosax_interface_of_local_strategy():
    """LocalCMA keeps evosax's init/ask/tell(key, ...) interface and State/Params types."""
    from evosax.algorithms.distribution_based import cma_es as evosax_cma

    strat = st.local_strategy(6, 8)
    params = strat.default_params
    assert isinstance(params, evosax_cma.Params)
    state = strat.init(jax.random.key(0), jnp.ones(8), params)
    assert isinstance(state, evosax_cma.State)
    pop, state = strat.ask(jax.random.key(1), state, params)
    state, metrics = strat.tell(jax.random.key(2), pop, jnp.sum(pop**2, -1), state, params)
    assert pop.shape == (6, 8) and int(state.generation_counter) == 1
    assert float(metrics["best_fitness"]) == float(jnp.min(jnp.sum(pop**2, -1)))


# ------------------------------------------------------------------------------------------------
# FedAvg-BBT
# ------------------------------------------------------------------------------------------------


def test_fedavg_weights_and_mask():
    d, m = 3, 4
    state = aggregation.server_init(d, 1.0, m)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(m, d)).astype(np.float32)
    stds = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    covs = np.stack([np.eye(d, dtype=np.float32) * (i + 1) for i in range(m)])
    # only mean/std/C of the (batched) client states are read; any pytree with them will do
    Up = collections.namedtuple("Up", "mean std C")
    up = Up(jnp.asarray(means), jnp.asarray(stds), jnp.asarray(covs))

    weights = jnp.asarray([1.0, 3.0, 0.0, 2.0])
    new, met = fedavg_aggregate(state, up, weights, jnp.asarray([True, True, True, False]))
    np.testing.assert_allclose(new.mean, (means[0] + 3 * means[1]) / 4, rtol=1e-6)
    np.testing.assert_allclose(new.std, (0.5 + 3 * 1.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(new.C, np.eye(d) * (1 + 3 * 2) / 4, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.B) * np.asarray(new.D) ** 2 @ np.asarray(new.B).T, new.C, atol=1e-5)
    assert int(met["num_active"]) == 2 and int(met["num_nonfinite"]) == 0
    up = up._replace(C=up.C.at[1, 0, 0].set(jnp.nan))
    new, met = fedavg_aggregate(state, up, weights)
    np.testing.assert_allclose(new.mean, (means[0] + 2 * means[3]) / 3, rtol=1e-6)
    assert int(met["num_nonfinite"]) == 1
    same, met = fedavg_aggregate(state, up, jnp.zeros(m))
    np.testing.assert_array_equal(same.mean, state.mean)
    assert int(met["num_active"]) == 0


def test_server_random_ranking_permutes_the_weights_and_keeps_the_rest():
    """server_ranking "random": the usable clients' ranks are a key's permutation (so the weights follow it, not
    the fitness); σ', the unusable clients and best_fitness are those of the fitness ranking."""
    d, m = 8, 6
    rng = np.random.default_rng(1)
    state = aggregation.server_init(d, 1.0, m)
    means = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    fits = jnp.asarray([3.0, 1.0, 2.0, 6.0, 5.0, 4.0], jnp.float32)
    sig = jnp.ones((m, 3))
    mask = jnp.asarray([True, True, True, True, True, False])
    rank = jax.jit(aggregation.server_update, static_argnames=("variant", "local_population", "local_mu"))
    ref, mref = rank(state, means, fits, sig, mask)
    np.testing.assert_array_equal(mref["client_rank"], [2, 0, 1, 4, 3, -1])
    seen = set()
    for seed in range(6):
        new, met = rank(state, means, fits, sig, mask, ranking_key=jax.random.key(seed))
        r = np.asarray(met["client_rank"])
        assert r[5] == -1 and sorted(r[:5]) == [0, 1, 2, 3, 4]  # a permutation of the usable clients
        # the weight a client gets is the weight of its rank under the fitness ranking
        by_rank = {int(k): float(w) for k, w in zip(mref["client_rank"], mref["client_weight"]) if k >= 0}
        np.testing.assert_allclose([float(w) for w in met["client_weight"][:5]], [by_rank[int(k)] for k in r[:5]])
        assert float(met["sigma_prime"]) == pytest.approx(float(mref["sigma_prime"]))
        assert float(met["best_fitness"]) == 1.0
        seen.add(tuple(r[:5]))
        again, _ = rank(state, means, fits, sig, mask, ranking_key=jax.random.key(seed))
        np.testing.assert_array_equal(again.mean, new.mean)  # the same key, the same step
    assert len(seen) >= 4  # the keys give different rankings, and so different means
