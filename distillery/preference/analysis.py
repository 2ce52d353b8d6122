"""From validated votes to results: attention screening, unblinding, win/tie/loss per pair with Wilson
intervals, and Bradley–Terry scores (Hunter's MM algorithm) with a seeded cluster bootstrap.

Ties count as half a win for each side in Bradley–Terry. Votes of one rater (or on one item) are not
independent; the Wilson intervals treat them as if they were, the bootstrap resamples whole raters (or items).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.sparse.csgraph import connected_components

from distillery.preference.study import COMPARISON, StudyKey
from distillery.preference.votes import Vote


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927); (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass(frozen=True)
class RaterScreen:
    rater: str
    votes: int
    checks: int  # attention checks answered
    failed: int  # of which answered wrongly


def screen_raters(votes: list[Vote], keys: dict[str, StudyKey]) -> dict[str, RaterScreen]:
    """Attention-check record of every rater, over all studies (a rater is one person across pairs)."""
    counts = defaultdict(lambda: [0, 0, 0])
    for v in votes:
        expected = keys[v.study].items[v.item].expected
        c = counts[v.rater]
        c[0] += 1
        if expected is not None:
            c[1] += 1
            c[2] += v.choice != expected
    return {r: RaterScreen(r, *c) for r, c in sorted(counts.items())}


@dataclass(frozen=True)
class Comparison:
    rater: str
    item: str  # "<study>/<item>"
    a: str  # the study's first system
    b: str
    score: float  # 1: a preferred, 0.5: tie, 0: b preferred


def unblind(votes: list[Vote], keys: dict[str, StudyKey]) -> list[Comparison]:
    """The votes on real comparisons (attention checks left out), in terms of systems instead of sides."""
    out = []
    for v in votes:
        key = keys[v.study]
        if key.items[v.item].kind != COMPARISON:
            continue
        a, b = key.systems
        chosen = key.chosen(v.item, v.choice)
        out.append(Comparison(v.rater, f"{v.study}/{v.item}", a, b, 0.5 if chosen is None else float(chosen == a)))
    return out


@dataclass(frozen=True)
class Rate:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PairResult:
    a: str
    b: str
    votes: int
    a_wins: int
    ties: int
    b_wins: int
    a_rate: Rate | None  # share of votes; None without votes
    tie_rate: Rate | None
    b_rate: Rate | None
    a_decisive: Rate | None  # share of the non-tie votes that prefer a
    sign_test_p: float | None  # two-sided exact binomial test of a_wins vs b_wins, ties dropped


def _rate(k, n, confidence):
    return Rate(k / n, *wilson_interval(k, n, confidence)) if n else None


def pair_result(a: str, b: str, comparisons: list[Comparison], confidence: float = 0.95) -> PairResult:
    scores = [c.score if c.a == a else 1 - c.score for c in comparisons if {c.a, c.b} == {a, b}]
    a_wins, ties = scores.count(1.0), scores.count(0.5)
    n = len(scores)
    b_wins = n - a_wins - ties
    decisive = a_wins + b_wins
    p = float(stats.binomtest(a_wins, decisive, 0.5).pvalue) if decisive else None
    return PairResult(
        a,
        b,
        n,
        a_wins,
        ties,
        b_wins,
        _rate(a_wins, n, confidence),
        _rate(ties, n, confidence),
        _rate(b_wins, n, confidence),
        _rate(a_wins, decisive, confidence),
        p,
    )


def win_matrix(comparisons: list[Comparison], systems: list[str]) -> np.ndarray:
    """wins[i, j]: how often system i was preferred over j, a tie counting one half for each."""
    index = {s: k for k, s in enumerate(systems)}
    wins = np.zeros((len(systems), len(systems)))
    for c in comparisons:
        i, j = index[c.a], index[c.b]
        wins[i, j] += c.score
        wins[j, i] += 1 - c.score
    return wins


def bradley_terry(
    wins: np.ndarray, compared: np.ndarray, prior: float, tol: float = 1e-10, max_iter: int = 100_000
) -> np.ndarray:
    """Log-strengths θ (mean 0) maximising the Bradley–Terry likelihood, P(i over j) = 1 / (1 + exp(θj − θi)).

    `wins` is [..., K, K] (a batch of win matrices); `compared` [K, K] marks the pairs in the design, each of
    which gets `prior` virtual ties so that the scores stay finite when a system never wins or never loses.
    MM update (Hunter 2004, eq. 3): p_i ← W_i / Σ_j n_ij / (p_i + p_j)."""
    compared = compared.astype(bool)
    if connected_components(compared | compared.T, directed=False)[0] != 1:
        raise ValueError("the compared pairs do not connect all systems: their scores are not on one scale")
    w = wins + prior / 2 * (compared | compared.T)
    n = w + np.swapaxes(w, -1, -2)
    total_wins = w.sum(axis=-1)
    log_p = np.zeros(w.shape[:-1])
    for _ in range(max_iter):
        p = np.exp(log_p)
        denominator = (n / (p[..., :, None] + p[..., None, :])).sum(axis=-1)
        new = np.log(total_wins / denominator)
        new -= new.mean(axis=-1, keepdims=True)
        converged = np.max(np.abs(new - log_p), initial=0.0) < tol
        log_p = new
        if converged:
            break
    return log_p


@dataclass(frozen=True)
class Score:
    system: str
    theta: float
    low: float
    high: float


def bootstrap_bradley_terry(
    comparisons: list[Comparison],
    systems: list[str],
    compared: np.ndarray,
    prior: float,
    unit: str,
    resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> list[Score]:
    """Bradley–Terry scores with percentile intervals from resampling whole units ("rater" or "item")."""
    theta = bradley_terry(win_matrix(comparisons, systems), compared, prior)
    units = defaultdict(list)
    for c in comparisons:
        units[c.rater if unit == "rater" else c.item].append(c)
    if len(units) < 2:
        return [Score(s, float(t), float("nan"), float("nan")) for s, t in zip(systems, theta, strict=True)]
    per_unit = np.stack([win_matrix(units[u], systems) for u in sorted(units)])
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(per_unit), size=(resamples, len(per_unit)))
    counts = np.stack([np.bincount(d, minlength=len(per_unit)) for d in draws])
    samples = bradley_terry(np.einsum("bu,ukl->bkl", counts, per_unit), compared, prior)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return [Score(s, float(t), float(lo), float(hi)) for s, t, lo, hi in zip(systems, theta, low, high, strict=True)]


@dataclass(frozen=True)
class Analysis:
    raters: dict[str, RaterScreen]
    excluded: list[RaterScreen]  # raters with more than max_failed wrong attention checks
    votes_used: int  # votes of kept raters on real comparisons
    pairs: list[PairResult]
    scores: list[Score] | None  # Bradley–Terry, only with more than two systems


def analyse(
    votes: list[Vote],
    keys: dict[str, StudyKey],
    max_failed: int,
    confidence: float = 0.95,
    resamples: int = 2000,
    unit: str = "rater",
    prior: float = 1.0,
    seed: int = 0,
) -> Analysis:
    raters = screen_raters(votes, keys)
    excluded = [r for r in raters.values() if r.failed > max_failed]
    dropped = {r.rater for r in excluded}
    comparisons = unblind([v for v in votes if v.rater not in dropped], keys)
    designs = [k.systems for k in keys.values()]
    pairs = [pair_result(a, b, comparisons, confidence) for a, b in designs]
    systems = list(dict.fromkeys(s for pair in designs for s in pair))
    scores = None
    if len(systems) > 2:
        index = {s: k for k, s in enumerate(systems)}
        compared = np.zeros((len(systems), len(systems)), dtype=bool)
        for a, b in designs:
            compared[index[a], index[b]] = True
        scores = bootstrap_bradley_terry(comparisons, systems, compared, prior, unit, resamples, seed, confidence)
    return Analysis(raters, excluded, len(comparisons), pairs, scores)
