"""EDM pickles are read without running their embedded code and convert bit-exactly into our networks.

The fixture pickles are written here in the official format (docs/methods.md §1.4): a dict {ema, loss_fn,
augment_pipe, dataset_kwargs} whose networks pickle as
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with the module source inside `meta`, and
whose tensors pickle the ordinary torch way.
"""

import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from distillery.checkpoint import load_config, load_network
from distillery.edm_pickle import ModuleState, UnsafePickleError, convert_edm_pickle, read_edm_pickle

from toys import seeded_network, tiny_config

# numpy.core.multiarray under numpy 1.x (as in the official files), numpy._core.multiarray under numpy 2
NUMPY_SCALAR = f"{np.float64(0).__reduce__()[0].__module__}.scalar"
# Globals referenced by a real EDM/SiD pickle (docs/methods.md §1.4, Hugging Face's scan).
OFFICIAL_GLOBALS = {
    "collections.OrderedDict",
    "torch_utils.persistence._reconstruct_persistent_obj",
    "numpy.dtype",
    NUMPY_SCALAR,
    "torch.storage._load_from_bytes",
    "torch.nn.modules.container.ModuleDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
}

CONFIGS = {
    "ddpmpp-cond": tiny_config("ddpmpp", 8, 3, label_dim=4, model_channels=16, augment_dim=9),
    "ncsnpp-uncond": tiny_config("ncsnpp", 8, 3, model_channels=16, augment_dim=9),
    "adm-cond": dict(
        img_resolution=8,
        img_channels=3,
        label_dim=4,
        use_fp16=True,
        model_type="DhariwalUNet",
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
    ),
}


def _reconstruct_persistent_obj(meta):
    raise AssertionError("only the name of this function goes into the fixture pickles")


