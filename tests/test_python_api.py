"""Your own modules and data from Python: equimodal.fit, make_data, load_run, evaluate,
evaluate_robustness, diagnose, and encoders registered from Python reloading by name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

import equimodal
from equimodal.apps.cli import app
from equimodal.data.custom import as_split, make_data

FAST = {"epochs": 2, "batch_size": 32, "dim": 16}


def _tensors(n: int, seed: int, missing: bool = False):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    image = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.5
    audio = torch.randn(n, 6, 4, generator=g) + y.view(-1, 1, 1) * 0.8
    present = None
    if missing:
        present = {"image": torch.arange(n) % 3 != 0}  # every third sample lacks the image
    return {"image": image, "audio": audio}, y, present


class Clips(Dataset):
    """Items ``({"image": ..., "audio": ...}, label)``; ``drop_image`` items lack the image."""

    def __init__(self, n: int, seed: int, drop_image: bool = False) -> None:
        self.inputs, self.y, _ = _tensors(n, seed)
        self.drop_image = drop_image

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        item = {m: x[i] for m, x in self.inputs.items()}
        if self.drop_image and i % 4 == 0:
            del item["image"]
        return item, self.y[i]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallGRU(nn.Module):
    out_dim = 12

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 12, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[1][-1]


def _splits(missing: bool = False):
    return [_tensors(n, s, missing)[: 3 if missing else 2] for n, s in ((120, 0), (60, 1), (60, 2))]


def _fit(tmp_path, **kwargs):
    train, val, test = _splits()
    torch.manual_seed(0)
    encoders = {"image": SmallCNN(), "audio": SmallGRU()}
    args = {"progress": False, "run_dir": tmp_path / "run", **FAST, **kwargs}
    return equimodal.fit(train, val, test, encoders=encoders, **args)


def test_fit_trains_your_modules_and_reloads_them(tmp_path):
    result = _fit(tmp_path, strategy="shapley_alternating")
    run = tmp_path / "run"
    test = result.metrics["test"]
    assert set(test["shapley"]) == {"image", "audio"} and "edm" in test
    assert (run / "curves.png").is_file() and (run / "shapley.png").is_file()
    saved = (run / "config.yaml").read_text()
    assert "kind: module" in saved and "SmallCNN" in saved and "SmallGRU" in saved
    # the modules' own weights were trained: they differ from a fresh module's
    fresh = SmallCNN()
    trained = result.model.modality_parameters("image")
    assert not all(torch.equal(a, b) for a, b in zip(trained, fresh.parameters(), strict=False))

    data = make_data(*_splits())
    cfg, model, strategy, _ = equimodal.load_run(
        run, data=data, encoders={"image": SmallCNN(), "audio": SmallGRU()}
    )
    again = equimodal.evaluate(model, data, strategy)
    assert again["accuracy"] == pytest.approx(test["accuracy"])
    assert again["shapley"] == pytest.approx(test["shapley"])
    assert again["edm"] == pytest.approx(test["edm"])


def test_reloading_without_your_modules_names_what_to_pass(tmp_path):
    _fit(tmp_path, strategy="joint")
    data = make_data(*_splits())
    with pytest.raises(ValueError, match=r"your own encoder.*pass the same module again"):
        equimodal.load_run(tmp_path / "run", data=data)
    with pytest.raises(ValueError, match=r"data passed from Python.*load_run\(RUN, data="):
        equimodal.load_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "data passed from Python" in result.output


def test_fit_reads_datasets_and_loaders_with_missing_modalities(tmp_path):
    result = equimodal.fit(
        DataLoader(Clips(120, 0, drop_image=True), batch_size=7),
        Clips(60, 1, drop_image=True),
        (*_tensors(60, 2, missing=True)[:2], {"image": torch.arange(60) % 2 == 0}),
        encoders={"image": SmallCNN()},  # audio gets the config's encoder (an MLP)
        progress=False,
        strategy="joint",
        **FAST,
    )
    assert result.metrics["test"]["num_samples"] == 60
    split = as_split(Clips(20, 0, drop_image=True))
    assert split.present["image"].tolist() == [i % 4 != 0 for i in range(20)]
    batch = next(split.batches(20))
    assert batch.inputs["image"][0].abs().sum() == 0  # absent: zeros, never read


def test_without_test_split_nothing_is_scored_on_test(tmp_path):
    train, val, _ = _splits()
    result = equimodal.fit(train, val, progress=False, strategy="joint", **FAST)
    assert result.metrics["test"] == {} and result.metrics["val"]["accuracy"] > 0


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ([({"a": torch.zeros(3)}, 0), ({"a": torch.zeros(4)}, 1)], r"item 1: modality 'a' has"),
        ([({"a": torch.zeros(3)}, "cat")], r"item 0: the label 'cat' is not an integer"),
        ([(torch.zeros(3), 0)], r"item 0 must be \(inputs, label\)"),
        ([{"a": torch.zeros(3)}], r"item 0 is a dict without a label"),
        (42, r"expected \(inputs, labels\[, present\]\)"),
    ],
)
def test_bad_user_data_names_the_item(source, match):
    with pytest.raises(ValueError, match=match):
        as_split(source, "the train split")


def test_splits_must_agree_on_modalities():
    train, val, _ = _splits()
    other = ({"image": val[0]["image"]}, val[1])
    with pytest.raises(ValueError, match=r"the val split has modalities \['image'\]"):
        make_data(train, other)


def test_fit_keeps_a_folder_that_is_not_empty_and_removes_its_own_on_failure(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    train, val, test = _splits()
    with pytest.raises(FileExistsError, match="is not empty"):
        equimodal.fit(train, val, test, run_dir=tmp_path / "used", progress=False, **FAST)
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"

    class Broken(nn.Module):
        out_dim = 4

        def forward(self, x):
            raise RuntimeError("broken encoder")

    with pytest.raises(RuntimeError, match="broken encoder"):
        equimodal.fit(
            train,
            val,
            test,
            encoders={"image": Broken()},
            run_dir=tmp_path / "new",
            progress=False,
            **FAST,
        )
    assert not (tmp_path / "new").exists()
    with pytest.raises(TypeError, match="unknown setting 'epoch'"):
        equimodal.fit(train, val, epoch=3)


def test_an_encoder_whose_width_cannot_be_measured_says_so():
    class Flat(nn.Module):
        def forward(self, x):
            return x  # (B, 1, 8, 8): not (batch, features)

    train, val, test = _splits()
    with pytest.raises(ValueError, match=r"modality 'image'.*must return \(batch, features\)"):
        equimodal.fit(train, val, test, encoders={"image": Flat()}, progress=False, **FAST)


def test_evaluate_robustness_and_diagnose_take_a_model_and_data(tmp_path):
    result = _fit(tmp_path, strategy="shapley_alternating")
    data = make_data(*_splits())
    inference = result.strategy.inference_kwargs()
    robust = equimodal.evaluate_robustness(
        result.model, _splits()[2], inference, draws=1, etas=(0.5,), sigmas=(1.0,)
    )
    assert [s["modalities"] for s in robust.subsets] == [["image"], ["audio"], ["image", "audio"]]
    d = equimodal.diagnose(result.model, data, result.strategy, draws=1)
    assert d.strategy == "shapley_alternating" and set(d.ability) == {"image", "audio"}
    assert d.splits["test"]["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    only_audio = equimodal.evaluate(result.model, data, result.strategy, modalities=["audio"])
    assert "shapley" not in only_audio  # one modality read: no Shapley values


PLUGIN = """
import torch
from pydantic import BaseModel
from torch import nn
from equimodal.models.encoders import register_encoder


