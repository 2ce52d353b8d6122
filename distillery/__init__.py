"""The science: EDM networks and sampler, distillation methods, metrics, data. Plain torch."""
