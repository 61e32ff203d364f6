"""Model factories: built-ins, user `module:function` next to the config, and the ways they go wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_kit.config import load_config
from edge_kit.errors import ConfigError
from edge_kit.train.models import architecture_signature, build_model, mlp, small_cnn


def config_with(tmp_path: Path, factory: str, kwargs: str = "{}") -> object:
    path = tmp_path / "edgekit.toml"
    path.write_text(f'[model]\nfactory = "{factory}"\nkwargs = {kwargs}\n')
    return load_config(path)


def test_builtins_map_a_batch_to_logits() -> None:
    assert small_cnn((1, 8, 8), 10)(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert mlp((30,), 2, hidden=(8,))(torch.zeros(3, 30)).shape == (3, 2)


def test_small_cnn_refuses_tabular_input() -> None:
    with pytest.raises(ConfigError, match="image inputs"):
        small_cnn((30,), 2)


def test_kwargs_reach_the_factory(tmp_path: Path) -> None:
    config = config_with(tmp_path, "edge_kit.models:mlp", "{ hidden = [5, 3] }")
    model = build_model(config, (4,), 3)  # type: ignore[arg-type]
    shapes = dict(architecture_signature(model))
    assert shapes["1.weight"] == (5, 4) and shapes["3.weight"] == (3, 5) and shapes["5.weight"] == (3, 3)


def test_user_factory_from_the_config_folder(tmp_path: Path) -> None:
    for name, width in (("a", 7), ("b", 9)):  # same module name in two projects: each gets its own
        folder = tmp_path / name
        folder.mkdir()
        (folder / "my_net.py").write_text(
            "import torch\n"
            f"def build(input_shape, num_classes):\n"
            f"    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, {width}),"
            " torch.nn.Linear(" + str(width) + ", num_classes))\n"
        )
        model = build_model(config_with(folder, "my_net:build"), (1, 8, 8), 10)  # type: ignore[arg-type]
        assert dict(architecture_signature(model))["1.weight"] == (width, 64)


@pytest.mark.parametrize(("source", "factory", "key", "fragment"), [
    (None, "missing_mod_123:build", "model.factory", "cannot import module 'missing_mod_123'"),
    ("def other():\n    pass\n", "net:build", "model.factory", "has no attribute 'build'"),
    ("build = 3\n", "net:build", "model.factory", "not callable"),
    ("def build(input_shape, num_classes):\n    return 'a string'\n", "net:build", "model.factory",
     "returned str, not a torch.nn.Module"),
    ("raise RuntimeError('broken import')\n", "net:build", "model.factory", "broken import"),
    ("def build(input_shape, num_classes):\n    pass\n", "net:build{kw}", "model.kwargs", "do not fit"),
])
def test_factory_errors_name_the_key(tmp_path: Path, source: str | None, factory: str, key: str,
                                     fragment: str) -> None:
    if source is not None:
        (tmp_path / "net.py").write_text(source)
    kwargs = "{ width = 3 }" if factory.endswith("{kw}") else "{}"
    config = config_with(tmp_path, factory.replace("{kw}", ""), kwargs)
    with pytest.raises(ConfigError) as info:
        build_model(config, (1, 8, 8), 10)  # type: ignore[arg-type]
    assert info.value.key == key and fragment in str(info.value)
