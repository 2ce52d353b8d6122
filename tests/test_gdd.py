import copy
import math

import pytest
import torch

from distillery.checkpoint import Checkpoints
from distillery.discriminators import BACKBONES, ProjectedDiscriminator, TeacherEncoderDiscriminator
from distillery.methods.gdd import GDD, GDDI, gdd_i_frozen, gdd_i_trainable
from distillery.networks import build_network, edm_config
from distillery.training import TrainingData, distill

from toys import F64, AffineGenerator, tiny_edm, tiny_run


class OptimalDiscriminator(torch.nn.Module):
    """D*(x) = log p_data(x) - log p_g(x) for isotropic Gaussians, as a single head of one logit per sample."""

    def __init__(self, mu_data, s_data, mu_g, s_g):
        super().__init__()
        self.register_buffer("mu_data", torch.as_tensor(mu_data, dtype=F64))
        self.register_buffer("mu_g", torch.as_tensor(mu_g, dtype=F64))
        self.s_data, self.s_g = s_data, s_g

    def forward(self, x, class_labels=None):
        def log_density(mu, s):
            return (-0.5 * ((x - mu) / s) ** 2 - math.log(s)).sum(1)

        return [(log_density(self.mu_data, self.s_data) - log_density(self.mu_g, self.s_g))[:, None]]


