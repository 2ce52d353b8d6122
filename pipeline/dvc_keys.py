"""The params keys DVC reads: the `params` entries of dvc.yaml's stages, `${item.method}` of a stage over the runs of
runs.yaml (`foreach: ${study_runs}` or `${fewstep_runs}`) standing for each method of that study. DVC refuses a
params.yaml that lacks one of them, where the schema would fill in a default, so `distillery validate` checks them as
DVC will."""

import yaml

# the runs of runs.yaml a foreach stage iterates, and the section of params.yaml whose methods they are
STUDIES = {"${study_runs}": "study", "${fewstep_runs}": "fewstep"}


def dvc_params_keys(dvc_yaml_text, raw_params):
    """Every dotted params key the stages of dvc.yaml read, for the studies of `raw_params` (params.yaml as read)."""
    keys = set()
    for stage in yaml.safe_load(dvc_yaml_text)["stages"].values():
        study = STUDIES.get(stage.get("foreach"), "study")
        methods = ((raw_params or {}).get(study) or {}).get("methods") or []
        for entry in stage.get("do", stage).get("params", []):
            for name in entry if isinstance(entry, dict) else [entry]:
                keys.update(
                    [name.replace("${item.method}", m) for m in methods] if "${item.method}" in name else [name]
                )
    return keys


def missing_keys(dvc_yaml_text, raw_params):
    """The keys of `dvc_params_keys` that `raw_params` does not hold, sorted."""
    missing = []
    for key in dvc_params_keys(dvc_yaml_text, raw_params):
        node = raw_params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return sorted(missing)
