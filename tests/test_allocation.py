"""Tests for mode_hf.algo.allocation: the MILP optimum equals brute force over all assignments on small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mode_hf.algo.allocation import (
    BUDGET_RTOL,
    SCOPES,
    Allocation,
    InfeasibleBudgetError,
    allocate,
    best_uniform_layer_average,
    check_budget,
)

WIDTH_SETS = {(2, 3, 4): (2.0, 2.25, 2.5, 2.8, 3.0, 3.3, 3.75, 4.0), (2, 4, 8): (2.0, 2.5, 3.0, 4.0, 5.5, 7.0, 8.0)}


def make_instance(seed: int, n_experts: int, n_sets: int, widths: tuple[int, ...]):
    """Random (costs [J, K] decreasing in bits over orders of magnitude, params [J], set_index [J] with all sets)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 2, size=(n_experts, 1))  # experts differ by orders of magnitude
    decay = np.sort(rng.uniform(0.05, 1.0, size=(n_experts, len(widths))), axis=1)[:, ::-1]  # [J, K] decreasing
    costs = scale * decay
    params = rng.integers(1, 1000, size=n_experts).astype(np.int64)
    set_index = np.concatenate([np.arange(n_sets), rng.integers(0, n_sets, n_experts - n_sets)])
    return costs, params, rng.permutation(set_index)


def brute_force(costs, params, set_index, widths, avg_bits, scope, min_top=0, min_per_set=None):
    """Best objective (None if infeasible) and its width index per expert [J], by enumerating all K^J assignments."""
    n_experts, n_bits = costs.shape
    widths = np.asarray(widths)
    combos = np.array(list(itertools.product(range(n_bits), repeat=n_experts)))  # [N, J]
    chosen = widths[combos]  # [N, J]
    objective = costs[np.arange(n_experts), combos].sum(axis=1)  # [N]
    feasible = np.ones(len(combos), dtype=bool)
    masks = [set_index == s for s in np.unique(set_index)]
    for group in masks if scope == "layer" else [np.ones(n_experts, dtype=bool)]:
        used = (chosen[:, group] * params[group]).sum(axis=1)
        feasible &= used <= avg_bits * (1 + BUDGET_RTOL) * params[group].sum()
    required = {int(widths.max()): min_top}
    for width, count in (min_per_set or {}).items():
        required[width] = max(required.get(width, 0), count)
    for group in masks:
        for width, count in required.items():
            feasible &= (chosen[:, group] == width).sum(axis=1) >= count
        if scope == "layer_uniform":
            feasible &= np.all(chosen[:, group] == chosen[:, group][:, :1], axis=1)
    if not feasible.any():
        return None, None
    best = np.flatnonzero(feasible)[np.argmin(objective[feasible])]
    return float(objective[best]), combos[best]


def assert_budget(result: Allocation, params, set_index, avg_bits, scope):
    """The allocation respects the budget (per set for layer) and layer_uniform gives one width per set."""
    cap = avg_bits * (1 + BUDGET_RTOL)
    groups = [set_index == s for s in np.unique(set_index)] if scope == "layer" else [np.ones(len(params), bool)]
    for group in groups:
        assert np.dot(params[group], result.bits[group]) <= cap * params[group].sum()
    if scope == "layer_uniform":
        for s in np.unique(set_index):
            assert np.unique(result.bits[set_index == s]).size == 1


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("widths", list(WIDTH_SETS))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_top", [0, 1])
def test_matches_brute_force(scope, widths, seed, min_top):
    costs, params, set_index = make_instance(seed, n_experts=6 + seed, n_sets=2 + seed % 2, widths=widths)
    for avg_bits in WIDTH_SETS[widths]:
        expected, _ = brute_force(costs, params, set_index, widths, avg_bits, scope, min_top)
        if expected is None:
            with pytest.raises(InfeasibleBudgetError):
                allocate(costs, params, set_index, widths, avg_bits, scope=scope, min_top_per_set=min_top)
            continue
        result = allocate(costs, params, set_index, widths, avg_bits, scope=scope, min_top_per_set=min_top)
        assert result.objective == pytest.approx(expected, abs=1e-6)
        assert_budget(result, params, set_index, avg_bits, scope)
        for s in np.unique(set_index):
            assert np.sum(result.bits[set_index == s] == max(widths)) >= min_top


