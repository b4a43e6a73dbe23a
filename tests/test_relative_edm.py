"""Relative EDM in the metrics: stand-alone abilities from unimodal runs, cached once."""

from __future__ import annotations

import json

import pytest

from equimodal.analysis import fit_run, standalone
from equimodal.balance import relative_edm
from equimodal.data.registry import load_dataset
from equimodal.engine.trainer import Trainer

MODALITIES = ("m0", "m1", "m2")


@pytest.fixture
def unimodal_runs(monkeypatch):
    """An empty in-process cache, and the modality of every unimodal run trained."""
    monkeypatch.setattr(standalone, "_MEMORY_CACHE", {})
    trained: list[str] = []

    class CountingTrainer(Trainer):
        def fit(self):
            trained.append(self.config.strategy.modality)
            return super().fit()

    monkeypatch.setattr(standalone, "Trainer", CountingTrainer)
    return trained


def test_relative_edm_in_metrics_and_cached(small_config, tmp_path, monkeypatch, unimodal_runs):
    config = small_config("joint", epochs=2, extra=["train.relative_edm=true"])
    first = fit_run(Trainer(config, run_dir=tmp_path / "a", progress=False)).metrics
    assert unimodal_runs == list(MODALITIES)
    test = first["test"]
    ability = test["standalone_val_accuracy"]
    assert set(ability) == set(MODALITIES)
    assert ability["m0"] > ability["m2"]  # the strong modality is stronger alone
    chance = first["val"]["v_empty"]
    phi = [test["shapley"][m] for m in MODALITIES]
    expected = relative_edm(phi, [ability[m] for m in MODALITIES], chance)
    assert test["relative_edm"] == pytest.approx(expected.edm)
    assert 0.0 <= first["val"]["relative_edm"] <= 1.0
    cached = list((tmp_path / ".standalone").glob("*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["accuracy"] == ability

    # a second method on the same data, seed and settings reuses the abilities (from disk)
    monkeypatch.setattr(standalone, "_MEMORY_CACHE", {})
    unimodal_runs.clear()
    other = small_config("ogm_ge", epochs=2, extra=["train.relative_edm=true"])
    second = fit_run(Trainer(other, run_dir=tmp_path / "b", progress=False)).metrics
    assert unimodal_runs == []
    assert second["test"]["standalone_val_accuracy"] == ability


def test_relative_edm_can_be_switched_off(small_config):
    metrics = fit_run(Trainer(small_config("joint", epochs=1), progress=False)).metrics
    assert "relative_edm" not in metrics["test"]


def test_a_changed_missing_rate_is_a_new_key_and_retrains(small_config, tmp_path, unimodal_runs):
    extra = ["train.relative_edm=true"]
    plain = small_config("joint", epochs=1, extra=extra)
    fit_run(Trainer(plain, run_dir=tmp_path / "plain", progress=False))
    assert unimodal_runs == list(MODALITIES)
    unimodal_runs.clear()
    # the unimodal runs inherit the missing rate: their abilities differ, and so must the key
    missing = small_config("joint", epochs=1, extra=extra + ["train.missing_rate=0.3"])
    assert standalone.standalone_key(missing, MODALITIES) != standalone.standalone_key(
        plain, MODALITIES
    )
    fit_run(Trainer(missing, run_dir=tmp_path / "missing", progress=False))
    assert unimodal_runs == list(MODALITIES)  # neither the memory nor the file was reused
    assert len(list((tmp_path / ".standalone").glob("*.json"))) == 2
    # the same settings again: both caches hit
    unimodal_runs.clear()
    fit_run(Trainer(missing, run_dir=tmp_path / "again", progress=False))
    assert unimodal_runs == []


@pytest.mark.parametrize(
    "change",
    [
        "train.missing_rate=0.3",
        "model.encoder.dropout=0.3",
        "model.encoder.hidden=48",
        "model.dim=8",
        "model.encoders={m1: {kind: mlp, hidden: 8}}",
        "dataset.options={num_samples: 600, num_classes: 4, signal: [3.0, 1.5, 0.5]}",
        "dataset.name=mfeat",
        "seed=1",
        "optim.weight_decay=0.01",
        "optim.scheduler=cosine",
        "train.epochs=4",
        "train.batch_size=32",
        "train.patience=2",
        "train.eval_batch_size=100",
        "train.deterministic=false",
        "train.device=cpu",
    ],
)
def test_every_setting_the_unimodal_runs_use_changes_the_key(small_config, change):
    base = small_config("joint")
    assert standalone.standalone_key(
        small_config("joint", extra=[change]), MODALITIES
    ) != standalone.standalone_key(base, MODALITIES)


@pytest.mark.parametrize(
    "change",
    [
        "name=another",
        "strategy.name=ogm_ge",
        "strategy={name: ogm_ge, alpha: 0.5}",
        "model.fusion=sum",
        "train.relative_edm=true",
    ],
)
def test_what_the_unimodal_runs_replace_keeps_the_key(small_config, change):
    base = small_config("joint")
    assert standalone.standalone_key(
        small_config("joint", extra=[change]), MODALITIES
    ) == standalone.standalone_key(base, MODALITIES)
    # the key covers the modalities whose runs it names
    assert standalone.standalone_key(base, MODALITIES[:2]) != standalone.standalone_key(
        base, MODALITIES
    )


def test_a_retrain_after_a_changed_option_reads_no_file_of_the_old_key(
    small_config, tmp_path, unimodal_runs
):
    extra = ["train.relative_edm=true"]
    fit_run(Trainer(small_config("joint", 1, extra), run_dir=tmp_path / "a", progress=False))
    unimodal_runs.clear()
    for i, change in enumerate(
        [
            "model.encoder.dropout=0.3",
            "dataset.options={num_samples: 600, num_classes: 4, signal: [3.0, 1.5, 0.5]}",
        ]
    ):
        config = small_config("joint", 1, extra + [change])
        fit_run(Trainer(config, run_dir=tmp_path / f"b{i}", progress=False))
        assert unimodal_runs == list(MODALITIES), change
        unimodal_runs.clear()


def test_passed_data_and_data_loaded_by_name_do_not_share_the_memory_cache(
    small_config, unimodal_runs
):
    config = small_config("joint", epochs=1, extra=["train.relative_edm=true"])
    # no run folder: the in-process cache is the only cache
    by_name = fit_run(Trainer(config, progress=False)).metrics
    assert unimodal_runs == list(MODALITIES)
    unimodal_runs.clear()
    fit_run(Trainer(config, progress=False))
    assert unimodal_runs == []  # loaded by name again: shared

    # a data object of the caller's own, under the same config: not what the name loads
    own = load_dataset("synthetic", seed=0, num_samples=600, num_classes=4, signal=[0.4, 1.5, 3.0])
    passed = fit_run(Trainer(config, data=own, progress=False)).metrics
    assert unimodal_runs == list(MODALITIES)
    ability, theirs = passed["test"]["standalone_val_accuracy"], by_name["test"]
    assert ability["m2"] > ability["m0"]  # its own abilities, not the loaded data's
    assert theirs["standalone_val_accuracy"]["m0"] > theirs["standalone_val_accuracy"]["m2"]
    unimodal_runs.clear()
    fit_run(Trainer(config, data=own, progress=False))
    assert unimodal_runs == []  # the same object again: its own entry
    # another passed object equal to the loaded one still trains: identity, not content
    copy = load_dataset("synthetic", seed=0, **config.dataset.options)
    fit_run(Trainer(config, data=copy, progress=False))
    assert unimodal_runs == list(MODALITIES)
    unimodal_runs.clear()
    fit_run(Trainer(config, progress=False))
    assert unimodal_runs == []  # passed data left the shared entry alone
    # an entry of a passed object goes with the object
    slots = [slot for slot in standalone._MEMORY_CACHE if slot[1] is not None]
    assert len(slots) == 2
    del own, copy
    import gc

    gc.collect()
    assert [slot for slot in standalone._MEMORY_CACHE if slot[1] is not None] == []
