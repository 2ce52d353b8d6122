"""SIM: Score Implicit Matching (Luo, Huang, Geng, Kolter, Qi; NeurIPS 2024), docs/methods.md §3.2.

No official training code exists; the loss below is the reconstruction of §3.2, checked in
tests/test_sim.py against finite differences of the divergence on an exact Gaussian teacher.

Choices the paper's text would settle but that were not readable (§3.2, §9), made here:

- Time weighting w(σ) = σ^weight_power, default σ². Multiplying the score-unit integrand by σ² puts
  the divergence in EDM denoiser units: σ²·d(y) = √(‖D_φ − D_θ‖² + (cσ²)²) − cσ², a pseudo-Huber
  distance between denoised images whose quadratic zone grows as cσ². The direct push on x_g,
  −w(σ)/σ²·d′(y), then has norm below 1 at every noise level, so no level dominates; with σ⁴
  (SiD's factor without its normaliser) it is σ²·d′ and the large-σ levels would, with σ⁰ it is
  d′/σ² and the small ones would.
- c = 0.4 (score units, the units of y). y = (D_φ − D_ψ)/σ² spans orders of magnitude over σ,
  while ‖D_φ − D_ψ‖ varies far less: 0.07–0.54 for σ from 0.05 to 14 on the 8×8 toy in [-1, 1]
  (measured over the first 100 steps of a SIM run from the toy teacher, batch 128, lr 1e-4), so c
  sets the noise level σ* = √(‖D_φ − D_ψ‖/c) below which d′ is normalised (‖y‖ ≫ c) and above
  which it is quadratic.
  Median ‖y‖ at σ = 1 was 0.24–0.52 there, so c = 0.4 puts σ* near 1, the median SiD noise level:
  about half of the draws fall on each side. ‖D_φ − D_ψ‖ grows with the root of the pixel count,
  so for CIFAR-10 (3072 values) the same split needs c ≈ 0.4·√(3072/64) ≈ 2.8; the paper's value
  is unknown. c must be positive: with c = 0, d′(0) is 0/0, and y is exactly 0 wherever the fake
  net still equals the teacher.
- σ is drawn as in SiD (sid_sigmas, t_max = 800), the likely but unconfirmed choice.
- loss_scale_g = 1: under Adam a global factor only matters against ε, and the per-sample push on
  x_g is already of order one; SiD's 100 is its authors' setting for its own loss and is not carried over.
"""

from distillery.edm import broadcast_per_sample
from distillery.methods.base import FakeScoreMethod
from distillery.methods.sid import sid_sigmas
from distillery.registry import SIMSettings


def pseudo_huber_derivative(y, c):
    """d′(y) = y / √(‖y‖² + c²), the norm taken per sample over all pixels (§3.2)."""
    # §3.2: d(y) = sqrt(||y||^2 + c^2) - c, so d'(y) = y / sqrt(||y||^2 + c^2).
    norm = (y.flatten(1).pow(2).sum(1) + c**2).sqrt()
    return y / broadcast_per_sample(norm, y)


def distance_derivative(y, distance, c):
    """d′(y) for the pseudo-Huber distance, or 2y for the squared ℓ₂ distance d = ‖y‖² (§3.2)."""
    if distance == "pseudo_huber":
        return pseudo_huber_derivative(y, c)
    return 2 * y


def sim_loss_core(x_g, d_teacher, d_fake, sigma, distance, c):
    """Per-sample SIM loss in score units with weight 1, [B]; every factor keeps its gradient, d′ included.

    d′(y)·(s_ψ − ∇log q(x_t | x_g)) with y = s_φ − s_ψ = (D_φ − D_ψ)/σ² and
    s_ψ − ∇log q = (D_ψ − x_g)/σ² (§3.2).
    """
    y = (d_teacher - d_fake) / sigma**2
    # §3.2: L_SIM = d'(y) . (s_psi(x_t) - grad log q(x_t | x_g)), summed over pixels.
    return (distance_derivative(y, distance, c) * (d_fake - x_g) / sigma**2).flatten(1).sum(1)


def sim_generator_loss(x_g, d_teacher, d_fake, sigma, distance, c, weight_power):
    """Per-sample SIM generator loss, [B]: w(σ) = σ^weight_power times the core; `sigma` is per sample,
    shaped to broadcast against x_g."""
    # w(sigma) = sigma^p: the paper's w(t) is unknown (§3.2, §9); the choice is argued in the module docstring.
    weight = sigma.flatten(1)[:, 0] ** weight_power
    return weight * sim_loss_core(x_g, d_teacher, d_fake, sigma, distance, c)


class SIM(FakeScoreMethod):
    """SIM generator loss; the fake-score update is the shared one of FakeScoreMethod."""

    def __init__(self, **settings):
        s = SIMSettings(**settings)
        super().__init__(s)
        self.c, self.t_max, self.distance = s.c, s.t_max, s.distance
        self.loss_scale_g, self.weight_power = s.loss_scale_g, s.weight_power

    def generator_loss(self, generator, aux, teacher, z, class_labels=None, real=None):
        """Scalar generator loss: sum of per-sample SIM losses * loss_scale_g / batch.

        Gradients reach the generator through x_g and through the inputs of both (frozen) denoisers,
        including those inside the d′ factor.
        """
        x_g, sigma, d_teacher, d_fake = self.diffused_pair(
            generator, aux, teacher, z, class_labels, lambda n, device: sid_sigmas(n, self.t_max, device=device)
        )
        per_sample = sim_generator_loss(x_g, d_teacher, d_fake, sigma, self.distance, self.c, self.weight_power)
        return per_sample.sum() * self.loss_scale_g / z.shape[0]