@pytest.mark.parametrize("scope", SCOPES)
def test_result_fields_consistent_and_inputs_untouched(scope):
    costs, params, set_index = make_instance(7, n_experts=8, n_sets=3, widths=(2, 3, 4))
    copies = (costs.copy(), params.copy(), set_index.copy())
    result = allocate(costs, params, set_index, (2, 3, 4), 3.1, scope=scope)
    column = {2: 0, 3: 1, 4: 2}
    assert result.bits.dtype == np.int64 and result.bits.shape == (8,)
    assert set(result.bits.tolist()) <= {2, 3, 4}
    assert result.objective == pytest.approx(sum(costs[j, column[b]] for j, b in enumerate(result.bits)), rel=1e-12)
    assert result.average_bits == pytest.approx(np.dot(params, result.bits) / params.sum(), rel=1e-12)
    assert result.status == "optimal" and result.solve_seconds >= 0
    for before, after in zip(copies, (costs, params, set_index)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "scope, min_top", [("global", 0), ("layer", 0), ("layer_uniform", 0), ("global", 2), ("layer", 2)]
)  # a guard puts layer_uniform at the top width only (tested separately)
def test_more_budget_never_worse(scope, min_top):
    costs, params, set_index = make_instance(11, n_experts=80, n_sets=4, widths=(2, 3, 4))
    grid = np.linspace(2.0, 4.0, 9)
    if min_top:
        grid = grid[1:]  # the guard needs up to 2.04 bits (set 1), so 2.0 is infeasible; 2.25 on is not
    objectives = [allocate(costs, params, set_index, (2, 3, 4), a, scope, min_top).objective for a in grid]
    assert np.all(np.diff(objectives) <= 1e-9 * max(objectives))
    assert objectives[-1] < objectives[0]  # the budget matters on this instance


def test_scopes_ordered_by_freedom():
    """Every layer and layer_uniform allocation is feasible for global, so the global optimum is never worse."""
    costs, params, set_index = make_instance(5, n_experts=200, n_sets=8, widths=(2, 3, 4))
    results = {scope: allocate(costs, params, set_index, (2, 3, 4), 2.75, scope) for scope in SCOPES}
    assert results["global"].objective <= results["layer"].objective * (1 + 1e-9)
    assert results["global"].objective <= results["layer_uniform"].objective * (1 + 1e-9)
    for scope, result in results.items():
        assert_budget(result, params, set_index, 2.75, scope)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("widths", [(2, 3, 4), (4, 2, 8), (3, 2)])
def test_min_budget_gives_all_min(scope, widths):
    costs, params, set_index = make_instance(3, n_experts=30, n_sets=3, widths=widths)
    result = allocate(costs, params, set_index, widths, float(min(widths)), scope=scope)
    np.testing.assert_array_equal(result.bits, np.full(30, min(widths)))
    assert result.average_bits == min(widths)


@pytest.mark.parametrize("scope", SCOPES)
def test_max_budget_gives_cheapest_everywhere(scope):
    costs, params, set_index = make_instance(4, n_experts=30, n_sets=3, widths=(2, 3, 4))
    result = allocate(costs, params, set_index, (2, 3, 4), 4.0, scope=scope)
    np.testing.assert_array_equal(result.bits, np.full(30, 4))  # costs strictly decrease in bits


def test_column_order_follows_bits():
    costs, params, set_index = make_instance(2, n_experts=7, n_sets=2, widths=(2, 3, 4))
    order = [2, 0, 1]
    permuted = allocate(costs[:, order], params, set_index, (4, 2, 3), 2.9, scope="global")
    sorted_ = allocate(costs, params, set_index, (2, 3, 4), 2.9, scope="global")
    assert permuted.objective == pytest.approx(sorted_.objective, abs=1e-9)
    expected, _ = brute_force(costs, params, set_index, (2, 3, 4), 2.9, "global")
    assert permuted.objective == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("scope", SCOPES)
def test_non_contiguous_set_labels(scope):
    costs, params, set_index = make_instance(6, n_experts=7, n_sets=2, widths=(2, 3, 4))
    labels = np.where(set_index == 0, 17, 5)  # labels 5 and 17, nothing in between
    result = allocate(costs, params, labels, (2, 3, 4), 3.2, scope=scope, min_top_per_set=int(scope != "layer_uniform"))
    expected, _ = brute_force(costs, params, labels, (2, 3, 4), 3.2, scope, int(scope != "layer_uniform"))
    assert result.objective == pytest.approx(expected, abs=1e-6)


