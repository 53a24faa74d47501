"""nvrm_ext.integrations.averaging: SWA / EMA of the clean weights (torch.optim.swa_utils, timm)."""
from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from nvrm_ext import FusedVAdam, FusedVSGD
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
