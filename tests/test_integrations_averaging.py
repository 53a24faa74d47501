"""nvrm_ext.integrations.averaging: SWA / EMA of the clean weights (torch.optim.swa_utils, timm)."""
from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from nvrm_ext import NVRM, FusedVAdam, FusedVSGD
from nvrm_ext.integrations.averaging import update_averaged
from test_integrations_reference import clean_reference

STEPS = 6
DECAY = 0.8


def problem(init_seed=0):
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    return model, x, y


def train(make_opt, averager_factory=None, update=None):
    """STEPS steps; after each, `update(averager, model, opt)`. Returns the final weights, the
    averager, and the clean weights after each step by the noise specification."""
    model, x, y = problem()
    opt = make_opt(model)
    averager = averager_factory(model) if averager_factory else None
    cleans = []
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        reference = clean_reference(opt)
        cleans.append([reference[p] for p in model.parameters()])
        if update is not None:
            update(averager, model, opt)
    return [p.detach().clone() for p in model.parameters()], averager, cleans


OPTIMIZERS = {
    "vsgd": lambda m: FusedVSGD(m.parameters(), lr=0.1, variability=0.05, num_iters=1000, momentum=0.9, seed=4),
    "vadam": lambda m: FusedVAdam(m.parameters(), lr=0.01, variability=0.05, num_iters=1000, seed=4),
    "nvrm-adamw": lambda m: NVRM(torch.optim.AdamW(m.parameters(), lr=0.01), variability=0.05, num_iters=1000,
                                 seed=4),
}


def swa_average(cleans):
    return [torch.stack(ws).mean(0) for ws in zip(*cleans)]


def ema_average(cleans, decay=DECAY):
    # AveragedModel copies the first weights it sees, then ema = decay * ema + (1 - decay) * w
    average = [w.clone() for w in cleans[0]]
    for weights in cleans[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    return average


AVERAGERS = {
    "swa": (lambda m: AveragedModel(m), swa_average),
    "ema": (lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(DECAY)), ema_average),
}


@pytest.mark.parametrize("kind", list(AVERAGERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_averaged_model_averages_the_clean_weights_and_training_is_unchanged(kind, optimizer):
    factory, reference_average = AVERAGERS[kind]
    make_opt = OPTIMIZERS[optimizer]
    final, averager, cleans = train(make_opt, factory, update_averaged)
    expected = reference_average(cleans)
    for got, want in zip(averager.module.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    plain_final, _, _ = train(make_opt)  # no averaging at all: the same trajectory, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(final, plain_final))

    # what plain update_parameters does: it averages the noise in
    _, noisy_averager, _ = train(make_opt, factory, lambda avg, model, opt: avg.update_parameters(model))
    off = max((a.detach() - b).abs().max().item() for a, b in zip(noisy_averager.module.parameters(), expected))
    assert off > 1e-3


def test_already_clean_weights_are_used_as_they_are():
    model, x, y = problem()
    opt = OPTIMIZERS["vsgd"](model)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    swa = AveragedModel(model)
    with opt.denoised():
        clean = [p.detach().clone() for p in model.parameters()]
        update_averaged(swa, model, opt)
        assert opt.noise_removed  # still inside the block: not restored behind its back
    assert all(torch.equal(a, b) for a, b in zip(swa.module.parameters(), clean))


def test_bad_averager_is_rejected():
    model, _, _ = problem()
    with pytest.raises(TypeError, match="neither update_parameters"):
        update_averaged(object(), model, OPTIMIZERS["vsgd"](model))


@pytest.mark.parametrize("version", ["ModelEmaV2", "ModelEmaV3"])
def test_timm_model_ema_averages_the_clean_weights(version):
    timm_utils = pytest.importorskip("timm.utils")
    make_ema = getattr(timm_utils, version)
    final, ema, cleans = train(OPTIMIZERS["vsgd"], lambda m: make_ema(m, decay=DECAY), update_averaged)
    # timm's EMA starts from the weights at construction (the initial, clean ones)
    model, _, _ = problem()
    expected = ema_average([[p.detach() for p in model.parameters()]] + cleans)
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(final, train(OPTIMIZERS["vsgd"])[0]))


def one_step(model, x, y, opt):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("what", ["None", "scheduler", "plain optimizer", "empty list", "list with None"])
def test_an_argument_that_cannot_remove_the_noise_is_refused_and_nothing_is_averaged(what):
    """Without an nvrm_ext optimizer nothing would remove the noise: the update would average the
    noisy weights. Refused before the averager or the weights are touched."""
    model, x, y = problem()
    opt = OPTIMIZERS["vsgd"](model)
    one_step(model, x, y, opt)
    swa = AveragedModel(model)
    swa.update_parameters(model)
    averaged = [p.detach().clone() for p in swa.module.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    argument = {"None": None,
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1),
                "plain optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                "empty list": [],
                "list with None": [opt, None]}[what]
    match = "carries no NVRM noise" if what in ("plain optimizer", "empty list") else "must be the nvrm_ext optimizer"
    with pytest.raises(TypeError, match=match):
        update_averaged(swa, model, argument)
    assert int(swa.n_averaged) == 1
    assert all(torch.equal(a, b) for a, b in zip(swa.module.parameters(), averaged))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert not opt.noise_removed


def test_a_plain_optimizer_beside_an_nvrm_one_is_accepted_its_weights_carry_no_noise():
    """Body trained by FusedVSGD, head by torch.optim.SGD: the body is averaged clean (by the
    specification), the head as it is."""
    model, x, y = problem()
    body = FusedVSGD(model[0].parameters(), lr=0.1, variability=0.05, num_iters=1000, seed=4)
    head = torch.optim.SGD(model[2].parameters(), lr=0.1)
    for opt in (body, head):
        opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    body.step(), head.step()
    clean = clean_reference(body)
    swa = AveragedModel(model)
    update_averaged(swa, model, [body, head])
    averaged = list(swa.module.parameters())
    for got, p in zip(averaged[:2], model[0].parameters()):
        torch.testing.assert_close(got.detach(), clean[p], rtol=0, atol=1e-6)
        assert not torch.equal(got.detach(), p.detach())  # the body's noise was removed
    for got, p in zip(averaged[2:], model[2].parameters()):
        assert torch.equal(got.detach(), p.detach())
