"""Bit-width allocation over MoE experts as a boolean MILP (cvxpy driving HiGHS).

Experts j = 1..J belong to expert sets s(j) (one MoE layer each) and hold P_j weights. Each expert takes one width
from the candidates B; binary x_{j,b} with sum_b x_{j,b} = 1 picks it, and the allocation minimizes
sum_{j,b} c_{j,b} x_{j,b} under a bit budget whose scope is one of:

- ``global``: sum_{j,b} P_j b x_{j,b} <= avg_bits * sum_j P_j over all experts (GEMQ);
- ``layer``: the same inequality separately within every set (PMQ);
- ``layer_uniform``: every set takes one width for all its experts (variables y_{s,b}, cost summed over the set's
  experts), global budget. This is the only layout vLLM, SGLang, TensorRT-LLM and llama.cpp serve today.

Guards ask every set for a minimum number of experts at given widths: ``min_per_set = {width: count}`` (PMQ:
one at the top width and one at the second), with ``min_top_per_set = m`` short for ``{max(B): m}``. Under
``layer_uniform`` they keep their literal meaning: a set with m >= 1 experts at width w is a set at width w, so a
guard at one width forces every set to it, and guards at two widths cannot be met.

Internally every scope becomes one "multiple choice" problem over items (experts, or whole sets for
``layer_uniform``) with vectorized sparse constraints; each budget row (one for global / layer_uniform, one per set
for layer) is an independent MILP and is solved on its own. Budget rows are normalized to "average bits above min(B)"
so that HiGHS sees O(1) coefficients whatever P_j is. 58 x 256 experts x 3 widths (DeepSeek-V3) takes about 2 s with
equal expert sizes and 5-8 s with +-50% random sizes on 2 CPU cores (benchmarks/allocation_scaling.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InfeasibleBudgetError

logger = logging.getLogger(__name__)

SCOPES = ("global", "layer", "layer_uniform")

# Relative slack on the budget, so that avg_bits equal to an achievable average is feasible despite rounding.
BUDGET_RTOL = 1e-9
# HiGHS options: a near-zero optimality gap (tests compare with brute force at 1e-6) and tight feasibility, so that
# the rounded binary solution keeps the budget; a rare violation inside HiGHS's tolerance is handled by re-solving.
_HIGHS_OPTIONS = {
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-12,
    "mip_feasibility_tolerance": 1e-9,
    "primal_feasibility_tolerance": 1e-9,
}
_MAX_RESOLVES = 3
# cvxpy statuses (strings), so that this module imports without cvxpy (a serving environment reads packed
# checkpoints and never solves an allocation); cvxpy itself is imported where a problem is solved.
OPTIMAL, INFEASIBLE_STATUSES = "optimal", ("infeasible", "infeasible_inaccurate", "infeasible_or_unbounded")
_MIN_TIME_LIMIT = 1e-3  # seconds HiGHS still gets once the caller's time_limit is spent


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate`.

    Attributes:
        bits: int64 [J], chosen width per expert (a value of the candidate widths).
        objective: sum of the chosen costs, sum_j c_{j, b_j}.
        average_bits: sum_j P_j b_j / sum_j P_j over all experts.
        solve_seconds: wall time of validation + build + solve (including any re-solve).
        status: cvxpy status: ``"optimal"`` when every solve proved optimality, else the first other status
            (``"user_limit"`` when the time limit stopped HiGHS with a feasible, possibly suboptimal, allocation).
    """

    bits: np.ndarray
    objective: float
    average_bits: float
    solve_seconds: float
    status: str


@dataclass(frozen=True)
class _ChoiceProblem:
    """One width per item (an expert, or a whole set for ``layer_uniform``) under normalized budget rows.

    costs: float64 [I, K]; weights: float64 [I] (P of the item); budget_group: int64 [I] budget row of each item;
    guard_group: int64 [I]; guard_need: int64 [G, K] items needed at each width per guard group; expert_item:
    int64 [J] item deciding each expert's width. *_names label rows for error messages. Every guard group lies
    inside one budget row, so the budget rows are independent MILPs (see :func:`_solve_by_budget_row`).
    """

    costs: np.ndarray
    weights: np.ndarray
    budget_group: np.ndarray
    budget_names: tuple[str, ...]
    guard_group: np.ndarray
    guard_need: np.ndarray
    guard_names: tuple[str, ...]
    expert_item: np.ndarray
    guard_hint: str = ""


