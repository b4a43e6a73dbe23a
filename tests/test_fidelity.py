"""Fidelity to the official code of AGM and MLA: each rule recomputed by hand.

AGM (github.com/lihong2303/AGM_ICCV2023, ``model/CREMAD_net.py`` and ``run/CREMAD_main.py``;
three modalities: ``model/URFunny_net.py``): the full output in training mode, every masked
output by zeroing the other modalities' inputs and running the whole model in evaluation
mode, all with gradients; the responses are the official combinations of those outputs.

MLA (github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
``GSPlugin`` in ``utils/utils.py``): one projector, updated with the current modality's
batch-mean feature before each unimodal step, Frobenius-normalised, with
``alpha_t = 0.1 ** (1 + i / n)``; the head weight's gradient is replaced by ``grad P^T``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from equimodal.config import build_config, load_yaml
from equimodal.data.batch import MultimodalBatch
from equimodal.data.registry import load_dataset
from equimodal.engine.callbacks import Callback
from equimodal.engine.trainer import Trainer, build_model
from equimodal.strategies import TrainContext, build_strategy

from .conftest import small_overrides

SIGNALS = {2: "[3.0, 0.8]", 3: "[3.0, 1.5, 0.4]"}


def config_for(strategy: str, modalities: int = 3, epochs: int = 3, extra=()):
    data = (
        f"dataset.options={{num_samples: 600, num_classes: 4, num_modalities: {modalities}, "
        f"signal: {SIGNALS[modalities]}}}"
    )
    return build_config({}, [*small_overrides(strategy, epochs), data, *extra])


def setup_strategy(config, lr: float = 0.0):
    """Model, strategy and data; SGD with ``lr`` 0 leaves the parameters as they are."""
    data = load_dataset(config.dataset.name, seed=0, **config.dataset.options)
    torch.manual_seed(0)
    model = build_model(config, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    strategy = build_strategy(config.strategy)
    strategy.setup(TrainContext(model, optimizer, data.modalities, data.num_classes, seed=0))
    return data, model, strategy


def first_batches(data, count: int, size: int = 64) -> list[MultimodalBatch]:
    batches = data.train.batches(size)
    return [next(batches) for _ in range(count)]


# ---------------------------------------------------------------------------- AGM
def coalition_outputs_by_hand(model, batch) -> dict[frozenset, torch.Tensor]:
    """The official masked passes: the other modalities' inputs zeroed, the whole model in
    evaluation mode, with gradients. Keys: the modalities kept."""
    names = model.modalities
    was_training = model.training
    model.eval()
    outputs = {}
    for mask in range(1, (1 << len(names)) - 1):
        kept = frozenset(m for i, m in enumerate(names) if mask >> i & 1)
        zeroed = MultimodalBatch(
            inputs={m: x if m in kept else torch.zeros_like(x) for m, x in batch.inputs.items()},
            present={m: torch.ones_like(p) for m, p in batch.present.items()},
            labels=batch.labels,
            indices=batch.indices,
        )
        outputs[kept] = model(zeroed).logits
    model.train(was_training)
    return outputs


def official_responses(full, outs, names) -> dict[str, torch.Tensor]:
    """``CREMAD_net.py`` (two modalities) and ``URFunny_net.py`` (three), written out."""
    f = {**outs, frozenset(names): full}
    if len(names) == 2:
        a, v = names
        return {
            a: 0.5 * (full - f[frozenset([v])] + f[frozenset([a])]),
            v: 0.5 * (full - f[frozenset([a])] + f[frozenset([v])]),
        }
    phi = {}
    for i in names:
        j, k = (m for m in names if m != i)
        phi[i] = (full - f[frozenset([j, k])] + f[frozenset([i])]) / 3 + (
            f[frozenset([i, j])] - f[frozenset([k])] + f[frozenset([i, k])] - f[frozenset([j])]
        ) / 6
    return phi


def responses_by_hand(model, batch, seed: int):
    """The full pass in training mode (dropout drawn after ``seed``) and the masked passes."""
    torch.manual_seed(seed)
    model.train()
    full = model(batch).logits
    outs = coalition_outputs_by_hand(model, batch)
    return official_responses(full, outs, model.modalities), full


def parameter_grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("modalities", [2, 3])
def test_agm_responses_are_the_official_masked_passes_with_dropout_on(modalities):
    config = config_for("agm", modalities, extra=["model.encoder.dropout=0.3"])
    data, model, strategy = setup_strategy(config)
    batch = first_batches(data, 1)[0]
    names = model.modalities
    model.train()  # as in training: dropout on in the full pass
    torch.manual_seed(7)
    phi, full = strategy.responses(batch)
    assert model.training  # the strategy restored the mode
    ref_phi, ref_full = responses_by_hand(model, batch, seed=7)
    torch.testing.assert_close(full, ref_full, atol=1e-5, rtol=1e-5)
    params = list(model.parameters())
    for m in names:
        torch.testing.assert_close(phi[m], ref_phi[m], atol=1e-5, rtol=1e-5)
        # the same gradients, through every coalition output
        ours = parameter_grads(F.cross_entropy(phi[m], batch.labels), params)
        theirs = parameter_grads(F.cross_entropy(ref_phi[m], batch.labels), params)
        for g, h in zip(ours, theirs, strict=True):
            torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)
    # every response's loss reaches every encoder (as in the official code)
    for m in names:
        loss = F.cross_entropy(phi[m], batch.labels)
        for other in names:
            grads = parameter_grads(loss, model.modality_parameters(other))
            assert sum(float(g.abs().sum()) for g in grads) > 0, (m, other)
    # the old shortcut (the training-mode features, dropout on, in the masked passes)
    # gives other responses
    present = {m: torch.ones_like(p) for m, p in batch.present.items()}
    model.eval()
    zero = {m: model.encode_modality(m, torch.zeros_like(batch.inputs[m])) for m in names}
    model.train()
    torch.manual_seed(7)
    z = model.encode(batch)
    model.eval()
    shortcut = model.fuse({m: z[m] if m == names[0] else zero[m] for m in names}, present)
    model.train()
    official = coalition_outputs_by_hand(model, batch)[frozenset([names[0]])]
    assert (shortcut.logits - official).abs().max() > 1e-2


def agm_step_by_hand(model, batch, running, t, config, seed):
    """One official training step (``run/CREMAD_main.py`` / ``run/URFunny_main.py``):
    gradients of every parameter, the coefficients and the new running scores."""
    names = model.modalities
    phi, _ = responses_by_hand(model, batch, seed)
    rows = torch.arange(len(batch))
    scores = {}
    for m in names:
        prob = torch.softmax(phi[m].detach(), dim=1)[rows, batch.labels]
        terms = torch.where(prob < 1e-8, torch.full_like(prob, -math.log(1e-8)), -torch.log(prob))
        scores[m] = float(terms.mean())
    size = len(names)

    def ratios(s):
        mean = sum(s.values()) / size
        return {m: math.exp((mean - s[m]) * size / (size - 1)) for m in names}

    if size == 2:  # the CREMA-D loop's own form
        a, v = names
        assert ratios(scores)[a] == pytest.approx(math.exp(scores[v] - scores[a]))
    ratio, optimal = ratios(scores), ratios(running)
    kappa = {
        m: math.exp(config.strategy.alpha * min(optimal[m] - ratio[m], config.strategy.clip))
        for m in names
    }
    new_running = {m: running[m] * (t - 1) / t + scores[m] / t for m in names}
    for m in names:  # the official backward hooks
        phi[m].register_hook(lambda g, k=kappa[m]: g * k)
    loss = F.cross_entropy(sum(phi.values()), batch.labels)
    model.zero_grad(set_to_none=True)
    loss.backward()
    limit = config.strategy.head_grad_limit
    head = model.head_weight()
    clipped = bool(head.grad.max() > limit or head.grad.min() < -limit)
    if clipped:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], limit)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, kappa, new_running, clipped


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("limit", [1.0, 1e-3])
def test_agm_training_steps_follow_the_official_loop(modalities, limit):
    extra = ["model.encoder.dropout=0.3", f"strategy.head_grad_limit={limit}"]
    config = config_for("agm", modalities, extra=extra)
    data, model, strategy = setup_strategy(config)  # lr 0: the parameters stay
    names = model.modalities
    running = {m: 0.0 for m in names}  # the official loop starts from 0
    for t, batch in enumerate(first_batches(data, 3), start=1):
        grads, kappa, running, clipped = agm_step_by_hand(
            model, batch, running, t, config, seed=100 + t
        )
        if limit < 1e-2:
            assert clipped  # the branch is exercised
        torch.manual_seed(100 + t)
        logs = strategy.training_step(batch)
        for m in names:
            assert logs[f"kappa_{m}"] == pytest.approx(kappa[m], rel=1e-4)
            assert strategy.running[m] == pytest.approx(running[m], rel=1e-5)
        assert strategy.batches == t
        if t == 1:  # running scores start at 0, as in the official loop: kappa is not 1
            assert any(abs(k - 1.0) > 1e-3 for k in kappa.values())
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------- MLA
def test_mla_projector_alpha_and_gradient_by_hand():
    """Three batches of two modalities, ``n = 3``: P, alpha_t and the head gradient."""
    config = config_for("mla", 2, extra=["model.encoder.dropout=0", "strategy.batches_per_epoch=3"])
    data, model, strategy = setup_strategy(config)  # lr 0: features recomputable
    weight = model.head_weight()
    used = []  # the head weight's gradient at each optimizer step
    step = strategy.context.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(weight.grad.detach().clone())
        return step(*args, **kwargs)

    strategy.context.optimizer.step = recording_step
    strategy.on_epoch_start(1)
    p = torch.eye(model.dim)
    updates = 0
    for i, batch in enumerate(first_batches(data, 3)):
        alpha = 0.1 ** (1 + i / 3)
        assert strategy.alpha() == alpha
        expected = []
        for m in model.modalities:
            z = model.encode_modality(m, batch.inputs[m])
            loss = F.cross_entropy(model.modality_logits(m, z), batch.labels)
            (raw,) = torch.autograd.grad(loss, weight)
            if updates == 0:  # the official first update changes nothing
                expected.append(raw)
            else:
                r = z.detach().mean(0)
                k = p @ r
                p = p - k[:, None] @ k[None, :] / (alpha + r @ k)
                p = p / torch.sqrt((p * p).sum())
                expected.append(raw @ p.T)
                assert not torch.allclose(expected[-1], raw)  # the projection acts
            updates += 1
        before = len(used)
        strategy.training_step(batch)
        torch.testing.assert_close(strategy.projector, p, atol=1e-6, rtol=1e-5)
        assert strategy.updates == updates
        for got, want in zip(used[before:], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert float(torch.linalg.matrix_norm(strategy.projector)) == pytest.approx(1.0)


def test_mla_counts_the_batches_of_the_first_epoch_and_resumes_from_json():
    config = config_for("mla", 2, extra=["model.encoder.dropout=0"])
    data, model, strategy = setup_strategy(config)
    batches = first_batches(data, 3)
    strategy.on_epoch_start(1)
    for batch in batches:
        assert strategy.alpha() == 0.1  # n not known yet
        strategy.training_step(batch)
    state = json.loads(json.dumps(strategy.state_dict()))
    _, _, twin = setup_strategy(config)  # the same initial model (lr 0: it never moves)
    twin.load_state_dict(state)
    torch.testing.assert_close(twin.projector, strategy.projector, atol=0, rtol=0)
    for s in (strategy, twin):
        s.on_epoch_start(2)
        assert s.batches_per_epoch == 3
    for i, batch in enumerate(batches):
        assert strategy.alpha() == twin.alpha() == 0.1 ** (1 + i / 3)
        strategy.training_step(batch)
        twin.training_step(batch)
        torch.testing.assert_close(twin.projector, strategy.projector, atol=0, rtol=0)
    assert twin.updates == strategy.updates == 12


# ---------------------------------------------------------------------------- both
@pytest.mark.parametrize(
    ("strategy", "modalities"), [("agm", 2), ("agm", 3), ("mla", 2), ("mla", 3)]
)
def test_short_training_run(strategy, modalities):
    extra = ["model.encoder.dropout=0.3"]
    result = Trainer(config_for(strategy, modalities, epochs=3, extra=extra), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.7
    assert len(result.history) == 4


class Killed(RuntimeError):
    pass


class KillAt(Callback):
    """Stops the run inside ``batch`` of ``epoch`` (an exception, as a crash would)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch, self.seen = epoch, batch, 0

    def on_epoch_start(self, trainer, state):
        self.seen = 0

    def on_batch_end(self, trainer, state, logs):
        self.seen += 1
        if state.epoch == self.epoch and self.seen == self.batch:
            raise Killed


