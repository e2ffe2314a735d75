"""Load the teacher (and the optional open_clip embedder) from local files.

A teacher is any classifier trained on the private data, in one of these forms (``teacher.format``):

- ``webdistill`` / ``timm`` / ``torchvision``: an architecture name of that library + a state_dict;
- ``entrypoint``: ``module:function`` returning an ``nn.Module`` + a state_dict;
- ``torchscript``: a TorchScript file;
- ``open_clip``: a CLIP model + checkpoint and the class names, used zero-shot.

Whatever the form, ``load_teacher`` returns a ``Teacher`` whose ``model(x)`` gives
``(logits, penultimate features)``, with the image transform its spec describes. Everything is
checked at load time with one dry forward pass, and every mismatch is a ``UserError`` that names
the file and what is wrong. Nothing is downloaded: open_clip and timm see HF_HUB_OFFLINE=1.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.errors import UserError
from stages.common.config import TeacherConfig
from stages.common.models import create_model

log = logging.getLogger("webdistill.teacher")

# ImageNet's normalisation (and its grey equivalent) when neither the spec nor the architecture has one
DEFAULT_NORMALISATION = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.449,), (0.226,))}
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


@dataclass
class Teacher:
    model: nn.Module  # x -> (logits, features), in eval mode
    class_names: list[str]
    transform: object  # PIL image -> normalised tensor, picklable for DataLoader workers
    input_size: int
    channels: int
    feature_dim: int
    # the classifier's weight (classes × feature_dim) and bias: one prototype per class
    classifier: tuple[np.ndarray, np.ndarray | None] | None
    description: str
    # mean and std per feature that the teacher's BatchNorm statistics imply for its private
    # training data (``bn_feature_prior``), or None when no BatchNorm feeds the features
    feature_prior: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageTransform:
    """PIL image → float tensor: grey or RGB, shorter side resized (antialiased bilinear) and
    centre-cropped to a square, as timm's and torchvision's evaluation transforms do; normalised.

    PIL and numpy rather than torchvision's per-image tensor ops: the same numbers, ~10× faster
    on small images, which keeps the loader off the critical path on a CPU.
    """

    def __init__(self, size: int, channels: int, mean, std):
        # plain data that rebuilds it: what a student file stores (no pickled code in a checkpoint)
        self.spec = {"size": int(size), "channels": int(channels), "mean": [float(m) for m in mean],
                     "std": [float(s) for s in std]}
        self.mode, self.size = ("L" if channels == 1 else "RGB"), size
        self.scale = (1 / (255 * np.asarray(std, dtype=np.float32))).reshape(-1, 1, 1)
        self.shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).reshape(-1, 1, 1)

    def __call__(self, image):
        image = image.convert(self.mode)
        if image.size != (self.size, self.size):
            w, h = image.size
            side = min(w, h)  # the centred square, then one resize
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(pixels * self.scale - self.shift)


# ---------------------------------------------------------------- files

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_path(spec: TeacherConfig) -> Path:
    if not spec.checkpoint:
        raise UserError(f"teacher.checkpoint is not set: format {spec.format} needs a local weights file")
    path = Path(spec.checkpoint)
    if not path.is_file():
        raise UserError(f"teacher checkpoint {path} not found: teachers load from local files only, nothing is "
                        "downloaded (the demo's teacher is written by `make teacher`)")
    if spec.sha256 and _sha256(path) != spec.sha256:
        raise UserError(f"teacher checkpoint {path}: sha256 differs from teacher.sha256 {spec.sha256[:12]}…: "
                        "the file was changed or is not the one the spec describes")
    return path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pt/.pth/.safetensors file, unwrapped from common training containers."""
    if _is_torchscript(path):
        raise UserError(f"teacher checkpoint {path} is a TorchScript file, not a state_dict: use format: torchscript")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors all mean the same to the user
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"teacher checkpoint {path} cannot be read as a PyTorch state_dict (loaded as data, "
                        f"weights_only): {first[:300]}") from e
    for key in _STATE_DICT_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"teacher checkpoint {path} is not a state_dict (a mapping of parameter names to tensors)")
    # DistributedDataParallel and torch.compile save their wrapped names
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/__torch__" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(net: nn.Module, sd: dict, path: Path, what: str) -> None:
    """Load ``sd`` into ``net`` strictly; a mismatch says which keys and shapes differ."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else "",
                f"shape of {_few(shapes, 2)}" if shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise UserError(f"teacher checkpoint {path} does not match {what}: {'; '.join(problems)}")
    net.load_state_dict(sd)


def class_names(spec: TeacherConfig) -> list[str]:
    names = spec.class_names
    if names is None:
        raise UserError("teacher.class_names is not set: give the class names in logit order "
                        "(a list, or a text file with one name per line)")
    if isinstance(names, str):
        path = Path(names)
        if not path.is_file():
            raise UserError(f"teacher.class_names file {path} not found")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    names = [str(n) for n in names]
    if len(names) < 2:
        raise UserError(f"teacher.class_names lists {len(names)} class(es): a classifier needs at least 2")
    return names


# ---------------------------------------------------------------- feature taps

class FeatureTap(nn.Module):
    """Runs a classifier and also returns its penultimate features, caught by a hook.

    ``layer="auto"``: the input of the last ``nn.Linear`` (the classifier); otherwise the
    (flattened) output of the named module.
    """

    def __init__(self, net: nn.Module, layer: str, where: str):
        super().__init__()
        self.net = net
        self._features = None
        modules = dict(net.named_modules())
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        self.classifier = linears[-1] if linears else None
        if layer == "auto":
            if self.classifier is None:
                raise UserError(f"{where}: no nn.Linear classifier found: set teacher.feature_layer to the module "
                                f"whose output is the penultimate feature vector")
            self.classifier.register_forward_pre_hook(self._keep_input)
        else:
            if layer not in modules:
                import difflib

                close = difflib.get_close_matches(layer, list(modules), n=3)
                raise UserError(f"{where}: teacher.feature_layer {layer!r} is not a module of the model"
                                + (f"; close: {', '.join(close)}" if close else ""))
            modules[layer].register_forward_hook(self._keep_output)

    def _keep_input(self, module, inputs):
        self._features = inputs[0]

    def _keep_output(self, module, inputs, output):
        self._features = output

    def forward(self, x):
        logits = self.net(x)
        features, self._features = self._features, None
        return logits, features.flatten(1)


class ScriptedTeacher(nn.Module):
    """A TorchScript teacher: hooks do not work on script modules, so features come from an
    exported method (``forward_features`` by default) or from ``forward`` returning a pair."""

    def __init__(self, script, method: str | None):
        super().__init__()
        self.script = script
        self.method = method

    def forward(self, x):
        out = self.script(x)
        if isinstance(out, (tuple, list)):
            return out[0], out[1].flatten(1)
        if self.method is None:
            raise UserError("the TorchScript teacher's forward returns only logits and it exports no feature "
                            "method: export `forward_features` (@torch.jit.export) or return (logits, features), "
                            "or name the method in teacher.feature_layer")
        return out, getattr(self.script, self.method)(x).flatten(1)


class ZeroShotCLIP(nn.Module):
    """open_clip zero-shot classifier: cosine similarity of the image to each class prompt."""

    def __init__(self, clip: nn.Module, text_features: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.register_buffer("text_features", text_features)

    def forward(self, x):
        features = nn.functional.normalize(self.clip.encode_image(x).float(), dim=-1)
        return self.clip.logit_scale.exp() * features @ self.text_features.T, features


# ---------------------------------------------------------------- loaders, one per format

def _library_net(spec: TeacherConfig, n_classes: int) -> tuple[nn.Module, str]:
    if not spec.arch:
        raise UserError(f"teacher.arch is not set: name a {spec.format} architecture")
    net = create_model(spec.arch, spec.format, num_classes=n_classes, in_chans=spec.channels, **spec.arch_kwargs)
    return net, f"{spec.format} architecture {spec.arch} with {n_classes} classes and {spec.channels} channel(s)"


def _entrypoint_net(spec: TeacherConfig, n_classes: int) -> tuple[nn.Module, str]:
    module_name, _, function = (spec.arch or "").rpartition(":")
    if not module_name or not function:
        raise UserError(f"teacher.arch {spec.arch!r}: format entrypoint needs module:function or path/to/file.py:function, "
                        "e.g. mymodels:resnet")
    module = _import_entrypoint(module_name, spec)
    if not hasattr(module, function):
        raise UserError(f"teacher.arch {spec.arch}: {module.__file__} has no {function}")
    net = getattr(module, function)(**spec.arch_kwargs)
    if not isinstance(net, nn.Module):
        raise UserError(f"teacher.arch {spec.arch} returned {type(net).__name__}, not a torch nn.Module")
    return net, f"the model of entry point {spec.arch}"


def _import_entrypoint(name: str, spec: TeacherConfig):
    """The module of an entry point: a file (``path/to/net.py``), or a module found on ``sys.path``,
    beside the teacher's spec file, or in the working directory, in that order."""
    places = [Path(spec.spec_file).parent] if spec.spec_file else []
    places.append(Path.cwd())
    if name.endswith(".py"):
        candidates = [Path(name)] if Path(name).is_absolute() else [p / name for p in places]
    else:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name.split(".")[0]:  # the module exists but fails to import something of its own
                raise UserError(f"teacher.arch {spec.arch}: importing {name} fails: {e}") from e
        candidates = [p / f"{name.replace('.', '/')}.py" for p in places]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserError(f"teacher.arch {spec.arch}: cannot find {name} (looked on sys.path and in "
                        f"{', '.join(str(p) for p in places)}): put the file beside the teacher spec file, write "
                        "teacher.arch as path/to/file.py:function, or add its folder to PYTHONPATH")
    module_spec = importlib.util.spec_from_file_location(f"webdistill_entrypoint_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 — the user's file: name it with what went wrong
        raise UserError(f"teacher.arch {spec.arch}: importing {path} fails: {type(e).__name__}: {e}") from e
    return module


def _state_dict_teacher(spec: TeacherConfig, names: list[str]) -> tuple[nn.Module, str]:
    build = _entrypoint_net if spec.format == "entrypoint" else _library_net
    net, what = build(spec, len(names))
    path = _checkpoint_path(spec)
    load_weights(net, load_state_dict(path), path, what)
    return FeatureTap(net.eval(), spec.feature_layer, f"teacher {path}"), f"{what}, weights {path}"


def _torchscript_teacher(spec: TeacherConfig, names: list[str]) -> tuple[nn.Module, str]:
    path = _checkpoint_path(spec)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; still supported
            warnings.simplefilter("ignore", FutureWarning)
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError or ValueError depending on how the file is broken
        raise UserError(f"teacher checkpoint {path} is not a TorchScript file ({e}); "
                        "a state_dict needs format webdistill, timm, torchvision or entrypoint") from e
    method = "forward_features" if spec.feature_layer == "auto" else spec.feature_layer
    if not hasattr(script, method):
        if spec.feature_layer != "auto":
            raise UserError(f"teacher {path}: the TorchScript module exports no method {method!r} (teacher.feature_layer)")
        method = None
    return ScriptedTeacher(script.eval(), method), f"TorchScript {path}"


def create_open_clip(model_name: str, checkpoint: str | None, what: str):
    """(model, image transform) of an open_clip model; ``checkpoint`` 'random' keeps random weights."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise UserError(f"{what}: unknown open_clip model {model_name!r} (see open_clip.list_models())")
    if not checkpoint:
        raise UserError(f"{what}: give a local checkpoint of {model_name} ('random' for random weights)")
    if checkpoint != "random" and not Path(checkpoint).is_file():
        raise UserError(f"{what}: open_clip checkpoint {checkpoint} not found (no downloads here: "
                        "copy the .bin/.safetensors/.pt file to this machine)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if checkpoint == "random" else checkpoint)
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # open_clip's loader raises all of these
        raise UserError(f"{what}: checkpoint {checkpoint} does not match open_clip model {model_name}: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}") from e
    return model.eval(), preprocess


def _open_clip_teacher(spec: TeacherConfig, names: list[str]) -> tuple[nn.Module, str]:
    import open_clip

    if not spec.arch:
        raise UserError("teacher.arch is not set: name the open_clip model, e.g. ViT-B-32")
    clip, preprocess = create_open_clip(spec.arch, str(_checkpoint_path(spec)), "teacher")
    tokenizer = open_clip.get_tokenizer(spec.arch)
    with torch.no_grad():
        text = clip.encode_text(tokenizer([spec.prompt_template.format(n) for n in names]))
    model = ZeroShotCLIP(clip, nn.functional.normalize(text.float(), dim=-1))
    model.preprocess = preprocess  # open_clip's own transform (resize, crop, normalisation)
    return model, f"zero-shot open_clip {spec.arch}, weights {spec.checkpoint}"


_LOADERS = {"webdistill": _state_dict_teacher, "timm": _state_dict_teacher, "torchvision": _state_dict_teacher,
            "entrypoint": _state_dict_teacher, "torchscript": _torchscript_teacher, "open_clip": _open_clip_teacher}


# ---------------------------------------------------------------- input spec

def _input_spec(spec: TeacherConfig, model: nn.Module):
    """(transform, input size) from the spec, falling back on the architecture's own config."""
    if spec.format == "open_clip":
        size = model.clip.visual.image_size
        return model.preprocess, size if isinstance(size, int) else size[0], 3
    size, mean, std = spec.input_size, spec.mean, spec.std
    own = getattr(getattr(model, "net", None), "pretrained_cfg", None) or {}  # timm models carry theirs
    if size is None and own.get("input_size"):
        size = own["input_size"][-1]
    if size is None:
        raise UserError(f"teacher.input_size is not set: the side of the images {spec.arch or spec.checkpoint} expects")
    if own and spec.channels == 3:
        mean, std = mean or own.get("mean"), std or own.get("std")
    default_mean, default_std = DEFAULT_NORMALISATION[spec.channels]
    mean, std = list(mean or default_mean), list(std or default_std)
    if len(mean) != spec.channels or len(std) != spec.channels:
        raise UserError(f"teacher.mean and teacher.std need {spec.channels} value(s), one per channel")
    return ImageTransform(size, spec.channels, mean, std), size, spec.channels


def _dry_run(model: nn.Module, size: int, channels: int, names: list[str], where: str) -> torch.Tensor:
    """One forward pass on a blank batch: the logits must have one column per class name.
    Returns the features of the blank batch."""
    try:
        with torch.no_grad():
            logits, features = model(torch.zeros(2, channels, size, size))
    except UserError:
        raise
    except Exception as e:  # a shape error here means the spec's input does not fit the model
        raise UserError(f"{where}: a forward pass on {channels}×{size}×{size} inputs fails ({e}); "
                        "check teacher.input_size and teacher.channels") from e
    if logits.ndim != 2 or logits.shape[1] != len(names):
        raise UserError(f"{where}: the model gives {tuple(logits.shape[1:])} logits per image but "
                        f"teacher.class_names lists {len(names)} classes")
    return features


def bn_feature_prior(model: nn.Module, feature_dim: int, rectified: bool) -> dict | None:
    """Mean and std of each penultimate feature on the teacher's training data, from the running
    statistics of the last BatchNorm with one channel per feature (DeepInversion's insight: BN
    layers remember the training distribution). On its training data that BN's output is close to
    N(bias, weight²) per channel; when the features are rectified (ReLU, then pooling) these are
    the moments of the rectified Gaussian. Pooling over positions shrinks the spread, so the std is
    an upper bound: a density that ranks samples, not a calibrated likelihood."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == feature_dim
              and m.running_var is not None]
    if not layers:
        return None
    name, bn = layers[-1]
    with torch.no_grad():
        beta = bn.bias.double() if bn.affine else torch.zeros(feature_dim, dtype=torch.float64)
        gamma = bn.weight.double().abs() if bn.affine else torch.ones(feature_dim, dtype=torch.float64)
        gamma = gamma.clamp_min(1e-6)
        mean, std = beta, gamma
        if rectified:  # moments of max(0, y), y ~ N(beta, gamma²)
            a = beta / gamma
            cdf, pdf = torch.special.ndtr(a), torch.exp(-a * a / 2) / np.sqrt(2 * np.pi)
            mean = beta * cdf + gamma * pdf
            second = (beta ** 2 + gamma ** 2) * cdf + beta * gamma * pdf
            std = (second - mean ** 2).clamp_min(1e-12).sqrt()
    return {"mean": mean.float().numpy(), "std": std.float().numpy(), "layer": name, "rectified": rectified}


def load_teacher(spec: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """The teacher described by ``spec``, checked, in eval mode, on ``device``."""
    if spec.spec_file and not Path(spec.spec_file).is_file():
        raise UserError(f"teacher spec file {spec.spec_file} not found (the demo's is written by `make teacher`)")
    names = class_names(spec)
    model, description = _LOADERS[spec.format](spec, names)
    transform, size, channels = _input_spec(spec, model)
    blank_features = _dry_run(model, size, channels, names, f"teacher ({description})")
    feature_dim = blank_features.shape[1]
    classifier = None
    if spec.format == "open_clip":
        classifier = (model.text_features.numpy(), None)
    elif isinstance(getattr(model, "classifier", None), nn.Linear) and model.classifier.in_features == feature_dim:
        fc = model.classifier
        classifier = (fc.weight.detach().numpy().copy(), None if fc.bias is None else fc.bias.detach().numpy().copy())
    log.info("teacher: %s; %d classes, %d×%d×%d input, %d-d features", description, len(names), channels, size, size,
             feature_dim)
    prior = bn_feature_prior(model, feature_dim, rectified=bool((blank_features >= 0).all()))
    return Teacher(model.to(device).eval(), names, transform, size, channels, feature_dim, classifier, description,
                   prior)


_CHECKED: dict[str, Teacher] = {}


def check_teacher(spec: TeacherConfig) -> Teacher:
    """The teacher loaded on the CPU with its dry forward pass, once per spec and checkpoint version in a
    process: the pre-flight check of every stage that needs it."""
    files = [f for f in (spec.checkpoint, spec.spec_file) if f and Path(f).is_file()]
    key = json.dumps([dataclasses.asdict(spec), [(f, Path(f).stat().st_mtime_ns) for f in files]], default=str)
    if key not in _CHECKED:
        _CHECKED.clear()  # one teacher at a time is enough to remember
        _CHECKED[key] = load_teacher(spec, "cpu")
    return _CHECKED[key]


@dataclass
class Embedder:
    """The open_clip embedder of the score stage: its image tower and the class prompts' embeddings."""

    encoder: nn.Module  # images -> embeddings (not yet normalised)
    transform: object
    dim: int
    text_embeddings: np.ndarray  # classes × dim, L2-normalised: the filter's clip_text reference


def load_embedder(model_name: str, checkpoint: str | None, class_names: list[str], prompt_template: str,
                  device: torch.device | str = "cpu") -> Embedder:
    """The open_clip embedder, with the embeddings of ``prompt_template`` for each class name."""
    import open_clip

    clip, preprocess = create_open_clip(model_name, checkpoint, "score.embedder")
    if checkpoint == "random":
        log.warning("score embedder %s has random weights: its embeddings are for benchmarking only", model_name)
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(model_name)([prompt_template.format(n) for n in class_names])
        text = nn.functional.normalize(clip.encode_text(tokens).float(), dim=-1).numpy()
    return Embedder(clip.visual.eval().to(device), preprocess, clip.visual.output_dim, text)
