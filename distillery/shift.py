"""The covariate-shift diagnostic of a K-step student (docs/methods.md §3.11): at each of its levels σ_k, k ≥ 1, the
Fréchet distance between the states its sampler visits and the states it was trained on, in the FID feature space.

Both sets are drawn fresh from the final student: the inference states by its own K-step rollout, the training states
from the method's distribution at σ_k (DMD2: backward simulation; CD, PD: forward-diffused data; DDIL: the mixture).
States are clipped to the data range and quantised like images before the features (at large σ both sets are mostly
saturated noise, so the distance is small there by construction). k = 0 is pure noise in both and is left out.
"""

import torch

from distillery.fewstep import rollout
from distillery.metrics import extract_features, fid_from_statistics, fid_statistics, to_uint8


@torch.no_grad()
def covariate_shift(method, student, teacher, real, labels, features, num_states, seed=0, batch=500):
    """[{level, sigma, fd}] for k = 1 … K−1 of `method`'s levels; `real` float images in [-1, 1] with their one-hot
    `labels` (None: unconditional), from which the data states and the conditioning are drawn."""
    method.teacher = teacher
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(real), [num_states], generator=gen).to(real.device)
    x0, c = real[pick], None if labels is None else labels[pick]
    rows = []
    for k in range(1, len(method.levels)):
        torch.manual_seed(seed + k)  # the states' own noise: the same sets whatever ran before
        z = torch.randn(x0.shape, generator=gen).to(x0.device)
        noise = lambda j, like: torch.randn_like(like)  # noqa: E731
        sets = []
        for part in range(0, num_states, batch):
            s = slice(part, part + batch)
            cs = None if c is None else c[s]
            visited = rollout(
                method.student(student), method.levels, k, z[s], cs, noise, method.deterministic, method.clip
            )
            z_train = torch.randn(z[s].shape, generator=gen).to(x0.device)
            trained = method.states(method.levels[k], student, z_train, x0[s], cs)
            sets.append((visited, trained))
        stats = [
            fid_statistics(
                extract_features(to_uint8(torch.cat([p[i] for p in sets])), features, batch)[features.fid_key]
            )
            for i in range(2)
        ]
        rows.append({"level": k, "sigma": float(method.levels[k]), "fd": float(fid_from_statistics(*stats))})
    return rows