def strip_times(obj):
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if not k.endswith("time_s")}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


@pytest.mark.parametrize("strategy", ["agm", "mla"])
def test_resume_continues_exactly(tmp_path, strategy):
    extra = ["model.encoder.dropout=0.2", "train.patience=null"]
    config = config_for(strategy, 2, epochs=5, extra=extra)
    ref = Trainer(config, run_dir=tmp_path / "ref", progress=False).fit()
    run = tmp_path / "killed"
    with pytest.raises(Killed):
        Trainer(config, run_dir=run, progress=False, callbacks=[KillAt(3, 2)]).fit()
    resumed = Trainer(config, run_dir=run, progress=False, resume=True).fit()
    assert strip_times(resumed.history) == strip_times(ref.history)
    ours, theirs = strip_times(resumed.metrics), strip_times(ref.metrics)
    ours.pop("run"), theirs.pop("run")
    assert ours == theirs
    assert resumed.strategy.state_dict() == ref.strategy.state_dict()


@pytest.mark.parametrize("strategy", ["agm", "mla"])
def test_two_processes_match_one(tmp_path, strategy):
    """torchrun with 2 CPU processes reproduces one process (dropout 0, as in
    tests/test_distributed.py; the last global batch leaves rank 1 a stand-in row)."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    data = "dataset.options={num_samples: 500, num_classes: 4, signal: [3.0, 1.5, 0.4]}"
    sets = [data, "train.batch_size=54", "model.dim=16", "model.encoder.hidden=32"]
    sets += ["model.encoder.dropout=0", "optim.lr=0.01", "train.relative_edm=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "equimodal", "train", "-q", "--out", str(out), "--dataset", "synthetic"]
    cmd += ["--strategy", strategy, "--epochs", "2"] + [x for s in sets for x in ("-s", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = out / f"synthetic-{strategy}-s0"
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    reference = Trainer(build_config(load_yaml(run_dir / "config.yaml")), progress=False).fit()
    assert len(history) == len(reference.history) == 3
    for ours, theirs in zip(history[1:], reference.history[1:], strict=True):
        for key, value in theirs["train"].items():
            assert ours["train"][key] == pytest.approx(value, abs=1e-4), key
        assert ours["val"]["accuracy"] == pytest.approx(theirs["val"]["accuracy"], abs=1e-9)
    assert metrics["test"]["accuracy"] == pytest.approx(
        reference.metrics["test"]["accuracy"], abs=1e-9
    )