def test_exactly_achievable_average_is_feasible():
    """avg_bits computed in floating point from an assignment admits that assignment (budget slack)."""
    rng = np.random.default_rng(9)
    params = rng.uniform(1e5, 5e7, size=50)  # real weight counts, not nice numbers
    set_index = np.repeat(np.arange(5), 10)
    target = rng.choice([2, 3, 4], size=50)
    avg_bits = float(np.dot(params, target) / params.sum())
    costs = np.where(np.arange(3)[None, :] == (target[:, None] - 2), 0.0, 1.0)  # only the target costs nothing
    result = allocate(costs, params, set_index, (2, 3, 4), avg_bits, scope="global")
    assert result.objective == 0.0
    np.testing.assert_array_equal(result.bits, target)


def test_large_params_keep_budget():
    """DeepSeek-sized weight counts (1e10 total) do not break the normalized budget rows."""
    costs, _, set_index = make_instance(8, n_experts=300, n_sets=6, widths=(2, 3, 4))
    params = np.random.default_rng(8).integers(40_000_000, 50_000_000, size=300)
    for scope in SCOPES:
        result = allocate(costs, params, set_index, (2, 3, 4), 2.6, scope=scope, min_top_per_set=0)
        assert_budget(result, params, set_index, 2.6, scope)


def test_budget_violation_inside_solver_tolerance_is_re_solved(monkeypatch, caplog):
    """A rounded solution over budget by less than HiGHS's feasibility tolerance is rejected and re-solved."""
    import mode_hf.algo.allocation as allocation

    loose = {"mip_feasibility_tolerance": 1e-3, "primal_feasibility_tolerance": 1e-3}
    monkeypatch.setattr(allocation, "_HIGHS_OPTIONS", {**allocation._HIGHS_OPTIONS, **loose})
    costs = np.array([[1.0, 0.0], [1.0, 0.1]])
    avg_bits = 3 - 5e-4  # one expert at 4 bits overshoots by 5e-4 < 1e-3: HiGHS accepts it, the exact check not
    with caplog.at_level("INFO", logger="mode_hf.algo.allocation"):
        result = allocate(costs, np.ones(2), np.zeros(2, dtype=int), (2, 4), avg_bits)
    assert "re-solving" in caplog.text
    np.testing.assert_array_equal(result.bits, [2, 2])
    assert result.objective == brute_force(costs, np.ones(2), np.zeros(2, dtype=int), (2, 4), avg_bits, "global")[0]


@pytest.mark.parametrize("scope", SCOPES)
def test_time_limit_still_optimal_on_small_instance(scope):
    costs, params, set_index = make_instance(12, n_experts=7, n_sets=3, widths=(2, 3, 4))
    result = allocate(costs, params, set_index, (2, 3, 4), 2.6, scope=scope, time_limit=30.0)
    expected, _ = brute_force(costs, params, set_index, (2, 3, 4), 2.6, scope)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------- infeasible budgets


@pytest.mark.parametrize("avg_bits", [1.99, 4.01, 0.0, 16.0])
def test_check_budget_out_of_range(avg_bits):
    with pytest.raises(InfeasibleBudgetError, match="avg_bits"):
        check_budget((2, 3, 4), avg_bits)
    costs, params, set_index = make_instance(0, n_experts=5, n_sets=2, widths=(2, 3, 4))
    with pytest.raises(InfeasibleBudgetError):
        allocate(costs, params, set_index, (2, 3, 4), avg_bits)


@pytest.mark.parametrize("avg_bits", [2, 2.0, 3.5, 4])
def test_check_budget_in_range(avg_bits):
    check_budget((4, 2, 3), avg_bits)  # returns None, raises nothing


def test_check_budget_messages_say_what_to_change():
    with pytest.raises(InfeasibleBudgetError, match="raise avg_bits to at least 2"):
        check_budget((2, 4), 1.5)
    with pytest.raises(InfeasibleBudgetError, match="lower avg_bits to at most 4"):
        check_budget((2, 4), 4.5)


@pytest.mark.parametrize("bits", [(), (2, 2, 4), (0, 2), (2.5, 4)])
def test_check_budget_bad_bits(bits):
    with pytest.raises(ValueError):
        check_budget(bits, 3.0)


def test_guard_larger_than_set_names_the_set():
    costs, params, _ = make_instance(0, n_experts=6, n_sets=2, widths=(2, 3, 4))
    set_index = np.array([0, 0, 0, 0, 9, 9])
    with pytest.raises(InfeasibleBudgetError, match="set 9 has only 2 experts"):
        allocate(costs, params, set_index, (2, 3, 4), 4.0, scope="global", min_top_per_set=3)


