"""Published one-step and few-step results for settings that match a profile, with their sources.

Only numbers that docs/methods.md §4 marks "read" (in the named README, abstract or page) are listed; the
"unconfirmed" ones are left out on purpose. These rows are never mixed into the table
of our own runs: the report prints them as a separate, labelled table.
"""

EDM_README = "NVlabs/edm README"
SID_README = "mingyuanzhou/SiD README"
SIDA_README = "mingyuanzhou/SiD (sida branch) README"
SIM_ABSTRACT = "SIM (Luo et al. 2024), abstract / README"
GDD_ABSTRACT = "GDD (Zheng & Yang 2024), abstract"
DMD_LISTING = "DMD, wizwand benchmark listing"
UNI_ABSTRACT = "Uni-Instruct, abstract"
PD_LISTING = "progressive distillation, benchmark leaderboard listing (its own teacher, not EDM)"
GDD_README = "Zyriix/GDD README"

PUBLISHED = {
    "cifar10-uncond": [
        ("EDM teacher (DDPM++, Heun)", 35, 1.97, EDM_README),
        ("EDM teacher (NCSN++, Heun)", 35, 1.98, GDD_README),
        ("SiD (α = 1.2)", 1, 1.923, SID_README),
        ("SiDA", 1, 1.499, SIDA_README),
        ("SIM", 1, 2.06, SIM_ABSTRACT),
        ("GDD-I", 1, 1.54, GDD_ABSTRACT),
        ("DMD", 1, 3.77, DMD_LISTING),
        ("Uni-Instruct", 1, 1.46, UNI_ABSTRACT),
        ("PD", 4, 3.00, PD_LISTING),
        ("PD", 8, 2.57, PD_LISTING),
    ],
    "cifar10-cond": [
        ("EDM teacher (DDPM++, Heun)", 35, 1.79, EDM_README),
        ("SiD (α = 1.2)", 1, 1.710, SID_README),
        ("SiDA", 1, 1.396, SIDA_README),
        ("SIM", 1, 1.96, SIM_ABSTRACT),
        ("DMD", 1, 2.66, DMD_LISTING),
        ("Uni-Instruct", 1, 1.38, UNI_ABSTRACT),
    ],
    "imagenet-64": [
        ("EDM teacher (ADM, stochastic sampler)", 511, 1.36, EDM_README),
        ("SiD (α = 1.2)", 1, 1.524, SID_README),
        ("SiDA", 1, 1.110, SIDA_README),
        ("GDD-I", 1, 1.16, GDD_ABSTRACT),
        ("DMD", 1, 2.62, "DMD, abstract"),
        ("DMD2", 1, 1.28, "tianweiy/DMD2 README (resumed run)"),
        ("CTM", 1, 1.92, "CTM, abstract"),
        ("Uni-Instruct", 1, 1.02, UNI_ABSTRACT),
    ],
    "ffhq-64": [
        ("EDM teacher (DDPM++, Heun)", 79, 2.39, GDD_README),
        ("SiD (α = 1.2)", 1, 1.550, SID_README),
        ("SiDA", 1, 1.040, SIDA_README),
        ("GDD-I", 1, 0.85, GDD_ABSTRACT),
    ],
    "afhqv2-64": [
        ("EDM teacher (DDPM++, Heun)", 79, 1.96, GDD_README),
        ("SiD (α = 1.0)", 1, 1.628, SID_README),
        ("SiDA", 1, 1.276, SIDA_README),
        ("GDD", 1, 1.23, GDD_ABSTRACT),
    ],
}


def published_rows(profile):
    return [dict(method=m, NFE=nfe, FID=fid, source=src) for m, nfe, fid, src in PUBLISHED.get(profile, [])]