# --------------------------------------------------------------------------------------------------- validation


def _validate_bits(bits: Sequence[int]) -> np.ndarray:
    """Return the candidate widths as int64 [K]; raise ValueError if empty, duplicated, non-integer or < 1."""
    widths = np.asarray(bits)
    if widths.ndim != 1 or widths.size == 0:
        raise ValueError(f"bits must be a non-empty 1-D sequence of widths, got {bits!r}")
    if not np.issubdtype(widths.dtype, np.integer):
        if not (np.issubdtype(widths.dtype, np.floating) and np.all(widths == np.round(widths))):
            raise ValueError(f"bits must be integers, got {bits!r}")
    widths = widths.astype(np.int64)
    if np.any(widths < 1):
        raise ValueError(f"bits must be >= 1, got {bits!r}")
    if np.unique(widths).size != widths.size:
        raise ValueError(f"bits must not repeat a width, got {bits!r}")
    return widths


def check_budget(bits: Sequence[int], avg_bits: float) -> None:
    """Check that an average of ``avg_bits`` bits per weight can be met with the candidate widths ``bits``.

    Raises:
        ValueError: ``bits`` is empty, repeats a width, or holds a non-integer / non-positive value; ``avg_bits`` is
            not a finite number.
        InfeasibleBudgetError: ``avg_bits`` < min(bits) (no allocation fits) or > max(bits) (the budget can never be
            used); the message says what to change.
    """
    widths = _validate_bits(bits)
    if not np.isfinite(avg_bits):
        raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}")
    low, high = int(widths.min()), int(widths.max())
    if avg_bits < low:
        raise InfeasibleBudgetError(
            f"avg_bits={avg_bits} is below the smallest candidate width {low}: no allocation fits; "
            f"raise avg_bits to at least {low} or add a smaller width to bits={sorted(widths.tolist())}"
        )
    if avg_bits > high:
        raise InfeasibleBudgetError(
            f"avg_bits={avg_bits} is above the largest candidate width {high}: the budget can never be used; "
            f"lower avg_bits to at most {high} or add a larger width to bits={sorted(widths.tolist())}"
        )


def _validate_experts(costs: np.ndarray, params: np.ndarray, set_index: np.ndarray, n_bits: int):
    """Return (costs float64 [J, K], params float64 [J], set_index int64 [J]); raise ValueError on bad input."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 2 or costs.shape[0] == 0 or costs.shape[1] != n_bits:
        raise ValueError(f"costs must have shape [J >= 1, len(bits)={n_bits}], got {costs.shape}")
    if not np.all(np.isfinite(costs)):
        raise ValueError("costs must be finite (found NaN or inf)")
    n_experts = costs.shape[0]
    return costs, _validate_params(params, n_experts), _validate_set_index(set_index, n_experts)


def _validate_params(params: np.ndarray, n_experts: int | None) -> np.ndarray:
    """Return params as float64 [J]; raise ValueError unless it is [J] (any J >= 1 if None), finite and > 0."""
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 1 or params.size == 0 or (n_experts is not None and params.size != n_experts):
        raise ValueError(f"params must have shape [J={n_experts or 'J >= 1'}], got {params.shape}")
    if not np.all(np.isfinite(params)) or np.any(params <= 0):
        raise ValueError("params must be finite and > 0 (the weight count of every expert)")
    return params


def _validate_set_index(set_index: np.ndarray, n_experts: int) -> np.ndarray:
    """Return set_index as int64 [J]; raise ValueError unless it is [J] of non-negative integers."""
    raw = np.asarray(set_index)
    if raw.shape != (n_experts,):
        raise ValueError(f"set_index must have shape [J={n_experts}], got {raw.shape}")
    if raw.dtype == bool or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"set_index must hold integers, got dtype {raw.dtype}")
    if np.any(raw < 0):
        raise ValueError("set_index must be >= 0")
    return raw.astype(np.int64)


def _validate_options(scope: str, min_top_per_set: int, time_limit: float | None) -> None:
    """Raise ValueError for an unknown scope, a negative / non-integer guard or a non-positive time limit."""
    if scope not in _SCOPE_BUILDERS:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    if isinstance(min_top_per_set, bool) or not isinstance(min_top_per_set, (int, np.integer)):
        raise ValueError(f"min_top_per_set must be an int, got {min_top_per_set!r}")
    if min_top_per_set < 0:
        raise ValueError(f"min_top_per_set must be >= 0, got {min_top_per_set}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be None or > 0 seconds, got {time_limit!r}")


# ----------------------------------------------------------------------------------------------- scope builders


def _compact_sets(set_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels int64 [S] of the sets present, compact int64 [J] in 0..S-1)."""
    labels, compact = np.unique(set_index, return_inverse=True)
    return labels, compact.reshape(-1)