# pickle stores a function as module + name: this one is written as torch_utils.persistence's
_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class Persistent:
    """A non-module persistent object of the official pickle (EDMLoss, AugmentPipe)."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state


class Payload:
    """Pickles as a call of `func(*args)`: what a malicious pickle smuggles in."""

    def __init__(self, func, *args):
        self.func = func
        self.args = args


class OfficialFormatPickler(pickle.Pickler):
    """Pickles our modules the way torch_utils.persistence pickles the official ones (protocol 4, as EDM)."""

    def __init__(self, file, root, root_class_name, root_kwargs, module_src):
        super().__init__(file, protocol=4)
        self.root = root
        self.root_class_name = root_class_name
        self.root_kwargs = root_kwargs
        self.module_src = module_src

    def persistent(self, class_name, state):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        return _reconstruct_persistent_obj, (meta,)

    def reducer_override(self, obj):
        if obj is self.root:
            return self.persistent(
                self.root_class_name, dict(obj.__dict__, _init_args=(), _init_kwargs=self.root_kwargs)
            )
        if isinstance(obj, nn.Module) and type(obj).__module__.startswith("distillery."):
            # the official layers record their kwargs too; numpy scalars come from those (init_weight=np.sqrt(0.2))
            kwargs = dict(init_weight=np.sqrt(0.2))
            return self.persistent(type(obj).__name__, dict(obj.__dict__, _init_args=(), _init_kwargs=kwargs))
        if isinstance(obj, Persistent):
            return self.persistent(obj.class_name, obj.state)
        if isinstance(obj, Payload):
            return obj.func, obj.args
        return NotImplemented


def write_official_pickle(path, net, init_kwargs, module_src, class_name="EDMPrecond"):
    data = dict(
        ema=net,
        loss_fn=Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
        augment_pipe=Persistent("AugmentPipe", dict(p=0.12, xflip=1e8, yflip=1)),
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="datasets/toy.zip"),
    )
    # pickle checks that a function's name imports back to it, so torch_utils.persistence exists only while
    # the fixture is written: the reader must never import it
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
        patch.setitem(sys.modules, "torch_utils.persistence", persistence)
        with open(path, "wb") as f:
            OfficialFormatPickler(f, net, class_name, init_kwargs, module_src).dump(data)
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules


class Inert:
    """Accepts any construction or state; stands for every global while `referenced_globals` lists them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class GlobalRecorder(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.names = set()

    def find_class(self, module, name):
        self.names.add(f"{module}.{name}")
        return Inert


def referenced_globals(path):
    """Every module.name global a pickle stream asks for (each resolved to `Inert`, so nothing runs)."""
    with open(path, "rb") as f:
        recorder = GlobalRecorder(f)
        recorder.load()
    return recorder.names


@pytest.fixture
def evil_source(tmp_path):
    """Module source that would leave a marker file and raise if anyone executed it."""
    marker = tmp_path / "module_src_was_executed"
    src = (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
        "raise RuntimeError('module_src executed')\n"
    )
    return src, marker


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_format_pickle_converts_bit_exactly_without_running_its_code(tmp_path, evil_source, name):
    src, marker = evil_source
    config = CONFIGS[name]
    # random weights: zero-initialised output layers would make two different weight sets look alike
    net = seeded_network(config, perturb=0.1).eval()
    pkl = tmp_path / "edm.pkl"
    write_official_pickle(pkl, net, config, src)
    assert referenced_globals(pkl) == OFFICIAL_GLOBALS

    data = read_edm_pickle(pkl)
    assert isinstance(data["ema"], ModuleState) and data["ema"].class_name == "EDMPrecond"
    assert data["loss_fn"].class_name == "EDMLoss" and data["loss_fn"].state["P_mean"] == -1.2
    assert data["dataset_kwargs"]["path"] == "datasets/toy.zip"

    out = tmp_path / "teacher"
    assert convert_edm_pickle(pkl, out, meta={"source": "edm.pkl"}) == config
    assert not marker.exists()
    assert "torch_utils" not in sys.modules
    assert load_config(out) == {"network": config, "source": "edm.pkl"}

    converted = load_network(out)
    original, loaded = net.state_dict(), converted.state_dict()
    assert list(loaded) == list(original)
    for key in original:
        assert loaded[key].dtype == original[key].dtype and torch.equal(loaded[key], original[key]), key
    x = torch.randn(2, 3, 8, 8)
    labels = torch.eye(4)[[1, 3]] if config["label_dim"] else None
    with torch.no_grad():
        assert torch.equal(converted(x, torch.tensor([0.3, 4.0]), labels), net(x, torch.tensor([0.3, 4.0]), labels))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm.pkl", "teacher"]


@pytest.mark.parametrize(
    "payload,named",
    [
        (lambda marker: Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),  # posix.system
        (lambda marker: Payload(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        (lambda marker: Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    ],
    ids=["os.system", "builtins.eval", "subprocess.Popen"],
)
def test_pickle_with_any_other_global_is_refused_and_writes_nothing(tmp_path, evil_source, payload, named):
    src, _ = evil_source
    marker = tmp_path / "payload_ran"
    config = CONFIGS["ddpmpp-cond"]
    pkl = tmp_path / "edm.pkl"
    # the payload hides among the recorded constructor kwargs, after the network's tensors
    write_official_pickle(pkl, seeded_network(config, perturb=0.1).eval(), {**config, "zz": payload(marker)}, src)
    assert named in referenced_globals(pkl)

    with pytest.raises(UnsafePickleError, match=named.replace(".", r"\.")):
        convert_edm_pickle(pkl, tmp_path / "teacher")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm.pkl"]


def test_classic_os_system_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        read_edm_pickle(pkl)
    assert not marker.exists()


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_scalars_load_under_both_spellings(tmp_path, module):
    # numpy 1.x (the official files) writes numpy.core, numpy 2 numpy._core; protocol 3 has no framing,
    # so the module name can be respelled in place
    stream = pickle.dumps({"init_weight": np.float64(0.2) ** 0.5}, protocol=3)
    stream = stream.replace(f"c{NUMPY_SCALAR[: -len('.scalar')]}\n".encode(), f"c{module}\n".encode())
    assert f"c{module}\nscalar\n".encode() in stream
    pkl = tmp_path / "scalar.pkl"
    pkl.write_bytes(stream)
    value = read_edm_pickle(pkl)["init_weight"]
    assert isinstance(value, np.float64) and value == np.float64(0.2) ** 0.5


@pytest.mark.parametrize(
    "class_name,kwargs,message",
    [
        ("VPPrecond", {}, "only EDMPrecond"),
        ("EDMPrecond", {"model_type": "FancyUNet"}, "unknown model_type 'FancyUNet'"),
        ("EDMPrecond", {"img_resolution": None}, "lack img_resolution"),
        ("EDMPrecond", {"no_such_option": 1}, "do not fit our SongUNet"),
    ],
)
def test_unsupported_networks_are_refused_clearly(tmp_path, evil_source, class_name, kwargs, message):
    src, marker = evil_source
    config = CONFIGS["ddpmpp-cond"]
    init_kwargs = {k: v for k, v in {**config, **kwargs}.items() if v is not None}
    pkl = tmp_path / "edm.pkl"
    write_official_pickle(pkl, seeded_network(config, perturb=0.1).eval(), init_kwargs, src, class_name=class_name)
    with pytest.raises(ValueError, match=message):
        convert_edm_pickle(pkl, tmp_path / "teacher")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm.pkl"]