def test_guard_over_budget_names_the_set():
    costs = np.tile([3.0, 2.0, 1.0], (6, 1))
    params = np.array([1, 1, 1, 10, 10, 10])
    set_index = np.array([0, 0, 0, 4, 4, 4])
    # one of three equal experts at 4 bits makes either set average 8/3 = 2.67 > 2.5; set 0 is reported first
    with pytest.raises(InfeasibleBudgetError, match="set 0"):
        allocate(costs, params, set_index, (2, 3, 4), 2.5, scope="layer", min_top_per_set=1)
    # globally the cheapest guard layout averages (4 + 2*2 + 40 + 2*20) / 33 = 2.667 bits
    with pytest.raises(InfeasibleBudgetError, match="all experts"):
        allocate(costs, params, set_index, (2, 3, 4), 2.6, scope="global", min_top_per_set=1)
    result = allocate(costs, params, set_index, (2, 3, 4), 2.7, scope="global", min_top_per_set=1)
    assert np.sum(result.bits[:3] == 4) >= 1 and np.sum(result.bits[3:] == 4) >= 1


def test_guard_under_layer_uniform_forces_top_width():
    costs, params, set_index = make_instance(1, n_experts=6, n_sets=2, widths=(2, 3, 4))
    with pytest.raises(InfeasibleBudgetError, match="layer_uniform"):
        allocate(costs, params, set_index, (2, 3, 4), 3.9, scope="layer_uniform", min_top_per_set=1)
    result = allocate(costs, params, set_index, (2, 3, 4), 4.0, scope="layer_uniform", min_top_per_set=1)
    np.testing.assert_array_equal(result.bits, np.full(6, 4))


# ----------------------------------------------------------------------------------------------------- bad input

GOOD = dict(
    costs=np.ones((4, 3)), params=np.ones(4), set_index=np.array([0, 0, 1, 1]), bits=(2, 3, 4), avg_bits=3.0
)
BAD_INPUTS = {
    "nan cost": dict(costs=np.array([[1.0, np.nan, 0.5]] * 4)),
    "inf cost": dict(costs=np.array([[np.inf, 1.0, 0.5]] * 4)),
    "cost columns != bits": dict(costs=np.ones((4, 2))),
    "costs 1-D": dict(costs=np.ones(4)),
    "no experts": dict(costs=np.ones((0, 3)), params=np.ones(0), set_index=np.zeros(0, dtype=int)),
    "negative params": dict(params=np.array([1.0, -1.0, 1.0, 1.0])),
    "zero params": dict(params=np.array([1.0, 0.0, 1.0, 1.0])),
    "nan params": dict(params=np.array([1.0, np.nan, 1.0, 1.0])),
    "params shape": dict(params=np.ones(3)),
    "set_index float": dict(set_index=np.array([0.0, 0.0, 1.0, 1.0])),
    "set_index negative": dict(set_index=np.array([0, -1, 1, 1])),
    "set_index shape": dict(set_index=np.array([0, 1])),
    "unknown scope": dict(scope="per_expert"),
    "negative guard": dict(min_top_per_set=-1),
    "float guard": dict(min_top_per_set=1.5),
    "zero time limit": dict(time_limit=0.0),
    "duplicate bits": dict(bits=(2, 2, 4)),
    "nan avg_bits": dict(avg_bits=float("nan")),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case):
    kwargs = {**GOOD, **BAD_INPUTS[case]}
    with pytest.raises(ValueError) as info:
        allocate(**kwargs)
    assert not isinstance(info.value, InfeasibleBudgetError)


def test_unknown_scope_message_lists_scopes():
    with pytest.raises(ValueError, match="layer_uniform"):
        allocate(**{**GOOD, "scope": "per_expert"})


# ------------------------------------------------------------------------------------ best uniform layer average


def brute_force_uniform_average(params, set_index, widths, avg_bits):
    sets = np.unique(set_index)
    weights = np.array([params[set_index == s].sum() for s in sets], dtype=np.float64)
    averages = [np.dot(weights, combo) / weights.sum() for combo in itertools.product(widths, repeat=len(sets))]
    return max(a for a in averages if a <= avg_bits * (1 + BUDGET_RTOL))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("widths", list(WIDTH_SETS))
def test_best_uniform_layer_average_matches_brute_force(seed, widths):
    _, params, set_index = make_instance(seed, n_experts=20, n_sets=5, widths=widths)
    params = params * 1_000_003  # realistic magnitudes
    for avg_bits in WIDTH_SETS[widths]:
        best = best_uniform_layer_average(params, set_index, widths, avg_bits)
        assert best == pytest.approx(brute_force_uniform_average(params, set_index, widths, avg_bits), abs=1e-9)
        assert best <= avg_bits * (1 + BUDGET_RTOL)


