"""K-step students (docs/methods.md §3.8): their noise levels, the multistep sampler, and the states they are
trained on — with DDIL's mixture of data, teacher and student states (§3.6).

A K-step student is an EDM denoiser G(x; σ) sampled at K fixed levels σ_0 = σ_max > σ_1 > … > σ_{K−1}:
x_0 = σ_0·z, x̂_k = G(x_k; σ_k), then x_{k+1} = x̂_k + σ_{k+1}·ε_k (stochastic: DMD2, multistep consistency
sampling) or the deterministic DDIM step x̂_k + σ_{k+1}·(x_k − x̂_k)/σ_k. NFE = K; K = 1 is the one-step student.
"""

import torch

from distillery.edm import broadcast_per_sample, karras_sigmas

SOURCES = ("data", "teacher", "student")


def student_sigmas(steps, num_train_timesteps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """DMD2's levels: `steps` evenly spaced timesteps from the top of a `num_train_timesteps`-level Karras schedule
    (t = 999, 749, 499, 249 for 4 steps), as float64 σ_0 = σ_max > … > σ_{K−1}."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1…{num_train_timesteps}, got {steps}")
    schedule = karras_sigmas(num_train_timesteps, sigma_min, sigma_max, rho)[:-1]  # descending, without the final 0
    return schedule[[k * num_train_timesteps // steps for k in range(steps)]]


def per_sample(sigma, x):
    """σ as a [B] tensor of x's dtype: a number (or one-element tensor) repeated, or one value per sample."""
    if torch.is_tensor(sigma) and sigma.numel() > 1:
        return sigma.to(x.dtype).to(x.device).flatten()
    return torch.full([len(x)], float(sigma), dtype=x.dtype, device=x.device)


def denoise(net, x, sigma, labels, clip):
    denoised = net(x, per_sample(sigma, x), labels)
    return denoised if clip is None else denoised.clamp(*clip)


def rollout(student, sigmas, k, latents, labels=None, noise=None, deterministic=False, clip=None):
    """The state x_k the student reaches at level k from x_0 = σ_0·z (backward simulation; k = 0 gives x_0).

    `noise(j, like)` gives ε_j of the stochastic step into level j + 1; `clip` = (lo, hi) clips every x̂ to the data
    range (DDIL's reflected variant)."""
    x = latents * float(sigmas[0])
    for j in range(k):
        denoised = denoise(student, x, sigmas[j], labels, clip)
        step = (x - denoised) / float(sigmas[j]) if deterministic else noise(j, denoised)
        x = denoised + float(sigmas[j + 1]) * step
    return x


def multistep(student, sigmas, deterministic=False, clip=None):
    """The sampler `(latents, labels, noise) -> images` of a K-step student at levels `sigmas` (descending)."""

    def sample(latents, labels, noise=None):
        last = len(sigmas) - 1
        x = rollout(student, sigmas, last, latents, labels, noise, deterministic, clip)
        return denoise(student, x, sigmas[last], labels, clip)

    return sample


def choose_sources(batch, weights, generator=None):
    """Each sample's source of training state, iid with probabilities ∝ `weights` (β_data, β_teacher, β_student);
    returns indices into SOURCES, [batch]."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (len(SOURCES),) or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"weights must be {len(SOURCES)} non-negative numbers, not all 0; got {weights.tolist()}")
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def teacher_rollout(teacher, sigma_from, sigma_to, x, labels=None, steps=8, clip=None, rho=7.0):
    """The teacher's deterministic Heun solution of the PF-ODE from σ_from to σ_to (> 0; a number or one per sample)
    over `steps` Karras-spaced intervals; `clip` clips every denoised prediction to the data range (reflected)."""
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    end = torch.as_tensor(sigma_to, dtype=torch.float64).flatten()[:, None]  # [B or 1, 1]
    grid = (sigma_from ** (1 / rho) + ramp * (end ** (1 / rho) - sigma_from ** (1 / rho))) ** rho
    for i in range(steps):
        s, t = (broadcast_per_sample(per_sample(grid[:, i + j], x), x) for j in (0, 1))
        d = (x - denoise(teacher, x, s, labels, clip)) / s
        x_next = x + (t - s) * d
        d_next = (x_next - denoise(teacher, x_next, t, labels, clip)) / t
        x = x + (t - s) * (d + d_next) / 2
    return x


def student_state(student, levels, sigma, z, labels=None, deterministic=False, clip=None):
    """The student's own state at σ < σ_0 (a number or one per sample): its rollout to the last of its levels above
    σ, that level's x̂ taken on to σ by the sampler's step (at σ = σ_k exactly the state its sampler visits at k)."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten().expand(len(z))
    last = (levels[None, :] > sigma[:, None]).sum(1) - 1  # each sample's last level above σ
    target = broadcast_per_sample(per_sample(sigma, z), z)
    x, out = z * float(levels[0]), torch.empty_like(z)
    for i in range(int(last.max()) + 1):
        denoised = denoise(student, x, levels[i], labels, clip)
        step = (x - denoised) / float(levels[i]) if deterministic else torch.randn_like(denoised)
        done = last == i
        out[done] = (denoised + target * step)[done]
        if i + 1 < len(levels):
            x = denoised + float(levels[i + 1]) * step
    return out


@torch.no_grad()
def states_at(
    sigma,
    z,
    sources,
    *,
    levels,
    student,
    teacher=None,
    real=None,
    labels=None,
    clip=None,
    rollout_steps=8,
    deterministic=False,
):
    """The states at level σ (a number or one per sample) a K-step student trains on, one per sample from its source
    (DDIL, §3.6): data — real + σ·ε (the forward-diffused data); teacher — the teacher's PF-ODE solution from σ_0·z to
    σ; student — its own rollout from σ_0·z (backward simulation). At σ ≥ σ_0 every source is pure noise σ·z."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten().expand(len(z)).cpu()
    top = float(levels[0])
    x = z * broadcast_per_sample(per_sample(sigma, z), z)  # pure noise, kept where σ ≥ σ_0
    for index, name in enumerate(SOURCES):
        rows = ((sources.cpu() == index) & (sigma < top)).nonzero().flatten().to(z.device)
        if not len(rows):
            continue
        part, level = None if labels is None else labels[rows], sigma[rows.cpu()]
        if name == "data":
            x[rows] = real[rows] + broadcast_per_sample(per_sample(level, real[rows]), real[rows]) * torch.randn_like(
                real[rows]
            )
        elif name == "teacher":
            x[rows] = teacher_rollout(teacher, top, level, z[rows] * top, part, rollout_steps, clip)
        else:
            x[rows] = student_state(student, levels, level, z[rows], part, deterministic, clip)
    return x


class FewStepStudent:
    """What the K-step methods share: their levels and sampler (§3.8) and the states they train on (§3.6).

    `base_source` is where the plain method's states come from (DMD2: the student's backward simulation; CD and PD:
    the forward-diffused data); DDIL replaces it by the mixture `ddil`."""

    base_source = "data"
    deterministic = False  # PD samples with DDIM steps

    def fewstep_setup(self, settings, levels):
        self.levels, self.nfe = levels, settings.steps
        self.clip = (-1.0, 1.0) if settings.reflect else None
        self.rollout_steps = settings.rollout_steps
        self.weights = settings.ddil or tuple(float(name == self.base_source) for name in SOURCES)
        self.needs_real_data = self.weights[0] > 0
        self.teacher = None  # set by make_aux: DDIL's teacher states roll the teacher out

    def student(self, generator):
        """The network the sampler calls at each level (CD: the consistency function around G)."""
        return generator

    def sampler(self, generator):
        """K steps at the student's levels, stochastic or DDIM, reflected when `reflect`."""
        return multistep(self.student(generator), self.levels, self.deterministic, self.clip)

    def states(self, sigma, generator, z, real=None, labels=None, levels=None):
        """Training states at σ ([B] or a number) from the method's mixture of sources; `levels`: the student's
        levels for its own rollouts (default: its sampling levels)."""
        if sum(w > 0 for w in self.weights) == 1:  # one source: no draw, so the plain method's RNG stream is its own
            sources = torch.full([len(z)], max(range(len(SOURCES)), key=self.weights.__getitem__), device=z.device)
        else:
            sources = choose_sources(len(z), self.weights).to(z.device)
        kwargs = dict(
            levels=self.levels if levels is None else levels,
            student=self.student(generator),
            teacher=self.teacher,
            real=real,
            labels=labels,
            clip=self.clip,
            rollout_steps=self.rollout_steps,
            deterministic=self.deterministic,
        )
        return states_at(sigma, z, sources, **kwargs)
