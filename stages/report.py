"""Stage `report`: reports/results.md and reports/results.csv from the DVC-tracked metric files only."""

import json
from pathlib import Path

import pandas as pd

from pipeline.io import write_text
from pipeline.params import load_params_or_exit

COLUMNS = ["method", "lr", "NFE", "FID", "IS", "KID", "rel-FID", "images/s", "kimg", "checkpoint", "FID (last)"]


def read_json(path):
    return json.loads(Path(path).read_text())


def teacher_row(m):
    return {"method": f"teacher (EDM Heun, {m['steps']} steps)", "lr": None, "NFE": m["nfe"], "FID": m["fid"],
            "IS": m["is"], "KID": m["kid"], "rel-FID": 0.0, "images/s": m["images_per_s"], "kimg": None,
            "checkpoint": "ema", "FID (last)": None}


def student_row(m):
    return {"method": m["method"], "lr": m["lr"], "NFE": m["nfe"], "FID": m["fid"], "IS": m["is"], "KID": m["kid"],
            "rel-FID": m["rel_fid"], "images/s": m["images_per_s"], "kimg": m["kimg"],
            "checkpoint": f"best @ {m['best_kimg']:g} kimg", "FID (last)": m["fid_last"]}


def results_table(params):
    rows = [teacher_row(read_json("metrics/teacher_samples.json"))]
    # exactly the runs of the current study: files left by runs removed from params.yaml are ignored
    names = [name for _, _, name in params.runs()]
    rows += [student_row(read_json(f"metrics/eval/{name}.json")) for name in names]
    return pd.DataFrame(rows, columns=COLUMNS), names


def markdown(table, runs, params, teacher, n_real):
    shown = table.copy()
    shown["lr"] = shown["lr"].map(lambda v: "" if pd.isna(v) else f"{v:g}")
    for col, fmt in [("FID", "{:.3f}"), ("FID (last)", "{:.3f}"), ("IS", "{:.2f}"), ("KID", "{:.4f}"),
                     ("rel-FID", "{:.3f}"), ("images/s", "{:.0f}"), ("kimg", "{:g}")]:
        shown[col] = shown[col].map(lambda v, fmt=fmt: "" if pd.isna(v) else fmt.format(v))
    e = params.evaluation
    return "\n".join([
        f"# Results — profile `{params.profile}`",
        "",
        shown.to_markdown(index=False),
        "",
        f"FID protocol: {e.num_samples} samples from seeds 0–{e.num_samples - 1}, uint8 round trip, "
        f"features of the `distillery-digits` classifier through torch-fidelity (toy profile: not comparable "
        f"with Inception FIDs), against {n_real} real digits; IS over {e.is_splits} splits; "
        f"KID with subsets of {e.kid_subset_size}. rel-FID: FID against the teacher's own samples (same seeds). "
        f"Images/s measured at batch {e.batch} on {teacher['device']}.",
        f"Students: the EMA generator with the lowest monitoring FID ({params.distill.monitor_samples} samples, "
        f"every {params.distill.monitor_kimg:g} kimg) is the `best` checkpoint; `FID (last)` is the final EMA.",
        "",
        "Sample grids (first images of the evaluation seeds):",
        "",
        *[f"- {name}: ![{name}](grids/{name}.png)" for name in ["teacher", *runs]],
        "",
    ])


def main():
    params = load_params_or_exit()
    table, runs = results_table(params)
    teacher = read_json("metrics/teacher_samples.json")
    n_real = read_json("metrics/reference_stats.json")["num_images"]
    write_text("reports/results.csv", table.to_csv(index=False))
    write_text("reports/results.md", markdown(table, runs, params, teacher, n_real))
    print(Path("reports/results.md").read_text())


if __name__ == "__main__":
    main()