def test_best_uniform_layer_average_equal_sets():
    """Four equal sets with widths (2, 4): reachable averages are 2, 2.5, 3, 3.5, 4."""
    set_index = np.repeat(np.arange(4), 3)
    assert best_uniform_layer_average(np.ones(12), set_index, (2, 4), 3.4) == pytest.approx(3.0)
    assert best_uniform_layer_average(np.ones(12), set_index, (2, 4), 3.5) == pytest.approx(3.5)


def test_best_uniform_layer_average_bad_inputs():
    with pytest.raises(InfeasibleBudgetError):
        best_uniform_layer_average(np.ones(4), np.zeros(4, dtype=int), (2, 4), 1.0)
    with pytest.raises(ValueError):
        best_uniform_layer_average(-np.ones(4), np.zeros(4, dtype=int), (2, 4), 3.0)
    with pytest.raises(ValueError):
        best_uniform_layer_average(np.ones(4), np.zeros(3, dtype=int), (2, 4), 3.0)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("widths", list(WIDTH_SETS))
@pytest.mark.parametrize("seed", range(3))
def test_per_width_guards_match_brute_force(scope, widths, seed):
    costs, params, set_index = make_instance(seed, n_experts=7, n_sets=2, widths=widths)
    top, second = sorted(widths)[-1], sorted(widths)[-2]
    for guard in ({top: 1, second: 1}, {second: 2}, {min(widths): 1, top: 1}):
        for avg_bits in WIDTH_SETS[widths]:
            expected, _ = brute_force(costs, params, set_index, widths, avg_bits, scope, min_per_set=guard)
            if expected is None:
                with pytest.raises(InfeasibleBudgetError):
                    allocate(costs, params, set_index, widths, avg_bits, scope, min_per_set=guard)
                continue
            result = allocate(costs, params, set_index, widths, avg_bits, scope, min_per_set=guard)
            assert result.objective == pytest.approx(expected, abs=1e-6, rel=1e-9)
            for s in np.unique(set_index):
                for width, count in guard.items():
                    assert (result.bits[set_index == s] == width).sum() >= count


def test_min_top_and_min_per_set_combine():
    costs, params, set_index = make_instance(1, n_experts=7, n_sets=2, widths=(2, 3, 4))
    expected, _ = brute_force(costs, params, set_index, (2, 3, 4), 3.3, "global", min_top=2, min_per_set={4: 1, 3: 1})
    result = allocate(costs, params, set_index, (2, 3, 4), 3.3, "global", min_top_per_set=2, min_per_set={4: 1, 3: 1})
    assert result.objective == pytest.approx(expected, abs=1e-6, rel=1e-9)
    for s in np.unique(set_index):
        assert (result.bits[set_index == s] == 4).sum() >= 2 and (result.bits[set_index == s] == 3).sum() >= 1


def test_per_width_guard_errors():
    costs, params, set_index = make_instance(0, n_experts=6, n_sets=2, widths=(2, 3, 4))
    with pytest.raises(ValueError, match="width 8"):
        allocate(costs, params, set_index, (2, 3, 4), 3.0, min_per_set={8: 1})
    with pytest.raises(ValueError, match=r"min_per_set\[3\]"):
        allocate(costs, params, set_index, (2, 3, 4), 3.0, min_per_set={3: -1})
    with pytest.raises(InfeasibleBudgetError, match="set .* has only"):
        allocate(costs, params, set_index, (2, 3, 4), 3.0, min_per_set={3: 3, 4: 3})
    with pytest.raises(InfeasibleBudgetError, match="layer_uniform"):
        allocate(costs, params, set_index, (2, 3, 4), 3.0, "layer_uniform", min_per_set={3: 1, 4: 1})
    with pytest.raises(InfeasibleBudgetError, match="raise avg_bits"):
        allocate(costs, params, set_index, (2, 3, 4), 2.0, "layer", min_per_set={3: 1})


@pytest.mark.parametrize("status, error", [("infeasible", InfeasibleBudgetError), ("infeasible_inaccurate", InfeasibleBudgetError),
                                           ("user_limit", RuntimeError)])
def test_a_solve_without_solution_raises_by_status(status, error, monkeypatch):
    """What HiGHS leaves without a solution: an infeasible status is the budget's fault, anything else (a time
    limit) says so; the statuses are cvxpy's strings (this module imports cvxpy only to solve)."""
    import mode_hf.algo.allocation as allocation

    monkeypatch.setattr(allocation, "_solve_once", lambda *args: (None, status))
    with pytest.raises(error):
        allocate(np.zeros((4, 2)), np.ones(4), np.zeros(4, dtype=int), (2, 4), 3.0)
