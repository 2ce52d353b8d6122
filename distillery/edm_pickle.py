"""Read official EDM network pickles without running their code, and convert them to our network format.

An EDM `.pkl` (docs/methods.md §1.4) is a pickled dict {ema, loss_fn, augment_pipe, dataset_kwargs}. Its
networks pickle as `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the
full source text of the defining module, which the stock unpickler `exec`s. `EDMUnpickler` resolves only an
allow-list of globals: tensors and containers are rebuilt, every module becomes an inert `ModuleState`
(class name + `__dict__`), the embedded source is never read, and any other global is refused by name.
`convert_edm_pickle` then copies the tensors of `data['ema']` into our own `EDMPrecond` by name.
"""

import collections
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from distillery.checkpoint import save_network
from distillery.networks import MODEL_TYPES, build_network

try:  # numpy ≥ 2 keeps `multiarray` under numpy._core; numpy.core is a deprecated alias there
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing of it was executed."""


class ModuleState:
    """Inert stand-in for a pickled module or persistent object: its class name and `__dict__` (`state`)."""

    class_name = None

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state):
        # pickle's BUILD step for a torch.nn module (created by NEWOBJ, not __init__)
        self.state = state

    def __repr__(self):
        return f"ModuleState({self.class_name!r})"


def _reconstruct_persistent_obj(meta):
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: keeps the state, ignores module_src."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError(
            "malformed torch_utils.persistence object (expected a 'class' meta with a state dict)"
        )
    return ModuleState(str(meta.get("class_name")), meta["state"])


def _load_storage(data):
    """Stand-in for torch.storage._load_from_bytes, which would call torch.load(weights_only=False) on `data`."""
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a pickled storage held {type(storage).__name__}, not a storage")
    return storage


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("numpy", "dtype"): np.dtype,
    # the official files were written with numpy 1.x (numpy.core), re-saved ones may say numpy._core
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_storage,
}


class EDMUnpickler(pickle.Unpickler):
    """Allow-list unpickler for EDM pickles (docs/methods.md §1.4, safe-loading recipe); never imports anything."""

    def __init__(self, file, name="<pickle>"):
        super().__init__(file)
        self.name = name

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules."):
            # e.g. torch.nn.ModuleDict: an inert class whose instances only record their __dict__
            return type(name, (ModuleState,), {"class_name": f"{module}.{name}"})
        raise UnsafePickleError(
            f"{self.name}: refusing to load global {module}.{name}: it is not on the EDM "
            "allow-list (an EDM network pickle never needs it; loading it could run code)"
        )


def read_edm_pickle(path):
    """The top-level dict of an EDM pickle (modules as `ModuleState`), read by `EDMUnpickler`."""
    with open(path, "rb") as f:
        data = EDMUnpickler(f, name=str(path)).load()
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict (ema, loss_fn, …), got {type(data).__name__}")
    return data


def module_state_dict(module, prefix=""):
    """{dotted name: tensor} of a `ModuleState` tree, in the order `nn.Module.state_dict()` lists them."""
    if not isinstance(module, ModuleState):
        raise ValueError(f"{prefix or 'root'}: expected a module, got {type(module).__name__}")
    state = module.state
    non_persistent = state.get("_non_persistent_buffers_set", set())
    tensors = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in state.get(kind, {}).items():
            if value is None or (kind == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix}{name}: expected a tensor, got {type(value).__name__}")
            tensors[prefix + name] = value.detach()
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            tensors.update(module_state_dict(child, prefix=f"{prefix}{name}."))
    return tensors


def network_config(ema):
    """Our `build_network` config from the constructor kwargs the official EDMPrecond recorded (`_init_kwargs`)."""
    if not isinstance(ema, ModuleState) or ema.class_name != "EDMPrecond":
        found = ema.class_name if isinstance(ema, ModuleState) else type(ema).__name__
        raise ValueError(
            f"'ema' is {found}; only EDMPrecond networks are supported (VP/VE/iDDPM preconditioning is not)"
        )
    if ema.state.get("_init_args"):
        raise ValueError("EDMPrecond was constructed with positional arguments; expected keyword arguments only")
    kwargs = ema.state.get("_init_kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError("EDMPrecond carries no recorded constructor kwargs (_init_kwargs); cannot rebuild it")
    missing = [key for key in ("img_resolution", "img_channels") if key not in kwargs]
    if missing:
        raise ValueError(f"EDMPrecond constructor kwargs lack {', '.join(missing)}")
    # the official EDMPrecond defaults to DhariwalUNet when model_type is not given (ours defaults to SongUNet)
    config = {"model_type": "DhariwalUNet", **kwargs}
    if config["model_type"] not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {config['model_type']!r}; supported: {', '.join(sorted(MODEL_TYPES))}")
    return config


def convert_edm_pickle(path, out_dir, meta=None):
    """Convert `data['ema']` of an EDM pickle into our network directory (safetensors + config.json).

    The network is rebuilt from the recorded kwargs and loaded with strict names and shapes; `out_dir`
    appears whole or not at all (written to a temporary sibling, then renamed). `meta` adds JSON fields
    to config.json (e.g. the source URL and sha256). Returns the network config.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    data = read_edm_pickle(path)
    if "ema" not in data:
        raise ValueError(f"{path}: no 'ema' network (keys: {', '.join(map(str, data))})")
    config = network_config(data["ema"])
    try:
        net = build_network(config)
    except TypeError as err:
        raise ValueError(
            f"{path}: the recorded EDMPrecond kwargs do not fit our {config['model_type']}: {err}"
        ) from err
    net.load_state_dict(module_state_dict(data["ema"]), strict=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # named as pipeline/io.py names temporary siblings (writer's pid): a killed conversion's are found and removed
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_network(tmp, net, config, meta=meta)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config