def _set_names(labels: np.ndarray) -> tuple[str, ...]:
    return tuple(f"set {int(label)}" for label in labels)


def _expert_problem(costs, params, set_index, need: np.ndarray, per_set_budget: bool) -> _ChoiceProblem:
    """Items are the experts; the budget is one row (global) or one row per set (layer)."""
    labels, compact = _compact_sets(set_index)
    names = _set_names(labels)
    budget_group = compact if per_set_budget else np.zeros_like(compact)
    return _ChoiceProblem(
        costs=costs,
        weights=params,
        budget_group=budget_group,
        budget_names=names if per_set_budget else ("all experts",),
        guard_group=compact,
        guard_need=np.tile(need, (labels.size, 1)),  # [S, K]
        guard_names=names,
        expert_item=np.arange(costs.shape[0], dtype=np.int64),
    )


def _global_problem(costs, params, set_index, need) -> _ChoiceProblem:
    return _expert_problem(costs, params, set_index, need, per_set_budget=False)


def _layer_problem(costs, params, set_index, need) -> _ChoiceProblem:
    return _expert_problem(costs, params, set_index, need, per_set_budget=True)


def _layer_uniform_problem(costs, params, set_index, need) -> _ChoiceProblem:
    """Items are the sets: cost summed over the set's experts, weight = the set's P, one global budget row."""
    labels, compact = _compact_sets(set_index)
    n_sets, n_experts = labels.size, costs.shape[0]
    import scipy.sparse as sp

    member = sp.csr_matrix((np.ones(n_experts), (compact, np.arange(n_experts))), shape=(n_sets, n_experts))
    return _ChoiceProblem(
        costs=np.asarray(member @ costs),  # [S, K]
        weights=np.bincount(compact, weights=params, minlength=n_sets),  # [S]
        budget_group=np.zeros(n_sets, dtype=np.int64),
        budget_names=("all experts",),
        guard_group=np.arange(n_sets, dtype=np.int64),
        guard_need=np.tile(np.minimum(need, 1), (n_sets, 1)),  # [S, K]
        guard_names=_set_names(labels),
        expert_item=compact,
        guard_hint=" (under layer_uniform a guard at one width puts every set at that width; "
        "use no guard with layer_uniform)",
    )


_SCOPE_BUILDERS: dict[str, Callable[..., _ChoiceProblem]] = {
    "global": _global_problem,
    "layer": _layer_problem,
    "layer_uniform": _layer_uniform_problem,
}


# -------------------------------------------------------------------------------------------- budget arithmetic


def _budget_usage(problem: _ChoiceProblem, extra_bits: np.ndarray) -> np.ndarray:
    """Average bits above min(B) per budget row, float64 [R], for extra_bits float [I] (width - min(B) per item)."""
    n_rows = len(problem.budget_names)
    used = np.bincount(problem.budget_group, weights=problem.weights * extra_bits, minlength=n_rows)
    total = np.bincount(problem.budget_group, weights=problem.weights, minlength=n_rows)
    return used / total


