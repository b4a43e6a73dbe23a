"""Fidelity to the official code of AGM, MLA and OGM-GE: each rule recomputed by hand.

AGM (github.com/lihong2303/AGM_ICCV2023, ``model/CREMAD_net.py`` and ``run/CREMAD_main.py``;
three modalities: ``model/URFunny_net.py``): the full output in training mode, every masked
output by zeroing the other modalities' inputs and running the whole model in evaluation
mode, all with gradients; the responses are the official combinations of those outputs.

MLA (github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
``GSPlugin`` in ``utils/utils.py``): one projector, updated with the current modality's
batch-mean feature before each unimodal step, Frobenius-normalised, with
``alpha_t = 0.1 ** (1 + i / n)``; the head weight's gradient is replaced by ``grad P^T``.

OGM-GE (github.com/GeWu-Lab/OGM-GE_CVPR2022, ``train_epoch`` of ``main.py``): the fused
loss's gradients, the encoder tensors scaled by ``1 - tanh(alpha rho)`` for the dominant
modality, Gaussian noise with the gradient's standard deviation on every encoder.
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
from equimodal.engine.trainer import Trainer

from .interrupt import KillAt, Killed, strip_times
from .method_kit import first_batches
from .method_kit import method_config as config_for
from .method_kit import set_up as setup_strategy


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


# ---------------------------------------------------------------------------- OGM-GE
def ogm_ge_step_by_hand(model, batch, alpha: float, noise: bool, seed: int):
    """``train_epoch`` of the official ``main.py``, written out for M modalities: the fused
    loss's gradients, then every encoder tensor of rank >= 2 scaled by ``k_m`` plus
    ``N(0, std + 1e-8)``; biases and norms untouched. Returns the gradients and ``k``."""
    torch.manual_seed(seed)
    model.train()
    model.zero_grad(set_to_none=True)
    z = model.encode(batch)
    logits = model.fuse(z, batch.present).logits
    F.cross_entropy(logits, batch.labels).backward()
    weights = model.decision_weights()
    bias = model.head_parameters()[1]
    score = {}
    for m in model.modalities:  # the official out_a = a @ W[:, :d].T + fc_out.bias / 2
        own = z[m].detach() @ weights[m].detach().T + bias.detach() / len(model.modalities)
        score[m] = float(torch.softmax(own, 1)[torch.arange(len(batch.labels)), batch.labels].sum())
    k = {}
    for m in model.modalities:
        others = [score[o] for o in model.modalities if o != m]
        rho = score[m] / (sum(others) / len(others))
        k[m] = 1 - math.tanh(alpha * rho) if rho > 1 else 1.0
    grads = {}
    for m in model.modalities:
        for p in model.modality_parameters(m):
            g = p.grad.clone()
            if p.dim() >= 2:
                std = g.std().item()
                g = g * k[m]
                if noise:
                    g = g + torch.zeros_like(g).normal_(0, std + 1e-8)
            grads[id(p)] = g
    model.zero_grad(set_to_none=True)
    return grads, k


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("noise", [True, False])
def test_ogm_ge_step_is_the_official_one_with_dropout_on(modalities, noise):
    extra = ["model.encoder.dropout=0.3", "model.fusion=concat", f"strategy.noise={noise}"]
    config = config_for("ogm_ge", modalities, extra=extra)
    data, model, strategy = setup_strategy(config)  # lr 0: the parameters stay
    strategy.on_epoch_start(1)
    for t, batch in enumerate(first_batches(data, 2)):
        grads, k = ogm_ge_step_by_hand(model, batch, 0.8, noise, seed=200 + t)
        assert any(v < 1 for v in k.values())  # someone dominates: the rule is exercised
        torch.manual_seed(200 + t)
        logs = strategy.training_step(batch)
        for m in model.modalities:
            assert logs[f"coef_{m}"] == pytest.approx(k[m], rel=1e-5)
            params = model.modality_parameters(m)
            assert any(p.dim() == 1 for p in params)  # biases and norms are in the check
            for p in params:
                torch.testing.assert_close(p.grad, grads[id(p)], atol=1e-6, rtol=1e-4)


def test_ogm_ge_modulates_epochs_1_to_51_by_default():
    """The official ``modulation_starts 0 <= epoch <= modulation_ends 50``, 0-based."""
    config = config_for("ogm_ge", 2)
    data, model, strategy = setup_strategy(config)
    batch = first_batches(data, 1)[0]
    for epoch, modulated in [(1, True), (51, True), (52, False)]:
        strategy.on_epoch_start(epoch)
        assert ("ratio_m0" in strategy.training_step(batch)) is modulated, epoch


# ---------------------------------------------------------------------------- UDI
# No official code: the abstract (arXiv 2509.02281) fixes three things a test can hold the
# reconstruction to: no joint loss, the anchor trained first and then left alone, and the
# other modalities guided by the anchor's representations (information flows one way).
def udi_stage1_grads_by_hand(model, batch, anchor, config, seed):
    """The stage-1 loss written out: per follower ``CE + w (l_con JS + l_com InfoNCE)`` with
    ``w = (1 + cos(d JS / d z_m, d InfoNCE / d z_m)) / 2``; the anchor in eval mode."""
    from equimodal.strategies.udi import infonce_mutual_information

    torch.manual_seed(seed)
    model.train()
    for module in model.modality_modules(anchor, with_head=True):
        module.eval()
    with torch.no_grad():
        z_a = model.encode_modality(anchor, batch.inputs[anchor])
        p_a = torch.softmax(model.modality_logits(anchor, z_a), 1)
    total = 0.0
    for m in model.modalities:
        if m == anchor:
            continue
        z_m = model.encode_modality(m, batch.inputs[m])
        logits = model.modality_logits(m, z_m)
        p_m = torch.softmax(logits, 1)
        mix = (p_a + p_m) / 2
        js = 0.5 * ((p_a * (p_a / mix).log()).sum(1) + (p_m * (p_m / mix).log()).sum(1)).mean()
        mi = infonce_mutual_information(z_m, z_a, config.strategy.temperature)
        g_js = torch.autograd.grad(js, z_m, retain_graph=True)[0].flatten()
        g_mi = torch.autograd.grad(mi, z_m, retain_graph=True)[0].flatten()
        w = float((1 + g_js @ g_mi / (g_js.norm() * g_mi.norm())) / 2)
        cfg = config.strategy
        loss = F.cross_entropy(logits, batch.labels)
        total = total + loss + w * (cfg.consistency_weight * js + cfg.complementarity_weight * mi)
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(zip(params, parameter_grads(total, params), strict=True))


def test_udi_stage1_is_the_stated_loss_with_dropout_on_and_the_anchor_untouched():
    extra = ["model.encoder.dropout=0.3"]
    config = config_for("udi", 3, extra=extra)
    data, model, strategy = setup_strategy(config)  # lr 0: the parameters stay
    strategy.load_state_dict({"anchor": "m0", "anchor_epoch": 1})  # stage 1, m0 frozen
    anchor_params = model.modality_parameters("m0", with_head=True)
    assert not any(p.requires_grad for p in anchor_params)
    for t, batch in enumerate(first_batches(data, 2)):
        expected = udi_stage1_grads_by_hand(model, batch, "m0", config, seed=300 + t)
        torch.manual_seed(300 + t)
        model.train()
        logs = strategy.training_step(batch)
        assert 0.0 < logs["weight_m1"] < 1.0 and 0.0 < logs["weight_m2"] < 1.0
        for p, g in expected.items():
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
        # one way only: no gradient reaches the anchor's encoder, projection or head
        assert all(p.grad is None for p in anchor_params)


# ---------------------------------------------------------- decision calibration
# Our formula (the paper asks for adaptive weights at the decision layer, without one):
# ``sum_m w_m(c) z_m / tau_m``, fitted on validation by NLL; joint training underneath.
def test_calibrated_decision_by_hand_with_a_missing_modality():
    from equimodal.balance.decision import Calibration, apply_calibration

    torch.manual_seed(0)
    logits = {m: torch.randn(5, 4) for m in ("a", "b", "c")}
    present = {m: torch.ones(5, dtype=torch.bool) for m in logits}
    present["b"][2] = False
    weight = 3 * torch.softmax(torch.randn(3, 4), 0)
    calibration = Calibration(("a", "b", "c"), torch.tensor([0.5, 2.0, 1.3]), weight)
    got = apply_calibration(logits, present, calibration)
    for i in range(5):
        expected = sum(
            weight[k] * logits[m][i] / calibration.temperature[k]
            for k, m in enumerate(("a", "b", "c"))
            if present[m][i]
        )
        torch.testing.assert_close(got[i], expected)


def test_calibration_fit_is_a_stationary_point_of_the_validation_nll():
    from equimodal.balance.decision import apply_calibration, fit_calibration

    torch.manual_seed(1)
    labels = torch.randint(0, 4, (300,))
    signal = F.one_hot(labels, 4).float()
    logits = {  # a confident, noisy modality and a weak one
        "a": 8 * signal + 4 * torch.randn(300, 4),
        "b": 0.5 * signal + 0.5 * torch.randn(300, 4),
    }
    present = {m: torch.ones(300, dtype=torch.bool) for m in logits}
    calibration = fit_calibration(logits, labels, steps=200)
    log_tau = calibration.temperature.log().clone().requires_grad_(True)
    raw = calibration.weight.log().clone().requires_grad_(True)  # softmax pre-image
    weight = 2 * torch.softmax(raw, 0)
    fused = sum(weight[k] * logits[m] / log_tau[k].exp() for k, m in enumerate(("a", "b")))
    nll = F.cross_entropy(fused, labels)
    grads = torch.autograd.grad(nll, [log_tau, raw])
    assert max(float(g.abs().max()) for g in grads) < 1e-3
    plain = F.cross_entropy(logits["a"] + logits["b"], labels)
    assert float(nll.detach()) < float(plain) - 0.05  # better than the uncalibrated sum
    torch.testing.assert_close(apply_calibration(logits, present, calibration), fused.detach())


# ---------------------------------------------------------------------------- both
@pytest.mark.parametrize(
    ("strategy", "modalities"), [("agm", 2), ("agm", 3), ("mla", 2), ("mla", 3)]
)
def test_short_training_run(strategy, modalities):
    extra = ["model.encoder.dropout=0.3"]
    result = Trainer(config_for(strategy, modalities, epochs=3, extra=extra), progress=False).fit()
    assert result.metrics["test"]["accuracy"] > 0.7
    assert len(result.history) == 4


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