class TinyOptions(BaseModel):
    width: int = 5


class Tiny(nn.Module):
    def __init__(self, in_dim, width):
        super().__init__()
        self.linear = nn.Linear(in_dim, width)
        self.out_dim = width

    def forward(self, x):
        return torch.tanh(self.linear(x.reshape(len(x), -1)))


@register_encoder("tiny_plugin", TinyOptions, "a test plugin")
def build(spec, width):
    return Tiny(spec.dim, width)
"""


def test_an_encoder_registered_in_a_module_reloads_from_the_command_line(tmp_path, monkeypatch):
    (tmp_path / "mylab_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    import mylab_plugin  # noqa: F401  (registers "tiny_plugin")

    from equimodal.config import build_config
    from equimodal.engine.trainer import Trainer

    cfg = build_config(
        {"dataset": {"name": "synthetic"}, "model": {"encoder": {"kind": "tiny_plugin"}}},
        ["strategy.name=joint", "train.epochs=1", "train.relative_edm=false", "model.dim=8"],
    )
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run, progress=False).fit()
    assert "mylab_plugin" in (run / "config.yaml").read_text()
    # a fresh process that never imported the plugin: config.yaml's imports bring it
    out = subprocess.run(
        [sys.executable, "-m", "equimodal", "evaluate", str(run)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert f"{100 * accuracy:.2f} %" in out.stdout


def test_a_part_registered_in_a_script_warns_that_it_cannot_be_reloaded(tmp_path):
    from equimodal.config import build_config
    from equimodal.engine.trainer import Trainer
    from equimodal.models.encoders import MLPOptions, register_encoder

    def build(spec, **options):
        from equimodal.models.encoders import MLPEncoder

        return MLPEncoder(spec.dim, **options)

    build.__module__ = "__main__"  # as if defined in the user's script
    register_encoder("script_mlp", MLPOptions)(build)
    cfg = build_config({"model": {"encoder": {"kind": "script_mlp"}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    assert any("encoder 'script_mlp', registered in your script" in str(w.message) for w in caught)
    from equimodal.core.registries import ENCODERS

    ENCODERS.remove("script_mlp")


def test_a_config_imports_modules_before_it_is_read(tmp_path, monkeypatch):
    from equimodal.config import ConfigError, build_config

    (tmp_path / "mylab_plugin2.py").write_text(
        textwrap.dedent(PLUGIN).replace("tiny_plugin", "tiny_plugin2")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = build_config(
        {"imports": ["mylab_plugin2"], "model": {"encoder": {"kind": "tiny_plugin2"}}}
    )
    assert cfg.model.encoder.kind == "tiny_plugin2"
    with pytest.raises(ConfigError, match=r"imports: module 'no_such_mod' could not be imported"):
        build_config({"imports": ["no_such_mod"]})
    with pytest.raises(ConfigError, match=r"is not a Python module name"):
        build_config({"imports": ["os; rm -rf"]})