def _budget_cap(widths: np.ndarray, avg_bits: float) -> float:
    """Allowed average bits above min(B), with the relative slack BUDGET_RTOL."""
    return avg_bits * (1.0 + BUDGET_RTOL) - float(widths.min())


def _guard_text(need: np.ndarray, widths: np.ndarray) -> str:
    return "{" + ", ".join(f"{int(w)}-bit: {int(n)}" for w, n in zip(widths, need) if n) + "} experts per set"


def _check_guard_counts(set_index: np.ndarray, need: np.ndarray, widths: np.ndarray) -> None:
    """Raise InfeasibleBudgetError naming the first set with fewer experts than the guards require."""
    labels, counts = np.unique(set_index, return_counts=True)
    short = np.flatnonzero(counts < need.sum())
    if short.size:
        first = short[0]
        raise InfeasibleBudgetError(
            f"the guard {_guard_text(need, widths)} is infeasible: set {int(labels[first])} has only "
            f"{int(counts[first])} experts ({short.size} sets are too small); ask for at most {int(counts.min())} "
            "guarded experts per set"
        )


def _check_uniform_guard(scope: str, need: np.ndarray, widths: np.ndarray) -> None:
    if scope == "layer_uniform" and np.count_nonzero(need) > 1:
        raise InfeasibleBudgetError(
            f"the guard {_guard_text(need, widths)} cannot hold under layer_uniform, where every set has one width: "
            "guard at most one width, or use scope='layer' or 'global'"
        )


