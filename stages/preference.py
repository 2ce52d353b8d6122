"""Stage `preference@<n>`: a blind A/B study between two generators of `preference.pairs`, ready to hand out.

<output_dir>/<a>-vs-<b>/
    study/        what participants or the annotation tool get: index.html, labelstudio/, mturk/
    key.json      which side is which system for every item: stays with the organiser
    README.md     how to run the study and where the returned votes go
"""

import json
from pathlib import Path

from pipeline.io import atomic_path
from pipeline.preference_params import PreferencePair, PreferenceParams

from distillery.preference.manifests import label_studio_config, label_studio_tasks, mturk_batch, mturk_layout
from distillery.preference.page import render_page
from distillery.preference.study import Study, build_study, load_samples

from stages.skeleton import InvalidInput, run_stage

PAGE = "study/index.html"


def readme(study: Study, section: PreferenceParams) -> str:
    checks = sum(i.expected is not None for i in study.items)
    return f"""# Preference study {study.study_id}: {study.a} vs {study.b}

{len(study.items) - checks} comparisons and {checks} attention checks (an image against itself: the attentive
answer is a tie; a noise image against a real one: the attentive answer is the real one), in one fixed order.
Item IDs and sides are random (seed {section.seed}); `key.json` unblinds them.

- Hand out the `study/` folder, or one of the files in it, and nothing else: `key.json` names the systems.
- Study page: send `study/index.html`. It works opened from disk, offline. Participants vote with the mouse or
  the arrow keys, then press "Download my votes" and send back the CSV file.
- Label Studio: create a project with `study/labelstudio/config.xml` as its labeling configuration, import
  `study/labelstudio/tasks.json`, and export the annotations as JSON when done.
- Amazon Mechanical Turk: create a Custom project with `study/mturk/layout.html` as its design layout, publish a
  batch from `study/mturk/batch.csv`, and download the batch results CSV when done.

Put the returned files (any mix of the three formats) in `{section.votes_dir}/` and run the `preference_report`
stage: it validates every vote, drops raters who fail the attention checks, unblinds with the key and writes
`reports/preference.md`.
"""


def write_study(section: PreferenceParams, pair: PreferencePair) -> tuple[Path, Study]:
    """Build the pair's study and write its folder whole, or not at all."""
    samples = Path(section.samples_dir)
    study = build_study(
        pair.a,
        load_samples(samples / f"{pair.a}.npz", section.label_names),
        pair.b,
        load_samples(samples / f"{pair.b}.npz", section.label_names),
        section.items,
        section.attention_checks,
        section.seed,
    )
    files = {
        PAGE: render_page(study, section.question, section.image_px),
        "study/labelstudio/tasks.json": label_studio_tasks(study),
        "study/labelstudio/config.xml": label_studio_config(section.question, section.image_px),
        "study/mturk/batch.csv": mturk_batch(study),
        "study/mturk/layout.html": mturk_layout(section.question, section.image_px),
        "key.json": json.dumps(study.key(), indent=2, sort_keys=True) + "\n",
        "README.md": readme(study, section),
    }
    final = Path(section.output_dir) / pair.name
    with atomic_path(final, is_dir=True) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(text.encode("utf-8"))
    return final, study


def pair_of(params, args):
    try:
        return params.preference.pair(args.a, args.b)
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def instance(params, args):
    # DVC's foreach over the list of pairs names the stage preference@<index>
    return f"preference@{params.preference.pairs.index(pair_of(params, args))}"


def tags(params, args):
    return {"pair": pair_of(params, args).name, "seed": params.preference.seed}


def run(params, args, run):
    folder, study = write_study(params.preference, pair_of(params, args))
    checks = sum(i.expected is not None for i in study.items)
    run.log_metrics({"items": len(study.items) - checks, "attention_checks": checks})
    run.log_artifact(folder / PAGE)
    print(f"{folder}/study: {len(study.items)} items for study {study.study_id}; key in {folder}/key.json")


if __name__ == "__main__":
    run_stage(
        "preference",
        run,
        doc=__doc__,
        instance=instance,
        tags=tags,
        arguments={"--a": "first run, e.g. teacher", "--b": "second run, e.g. sid-1e-4"},
    )
