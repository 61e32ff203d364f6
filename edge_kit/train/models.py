"""Model factories: the built-ins (`mlp`, `small_cnn`) and any `module:function` next to the config; a
model's signature (what makes two checkpoints interchangeable) and rebuilding a trained one from its checkpoint.

A factory is called as ``factory(input_shape=(...), num_classes=k, **model.kwargs)`` and must return a
`torch.nn.Module` mapping a float32 batch (batch, *input_shape) of preprocessed inputs to logits.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from edge_kit.config import Config
from edge_kit.errors import ConfigError, UsageError
from edge_kit.train.checkpoint import check_signature, read_checkpoint

Factory = Callable[..., nn.Module]


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 32),
        dropout: float = 0.0) -> nn.Module:
    """A multilayer perceptron for tabular features (any input shape is flattened)."""
    in_features = 1
    for d in input_shape:
        in_features *= int(d)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
              hidden: int = 64, dropout: float = 0.1) -> nn.Module:
    """Two conv blocks and a small classifier head, for small images shaped (C, H, W)."""
    if len(input_shape) != 3:
        raise ConfigError("model.factory", f"small_cnn needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    c_in, height, width = (int(d) for d in input_shape)
    c1, c2 = (int(c) for c in channels)
    features = nn.Sequential(
        nn.Conv2d(c_in, c1, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
    )
    flat = c2 * (height // 2) * (width // 2)
    head: list[nn.Module] = [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU()]
    if dropout > 0:
        head.append(nn.Dropout(dropout))
    head.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(features, *head)


def _import_from(root: Path, module_name: str) -> Any:
    """Import ``module_name`` with the config's folder first on sys.path (a stale same-named module is reloaded)."""
    root_str = str(root)
    cached = sys.modules.get(module_name)
    if cached is not None and not module_name.startswith("edge_kit"):
        origin = getattr(cached, "__file__", None)
        if origin is not None and not Path(origin).resolve().is_relative_to(root.resolve()):
            del sys.modules[module_name]
    sys.path.insert(0, root_str)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(root_str)


BUILTIN_FACTORY_MODULES = {"edge_kit.models": __name__}


def resolve_factory(config: Config) -> Factory:
    """The callable named by `model.factory`; ConfigError (exit 2) when it cannot be imported."""
    spec = config.model.factory
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError("model.factory", f"must look like 'module:function', got {spec!r}")
    # `edge_kit.models:NAME` is the documented public name of the built-ins (DESIGN section 4); they live
    # with the rest of the training stage.
    module_name = BUILTIN_FACTORY_MODULES.get(module_name, module_name)
    try:
        module = _import_from(config.root, module_name)
    except Exception as exc:  # a user module may fail to import in any way; report it as a config problem
        raise ConfigError("model.factory", f"cannot import module {module_name!r} from {config.root}: "
                          f"{type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError("model.factory", f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError("model.factory", f"{spec!r} is not callable")
    return factory


def build_model(config: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Call the configured factory; ConfigError when its kwargs are wrong or it returns no nn.Module."""
    factory = resolve_factory(config)
    kwargs = dict(config.model.kwargs)
    try:
        inspect.signature(factory).bind(input_shape=input_shape, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError("model.kwargs", f"do not fit {config.model.factory}: {exc}") from exc
    except ValueError:
        pass  # no inspectable signature (builtins, C extensions): let the call decide
    model = factory(input_shape=input_shape, num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError("model.factory", f"{config.model.factory} returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def architecture_signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter and buffer names with shapes: two models can share weights only if these are equal."""
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_signature(config: Config, model: nn.Module, input_shape: tuple[int, ...],
                    num_classes: int) -> dict[str, Any]:
    """Identity of a model: two checkpoints with equal signatures hold interchangeable weights."""
    doc = {"factory": config.model.factory, "kwargs": config.model.kwargs, "input_shape": list(input_shape),
           "num_classes": num_classes, "architecture": [[n, list(s)] for n, s in architecture_signature(model)]}
    return json.loads(json.dumps(doc, sort_keys=True, default=str))  # plain lists/dicts: comparable after a load


def load_trained_model(config: Config, checkpoint: Path) -> nn.Module:
    """Rebuild the module a checkpoint holds, in eval mode on the CPU.

    Raises UsageError (exit 2) when the file is unreadable or holds a different model than the config builds.
    """
    try:
        state = read_checkpoint(Path(checkpoint))
    except FileNotFoundError:
        raise UsageError(f"checkpoint {checkpoint} does not exist") from None
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from exc
    meta = state.get("meta", {})
    found = state["signature"]
    input_shape = tuple(int(d) for d in found.get("input_shape", meta.get("input_shape", ())))
    num_classes = int(found.get("num_classes", len(meta.get("labels", []))))
    model = build_model(config, input_shape, num_classes)
    check_signature(Path(checkpoint), found, model_signature(config, model, input_shape, num_classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {checkpoint} does not fit the configured model: {exc}") from exc
    return model.eval()