def _check_guard_budget(problem: _ChoiceProblem, widths: np.ndarray, avg_bits: float) -> None:
    """Raise InfeasibleBudgetError when the cheapest guard-satisfying allocation already breaks a budget row.

    The cheapest one puts, in every guard group, the lightest items on the required slots, the lightest on the widest
    slot (rearrangement inequality), and the rest at min(B); the guard is feasible iff this allocation fits, so the
    check is exact.
    """
    order = np.lexsort((problem.weights, problem.guard_group))  # by group, then weight
    group_sorted = problem.guard_group[order]
    starts = np.searchsorted(group_sorted, group_sorted, side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - starts  # rank of each item inside its guard group
    need = problem.guard_need[problem.guard_group]  # [I, K]
    slots = np.argsort(-widths)  # width columns, widest first
    ends = np.cumsum(need[:, slots], axis=1)  # [I, K] slot ranks covered by the widest columns
    column = slots[np.minimum((rank[:, None] >= ends).sum(axis=1), widths.size - 1)]  # [I]
    guarded = rank < need.sum(axis=1)
    usage = _budget_usage(problem, np.where(guarded, widths[column] - widths.min(), 0).astype(np.float64))
    over = np.flatnonzero(usage > _budget_cap(widths, avg_bits))
    if over.size:
        row = over[0]
        needed = usage[row] + widths.min()
        raise InfeasibleBudgetError(
            f"the guard {_guard_text(problem.guard_need.max(axis=0), widths)} is infeasible with avg_bits={avg_bits}: "
            f"it alone needs {needed:.6g} average bits in {problem.budget_names[row]}{problem.guard_hint}; "
            f"raise avg_bits to at least {needed:.6g} or lower the guard (min_top_per_set / min_per_set)"
        )


# ------------------------------------------------------------------------------------------------------ solving


def _constraint_matrices(problem: _ChoiceProblem, widths: np.ndarray):
    """Sparse rows over the flat variable x[i * K + k]: (assign [I, IK], budget [R, IK], guard [G', IK], need [G'])."""
    import scipy.sparse as sp

    n_items, n_bits = problem.costs.shape
    flat = np.arange(n_items * n_bits).reshape(n_items, n_bits)  # [I, K]
    assign = sp.csr_matrix(
        (np.ones(flat.size), (np.repeat(np.arange(n_items), n_bits), flat.ravel())), shape=(n_items, flat.size)
    )
    total = np.bincount(problem.budget_group, weights=problem.weights)  # [R]
    share = problem.weights / total[problem.budget_group]  # [I] fraction of its budget row
    extra = share[:, None] * (widths - widths.min())[None, :]  # [I, K] average bits above min(B)
    budget = sp.csr_matrix(
        (extra.ravel(), (np.repeat(problem.budget_group, n_bits), flat.ravel())), shape=(total.size, flat.size)
    )
    groups, columns = np.nonzero(problem.guard_need)  # one row per (guard group, width) that constrains anything
    row_of = np.full(problem.guard_need.shape, -1, dtype=np.int64)
    row_of[groups, columns] = np.arange(groups.size)
    rows = row_of[problem.guard_group]  # [I, K]
    items, item_columns = np.nonzero(rows >= 0)
    guard = sp.csr_matrix(
        (np.ones(items.size), (rows[items, item_columns], flat[items, item_columns])), shape=(groups.size, flat.size)
    )
    return assign, budget, guard, problem.guard_need[groups, columns].astype(np.float64)


def _solve_once(problem: _ChoiceProblem, widths: np.ndarray, cap: np.ndarray, time_limit: float | None):
    """One cvxpy/HiGHS solve with budget rows <= cap [R]; return (x float [I, K] or None, cvxpy status)."""
    assign, budget, guard, need = _constraint_matrices(problem, widths)
    shifted = problem.costs - problem.costs.min(axis=1, keepdims=True)  # same argmin, better conditioned
    scale = float(shifted.max()) or 1.0
    import cvxpy as cp

    x = cp.Variable(assign.shape[1], boolean=True)
    constraints = [assign @ x == 1, budget @ x <= cap]
    if guard.shape[0]:
        constraints.append(guard @ x >= need)
    problem_cp = cp.Problem(cp.Minimize((shifted.ravel() / scale) @ x), constraints)
    options = dict(_HIGHS_OPTIONS)
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    problem_cp.solve(solver=cp.HIGHS, **options)
    value = None if x.value is None else np.asarray(x.value).reshape(problem.costs.shape)
    return value, problem_cp.status


def _round_choice(x: np.ndarray, status: str) -> np.ndarray:
    """Round a solver solution [I, K] to one width index per item, int64 [I]; raise RuntimeError if not binary."""
    rounded = np.rint(x)  # [I, K]
    binary = np.all((rounded == 0) | (rounded == 1)) and np.max(np.abs(x - rounded)) <= 1e-4
    if not binary or np.any(rounded.sum(axis=1) != 1):
        raise RuntimeError(f"HiGHS returned a non-binary assignment (status {status!r})")
    return np.argmax(rounded, axis=1).astype(np.int64)


def _raise_no_solution(problem: _ChoiceProblem, status: str, time_limit: float | None) -> None:
    """Turn a solve without a solution into InfeasibleBudgetError (infeasible) or RuntimeError (anything else)."""
    where = ", ".join(problem.budget_names)
    if status in INFEASIBLE_STATUSES:
        raise InfeasibleBudgetError(f"the allocation MILP for {where} is infeasible ({status!r}); raise avg_bits")
    hint = f"; raise time_limit (now {time_limit:.3g} s left)" if time_limit is not None else ""
    raise RuntimeError(f"HiGHS stopped without a feasible allocation for {where} (status {status!r}){hint}")


def _solve_choice(problem: _ChoiceProblem, widths: np.ndarray, avg_bits: float, time_limit: float | None):
    """Solve the multiple-choice MILP exactly in binaries; return (choice int64 [I] width index per item, status).

    A solution HiGHS accepts inside its feasibility tolerance can break the exact budget after rounding; then the
    violated rows are tightened by twice the violation and the problem re-solved (at most _MAX_RESOLVES times).
    Raises InfeasibleBudgetError / RuntimeError as :func:`_raise_no_solution`.
    """
    target = _budget_cap(widths, avg_bits)
    cap = np.full(len(problem.budget_names), target)
    for attempt in range(_MAX_RESOLVES + 1):
        x, status = _solve_once(problem, widths, cap, time_limit)
        if x is None:
            _raise_no_solution(problem, status, time_limit)
        choice = _round_choice(x, status)
        excess = _budget_usage(problem, (widths - widths.min())[choice].astype(np.float64)) - target  # [R]
        if np.all(excess <= 0):
            return choice, status
        logger.info("rounded allocation breaks the budget by %.3g bits (attempt %d); re-solving", excess.max(), attempt)
        cap = np.where(excess > 0, cap - 2.0 * excess, cap)
    raise RuntimeError(f"could not find an allocation within the budget after {_MAX_RESOLVES} re-solves")


def _restrict(problem: _ChoiceProblem, row: int) -> tuple[np.ndarray, _ChoiceProblem]:
    """Items int64 [I_r] of budget row ``row`` and the sub-problem over them (guard groups re-numbered)."""
    items = np.flatnonzero(problem.budget_group == row)
    groups, guard_group = np.unique(problem.guard_group[items], return_inverse=True)
    sub = dataclasses.replace(
        problem,
        costs=problem.costs[items],
        weights=problem.weights[items],
        budget_group=np.zeros(items.size, dtype=np.int64),
        budget_names=(problem.budget_names[row],),
        guard_group=guard_group.reshape(-1).astype(np.int64),
        guard_need=problem.guard_need[groups],
        guard_names=tuple(problem.guard_names[g] for g in groups),
        expert_item=np.arange(items.size, dtype=np.int64),
    )
    return items, sub


def _solve_by_budget_row(problem: _ChoiceProblem, widths: np.ndarray, avg_bits: float, time_limit: float | None):
    """Solve every budget row as its own MILP; return (choice int64 [I], status: the first non-optimal one, if any).

    Rows share no item and no guard group, so this is exact. For the layer scope it is also much faster: HiGHS,
    handed all S knapsacks in one model, has to close their gaps jointly (16 sets x 256 experts with random sizes:
    17-29 s jointly, 2 s one set at a time). ``time_limit`` bounds the total; each row gets what is left.
    """
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    choice = np.empty(problem.costs.shape[0], dtype=np.int64)
    statuses = []
    for row in range(len(problem.budget_names)):
        items, sub = _restrict(problem, row)
        left = None if deadline is None else max(deadline - time.perf_counter(), _MIN_TIME_LIMIT)
        choice[items], status = _solve_choice(sub, widths, avg_bits, left)
        statuses.append(status)
    return choice, next((status for status in statuses if status != OPTIMAL), OPTIMAL)


def _guard_need(widths: np.ndarray, min_top: int, min_per_set: Mapping[int, int] | None) -> np.ndarray:
    """Experts required per set at each width column, int64 [K]; ValueError for a width not in `widths`."""
    need = np.zeros(widths.size, dtype=np.int64)
    need[int(np.argmax(widths))] = min_top
    for width, count in (min_per_set or {}).items():
        columns = np.flatnonzero(widths == width)
        if columns.size == 0:
            raise ValueError(f"min_per_set names width {width}, which is not among the candidate bits {widths.tolist()}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"min_per_set[{width}] must be an int >= 0, got {count!r}")
        need[columns[0]] = max(need[columns[0]], int(count))
    return need


# ------------------------------------------------------------------------------------------------------ public


def allocate(
    costs: np.ndarray,
    params: np.ndarray,
    set_index: np.ndarray,
    bits: Sequence[int],
    avg_bits: float,
    scope: str = "global",
    min_top_per_set: int = 0,
    time_limit: float | None = None,
    min_per_set: Mapping[int, int] | None = None,
) -> Allocation:
    """Choose one width per expert minimizing the summed cost under a bit budget (boolean MILP, HiGHS).

    Args:
        costs: float [J, K], column k is the cost of the expert at width bits[k]; finite.
        params: int/float [J], weight count P_j of each expert, > 0.
        set_index: int [J], expert set (MoE layer) of each expert, >= 0; the sets are the distinct values.
        bits: K distinct candidate widths, any order (e.g. (2, 3, 4)).
        avg_bits: budget, average bits per weight, min(bits) <= avg_bits <= max(bits); met up to BUDGET_RTOL.
        scope: one of SCOPES (see the module docstring).
        min_top_per_set: at least this many experts of every set at max(bits) (layer_uniform: see module docstring).
        min_per_set: {width: count}: at least `count` experts of every set at exactly `width` (a width in `bits`);
            merged with min_top_per_set (the larger count wins at the top width).
        time_limit: limit in seconds on the HiGHS solves (all sets together for ``layer``); when hit, the best
            allocation found is returned with status ``"user_limit"``.

    Returns:
        Allocation with bits int64 [J]; inputs are not modified.

    Raises:
        ValueError: bad shapes, NaN/inf costs, non-positive params, negative set ids, unknown scope, bad guard.
        InfeasibleBudgetError: avg_bits outside [min(bits), max(bits)], or a guard that cannot be met (too few experts
            in a set, or the guard alone exceeding the budget); the message names the set.
        RuntimeError: HiGHS stopped (time limit) before finding any feasible allocation.
    """
    start = time.perf_counter()
    widths = _validate_bits(bits)
    _validate_options(scope, min_top_per_set, time_limit)
    costs, params, set_index = _validate_experts(costs, params, set_index, widths.size)
    check_budget(widths, avg_bits)
    need = _guard_need(widths, int(min_top_per_set), min_per_set)  # [K]
    _check_guard_counts(set_index, need, widths)
    _check_uniform_guard(scope, need, widths)
    problem = _SCOPE_BUILDERS[scope](costs, params, set_index, need)
    _check_guard_budget(problem, widths, avg_bits)
    choice, status = _solve_by_budget_row(problem, widths, avg_bits, time_limit)
    expert_choice = choice[problem.expert_item]  # [J] width index per expert
    chosen = widths[expert_choice]  # [J] int64
    seconds = time.perf_counter() - start
    logger.debug("allocate scope=%s J=%d K=%d: %s in %.3f s", scope, costs.shape[0], widths.size, status, seconds)
    return Allocation(
        bits=chosen,
        objective=float(costs[np.arange(costs.shape[0]), expert_choice].sum()),
        average_bits=float(np.dot(params, chosen) / params.sum()),
        solve_seconds=seconds,
        status=status,
    )


def best_uniform_layer_average(
    params: np.ndarray, set_index: np.ndarray, bits: Sequence[int], avg_bits: float
) -> float:
    """Largest average bit-width <= avg_bits reachable when every set takes one width (layer_uniform layouts).

    Solved as a small multiple-choice MILP over the sets that maximizes the bits used. Callers compare it with
    avg_bits to tell users that their layer_uniform budget cannot be reached exactly.

    Args:
        params: int/float [J] > 0, weight count per expert.
        set_index: int [J] >= 0, set of each expert.
        bits: distinct candidate widths.
        avg_bits: budget, min(bits) <= avg_bits <= max(bits).

    Returns:
        sum_s P_s b_s / sum_s P_s of the best layout (a float in [min(bits), avg_bits * (1 + BUDGET_RTOL)]).

    Raises:
        ValueError / InfeasibleBudgetError: as :func:`allocate` for bad inputs or avg_bits outside the widths.
    """
    widths = _validate_bits(bits)
    params = _validate_params(params, None)
    set_index = _validate_set_index(set_index, params.size)
    check_budget(widths, avg_bits)
    sets = _layer_uniform_problem(np.zeros((params.size, widths.size)), params, set_index, 0)
    used = -sets.weights[:, None] * widths[None, :].astype(np.float64)  # [S, K] maximize bits used
    problem = dataclasses.replace(sets, costs=used)
    choice, _ = _solve_choice(problem, widths, avg_bits, None)
    return float(np.dot(sets.weights, widths[choice]) / sets.weights.sum())