class LinearDiscriminator(torch.nn.Module):
    """D(x) = w . flatten(x) + b, one head."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, 1, dtype=F64)

    def forward(self, x, class_labels=None):
        return [self.lin(x.flatten(1))]


@pytest.mark.parametrize(
    "arch,kwargs,total_m,kept_m,frozen_pct",
    [
        ("ncsnpp", dict(channel_mult=[1, 2, 2, 2]), 62.76, 10.15, 83.8),  # FFHQ / AFHQv2 64×64
        ("adm", dict(label_dim=1000, use_fp16=True), 295.90, 62.83, 78.8),  # ImageNet 64×64
    ],
)
def test_gdd_i_frozen_fraction_of_the_64px_generators(arch, kwargs, total_m, kept_m, frozen_pct):
    # §3.3, computed there by instantiating the official classes; the meta device allocates nothing
    with torch.device("meta"):
        net = build_network(edm_config(arch, 64, 3, **kwargs))
    total = sum(p.numel() for p in net.parameters())
    kept = sum(p.numel() for _, p in gdd_i_trainable(net.named_parameters()))
    assert (round(total / 1e6, 2), round(kept / 1e6, 2)) == (total_m, kept_m)
    assert round(100 * (1 - kept / total), 1) == frozen_pct


def test_gdd_i_freezes_84_percent_of_the_cifar10_ncsnpp_generator():
    # The official CIFAR-10 NCSN++ configuration, with its 9-dim augment map (unused by GDD, trainable by the rule).
    torch.manual_seed(0)
    net = build_network(edm_config("ncsnpp", 32, 3))
    names = dict(net.named_parameters())
    trainable = dict(gdd_i_trainable(net.named_parameters()))
    total = sum(p.numel() for p in names.values())
    kept = sum(p.numel() for p in trainable.values())
    # §3.3: 8.80 M trainable of 56.40 M (84.4 % frozen)
    assert round(total / 1e6, 2) == 56.40
    assert round(kept / 1e6, 2) == 8.80
    assert round(100 * (1 - kept / total), 1) == 84.4
    frozen = [
        "model.enc.32x32_block0.conv0.weight",
        "model.enc.16x16_down.conv1.weight",
        "model.dec.16x16_up.conv0.bias",
        "model.dec.8x8_in0.conv1.weight",
        "model.enc.16x16_block0.proj.weight",
        "model.dec.8x8_in0.proj.bias",
    ]
    kept_names = [
        "model.enc.32x32_block0.affine.weight",
        "model.enc.32x32_block0.norm0.weight",
        "model.enc.16x16_down.skip.weight",
        "model.enc.16x16_block0.qkv.weight",
        "model.map_layer0.weight",
        "model.map_layer1.bias",
        "model.map_augment.weight",
        "model.enc.32x32_conv.weight",
        "model.enc.16x16_aux_residual.weight",
        "model.dec.32x32_aux_conv.weight",
        "model.dec.32x32_aux_norm.weight",
    ]
    for name in frozen:
        assert name in names and gdd_i_frozen(name) and name not in trainable, name
    for name in kept_names:
        assert name in names and not gdd_i_frozen(name) and name in trainable, name
    # GDD-I hands exactly these to the optimiser; GDD hands all of them.
    assert {id(p) for p in GDDI().generator_parameters(net)} == {id(p) for p in trainable.values()}
    assert len(GDD().generator_parameters(net)) == len(names)


def test_generator_step_against_the_optimal_discriminator_moves_the_mean_toward_the_data():
    torch.manual_seed(0)
    mu_data, s_data, s_g = torch.tensor([1.0, -0.5, 0.3], dtype=F64), 1.0, 0.8
    generator = AffineGenerator([-0.4, 0.6, 0.9], scale=s_g)
    disc = OptimalDiscriminator(mu_data, s_data, generator.mu.detach().clone(), s_g)
    z = torch.randn(4096, 3, dtype=F64)
    loss = GDD().generator_loss(generator, disc, None, z)
    (grad,) = torch.autograd.grad(loss, generator.mu)
    # The same loss with the sign of D flipped (softplus(+D)), i.e. a generator that flees the data.
    flipped = GDD().generator_loss(generator, lambda x, c: [-l for l in disc(x, c)], None, z)
    (grad_flipped,) = torch.autograd.grad(flipped, generator.mu)

    def distance_after_step(g):
        return (generator.mu.detach() - 0.1 * g / g.norm() - mu_data).norm()

    start = (generator.mu.detach() - mu_data).norm()
    assert distance_after_step(grad) < start
    assert distance_after_step(grad_flipped) > start
    cosine = torch.nn.functional.cosine_similarity(-grad, mu_data - generator.mu.detach(), dim=0)
    assert cosine > 0.9


def test_discriminator_steps_increase_the_real_fake_margin():
    torch.manual_seed(0)
    generator = AffineGenerator([-1.0, 0.0], scale=0.3)
    real = torch.randn(256, 2, dtype=F64) * 0.3 + torch.tensor([1.0, 0.0], dtype=F64)
    disc = LinearDiscriminator(2)
    with torch.no_grad():  # start from a discriminator that has it the wrong way round
        disc.lin.weight.copy_(torch.tensor([[-0.5, 0.2]]))
    method = GDD(r1_interval=16)
    _, opt_d = method.optimizers(generator, disc, lr=0.1, betas=(0.0, 0.99), eps=1e-8)
    z = torch.randn(256, 2, dtype=F64)

    def margin():
        with torch.no_grad():
            return (disc(real)[0].mean() - disc(method.generate(generator, z))[0].mean()).item()

    before, losses = margin(), []
    for _ in range(10):
        loss = method.aux_loss(generator, disc, z, real=(real, None))
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
        losses.append(loss.item())
    assert before < 0 < margin()
    assert losses[-1] < losses[0]
    assert generator.mu.grad is None  # the generator sample is detached in the discriminator step


@pytest.mark.parametrize("gamma", [1e-4, 0.3])
def test_r1_equals_the_closed_form_for_a_linear_discriminator(gamma):
    torch.manual_seed(0)
    disc = LinearDiscriminator(48)
    real = torch.randn(8, 3, 4, 4, dtype=F64)
    method = GDD(r1_gamma=gamma, r1_interval=16)
    loss = method.regularizer_loss(disc, real=(real, None))
    w = disc.lin.weight
    expected = gamma / 2 * w.square().sum() * 16  # ∇_x D = w for every image, gain 16
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # the penalty's gradient reaches D: d/dw of (γ/2)‖w‖²·16 = 16 γ w
    (grad,) = torch.autograd.grad(loss, w)
    assert torch.allclose(grad, 16 * gamma * w)
    # GDD's loop: an R1 step in iterations 16, 32, … (counted from 0), never in the first; none without γ
    assert [s for s in range(50) if method.regularizer_due(s)] == [16, 32, 48]
    assert not any(GDD(r1_gamma=0).regularizer_due(s) for s in range(50))


def test_lazy_r1_is_an_extra_discriminator_step_of_the_same_optimiser(tmp_path):
    # batch 8 for 5 iterations with r1_interval 2; the checkpoint after 4 iterations (0..3) holds D's Adam
    # state: 4 D steps + 1 R1 step (iteration 2) for every parameter that R1 reaches
    teacher = tiny_edm().eval().requires_grad_(False)
    method = GDD(r1_interval=2)
    torch.manual_seed(1)
    generator, disc = method.make_generator(teacher), method.make_aux(teacher)
    checkpoints = Checkpoints(tmp_path / "checkpoints", "f")
    distill(
        method,
        None,
        generator,
        disc,
        tiny_run(betas=(0.0, 0.99), checkpoint_kimg=0.032),
        data=TrainingData(images=torch.rand(32, 1, 8, 8) * 2 - 1),
        checkpoints=checkpoints,
    )
    state = checkpoints.latest()
    steps = [int(v["step"]) for v in state["opt_aux"]["state"].values()]
    # biases of the last layers do not enter ∇ₓD, so the R1 step leaves them alone
    assert max(steps) == 5 and set(steps) == {4, 5} and steps.count(5) > steps.count(4)
    assert {int(v["step"]) for v in state["opt_g"]["state"].values()} == {4}


def test_optimizers_apply_the_lazy_regularisation_correction_to_d_only():
    teacher = tiny_edm().eval().requires_grad_(False)
    method = GDDI()
    generator, disc = copy.deepcopy(teacher).requires_grad_(True), method.make_aux(teacher)
    opt_g, opt_d = method.optimizers(generator, disc, lr=1e-4, betas=(0.0, 0.99), eps=1e-8)
    (g,), (d,) = opt_g.param_groups, opt_d.param_groups
    assert g["lr"] == 1e-4 and g["betas"] == (0.0, 0.99) and g["eps"] == 1e-8
    assert d["lr"] == pytest.approx(1e-4 * 16 / 17) and d["betas"] == (0.0, pytest.approx(0.99 ** (16 / 17)))
    assert {id(p) for p in d["params"]} == {id(p) for p in disc.heads.parameters()}
    assert len(g["params"]) == len(gdd_i_trainable(generator.named_parameters())) < len(list(generator.parameters()))
    # the generator's own betas, where given, leave D's untouched
    opt_g, opt_d = method.optimizers(
        generator, disc, lr=1e-4, betas=(0.0, 0.99), eps=1e-8, generator_betas=(0.9, 0.999)
    )
    assert opt_g.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt_d.param_groups[0]["betas"] == (0.0, pytest.approx(0.99 ** (16 / 17)))


def test_teacher_encoder_discriminator_heads_on_every_encoder_resolution():
    teacher = tiny_edm()  # in train mode and trainable: frozen by the discriminator, not by its caller
    torch.manual_seed(1)
    disc = TeacherEncoderDiscriminator(teacher)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    logits = disc.train()(x)
    assert [tuple(l.shape) for l in logits] == [(3, 64), (3, 16)]  # 8x8 and 4x4 patch logits
    assert not disc.encoder.training and disc.heads.training
    assert {id(p) for p in disc.parameters() if p.requires_grad} == {id(p) for p in disc.heads.parameters()}
    # a copy: training the discriminator cannot touch the teacher
    assert all(p.data_ptr() != q.data_ptr() for p in disc.encoder.parameters() for q in teacher.parameters())
    # the generator loss sends gradients to G only, and leaves D's flags as they were
    generator = copy.deepcopy(teacher)
    GDD().generator_loss(generator, disc, None, torch.randn(3, 1, 8, 8)).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert generator.model.map_layer0.weight.grad.abs().sum() > 0
    assert disc.heads.training and all(p.requires_grad for p in disc.heads.parameters())
    # class-conditional: the logits depend on the label through the teacher's label map and the projection heads
    cond_teacher = tiny_edm(label_dim=3)
    cond = TeacherEncoderDiscriminator(cond_teacher)
    a, b = cond(x, torch.eye(3)[[0, 1, 2]]), cond(x, torch.eye(3)[[1, 2, 0]])
    assert all(l.shape == m.shape and not torch.allclose(l, m) for l, m in zip(a, b))


def test_projected_discriminator_structure_and_gradients_reach_only_the_heads():
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(weights=None, resolution=32).train()  # random backbones, never downloads
    assert list(disc.projectors) == ["vgg16_bn", "tf_efficientnet_lite0"] and len(disc.heads) == 8
    bn = disc.projectors["vgg16_bn"].backbone.stages[0][1]
    running = bn.running_mean.clone()
    x = (torch.rand(2, 1, 8, 8) * 2 - 1).requires_grad_(True)
    logits = disc(x)
    # 32 px in: backbone maps 8, 4, 2, 1 -> cross-scale mix at 16, 8, 4, 2 -> each head down to 2×2, a 1×1 conv
    assert [tuple(l.shape) for l in logits] == [(2, 4)] * 8
    projector = disc.projectors["tf_efficientnet_lite0"]
    assert [c.in_channels for c in projector.ccm] == [24, 40, 112, 320]
    assert [c.out_channels for c in projector.ccm] == [64, 128, 256, 512] and projector.out_channels == [
        64,
        64,
        128,
        256,
    ]
    trainable = {id(p) for p in disc.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in disc.heads.parameters()}
    sum(l.sum() for l in logits).backward()
    assert all(p.grad is None for p in disc.projectors.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator loss needs dD/dx
    assert torch.equal(bn.running_mean, running)  # frozen backbones stay in eval mode
    # [-1, 1] -> [0, 1] -> each backbone's normalisation: ImageNet's for VGG, (0.5, 0.5) for TF's EfficientNet-lite0
    vgg = disc.projectors["vgg16_bn"]
    assert torch.allclose(vgg.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(projector.mean.flatten(), torch.tensor([0.5] * 3))
    assert torch.allclose(projector.std.flatten(), torch.tensor([0.5] * 3))


def test_projected_discriminator_at_gdd_resolution_with_deit():
    # §3.3, 64×64 data sets: DeiT-base (distilled) + EfficientNet-lite0 at 224 px, four heads per backbone
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(
        label_dim=10, backbones=("deit_base_distilled_patch16_224", "tf_efficientnet_lite0"), weights=None
    ).train()
    deit = disc.projectors["deit_base_distilled_patch16_224"]
    assert [c.in_channels for c in deit.ccm] == [96, 192, 384, 768]
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    c = torch.eye(10)[[3, 7]]
    logits = disc(x, c)
    # backbone maps 56, 28, 14, 7 -> mixed 112, 56, 28, 14 -> down to 7×7 -> 4×4 conv: 16 patch logits per head
    assert [tuple(l.shape) for l in logits] == [(2, 16)] * 8
    (grad,) = torch.autograd.grad(sum(l.sum() for l in logits), x)
    assert grad.abs().sum() > 0
    # the class projection makes the logits depend on the label
    other = disc(x.detach(), torch.eye(10)[[4, 8]])
    assert not torch.allclose(logits[0], other[0])


def test_the_discriminator_keeps_batch_statistics_during_the_generator_step():
    # GDD's generator step runs D with requires_grad off but in training mode: batch norm uses batch statistics
    torch.manual_seed(0)
    teacher = tiny_edm().eval().requires_grad_(False)
    method = GDD(discriminator="projected", backbone_weights=None, resolution=32)
    generator, disc = method.make_generator(teacher), method.make_aux(teacher).train()
    bn = disc.heads[0].main[1]
    before = bn.running_mean.clone()
    method.generator_loss(generator, disc, None, torch.randn(4, 1, 8, 8)).backward()
    assert not torch.equal(bn.running_mean, before) and disc.training
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.heads.parameters())


@pytest.mark.parametrize("method_class", [GDD, GDDI])
def test_distill_runs_gdd_without_a_teacher(method_class):
    teacher = tiny_edm().eval().requires_grad_(False)
    teacher_state = copy.deepcopy(teacher.state_dict())
    generator = copy.deepcopy(teacher).requires_grad_(True)
    method = method_class(r1_interval=2)
    torch.manual_seed(1)
    disc = method.make_aux(teacher)
    start_g, start_d = copy.deepcopy(generator.state_dict()), copy.deepcopy(disc.state_dict())
    real = torch.rand(64, 1, 8, 8) * 2 - 1
    losses = []
    distill(
        method,
        None,
        generator,
        disc,
        tiny_run(betas=(0.0, 0.99), duration_kimg=0.032),
        data=TrainingData(images=real),
        on_progress=lambda nimg, m: losses.append(m),
    )
    assert len(losses) == 4 and all(math.isfinite(v) for m in losses for v in m.values())
    moved = {n for n, p in generator.named_parameters() if not torch.equal(p, start_g[n])}
    if method_class is GDDI:
        trainable = {n for n, _ in gdd_i_trainable(generator.named_parameters())}
        assert moved == trainable
    else:
        assert moved == {n for n, _ in generator.named_parameters()}
    for name, value in disc.state_dict().items():
        assert torch.equal(value, start_d[name]) == name.startswith("encoder."), name
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_the_schema_offers_exactly_the_discriminator_backbones():
    from distillery import registry

    assert registry.BACKBONES == BACKBONES
