"""nvrm_ext.optim.NoisyOptimizer: the one protocol through which the integrations use FusedVSGD,
FusedVAdam and NVRM(optimizer) alike, checked for each of them against the noise specification."""
from __future__ import annotations

import pytest
import torch

from nvrm_ext import NVRM, FusedAMP, FusedVAdam, FusedVSGD
from nvrm_ext.integrations._common import nvrm_optimizers, unwrap
from nvrm_ext.optim import NoisyOptimizer
from test_integrations_reference import clean_reference

OPTIMIZERS = {
    "vsgd": lambda params: FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.05, num_iters=3, seed=2),
    "vadam": lambda params: FusedVAdam(params, lr=0.01, variability=0.05, num_iters=3, seed=2),
    "nvrm-adamw": lambda params: NVRM(torch.optim.AdamW(params, lr=0.01), variability=0.05, num_iters=3, seed=2),
}


def problem(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = OPTIMIZERS[kind](model.parameters())
    x, y = torch.randn(8, 5), torch.randn(8, 2)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return model, opt, step


def noise_is_on(opt) -> bool:
    """By the specification: some parameter differs from its clean weights."""
    clean = clean_reference(opt)
    return any(not torch.equal(p.detach(), c) for p, c in clean.items())


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_every_noisy_optimizer_satisfies_the_protocol_and_keeps_its_contract(kind):
    model, opt, step = problem(kind)
    assert isinstance(opt, NoisyOptimizer)
    assert opt.removal_token == 0 and not opt.carries_noise and not opt.noise_removed
    tokens = set()
    for index in range(4):  # num_iters = 3: the third step leaves the weights clean
        step()
        assert opt.carries_noise == noise_is_on(opt) == (index != 2), index
    opt.remove_noise()
    tokens.add(opt.removal_token)
    assert opt.noise_removed and not opt.carries_noise and opt.removal_token != 0
    removed_state = opt.state_dict()
    opt.remove_noise()  # a no-op: the same removal
    assert opt.removal_token in tokens
    opt.restore_noise()
    assert opt.removal_token in tokens and opt.carries_noise  # the held copies' origin is unchanged
    with opt.denoised():
        assert opt.removal_token not in tokens
        tokens.add(opt.removal_token)
    opt.load_state_dict(removed_state)  # a state saved while removed brings its own noisy copies
    assert opt.noise_removed and opt.removal_token not in tokens
    opt.reset_noise()
    assert not opt.noise_removed and not opt.carries_noise and not noise_is_on(opt)


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, "FusedAMP"])
def test_optimizers_without_noise_of_their_own_do_not_satisfy_it(optimizer):
    params = torch.nn.Linear(3, 2).parameters()
    opt = (FusedAMP(params, lr=0.1, epsilon=0.1) if optimizer == "FusedAMP" else optimizer(params))
    assert not isinstance(opt, NoisyOptimizer) and unwrap(opt) is None


class Forwarding:
    """A wrapper that forwards every unknown attribute to what it wraps (as some frameworks do)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.__dict__["optimizer"], name)


def test_unwrap_finds_nvrm_behind_wrappers_and_never_takes_a_wrapper_for_it():
    lightning = pytest.importorskip("lightning.pytorch")
    _, opt, step = problem("nvrm-adamw")
    step()
    imitation = lightning.core.optimizer.LightningOptimizer(opt)  # its class subclasses NVRM's
    assert isinstance(imitation, NVRM)
    for wrapped in (opt, imitation, Forwarding(opt), Forwarding(imitation)):
        assert unwrap(wrapped) is opt
    assert nvrm_optimizers([opt, imitation, Forwarding(opt), torch.optim.SGD([torch.zeros(1)], lr=1)]) == [opt]


def test_nvrm_refuses_an_optimizer_that_carries_noise_inside_a_wrapper():
    params = list(torch.nn.Linear(3, 2).parameters())
    amp = FusedAMP(params, lr=0.1, epsilon=0.1, base_optimizer=lambda groups, lr, **kwargs: FusedVSGD(groups, lr=lr))
    with pytest.raises(TypeError, match="NVRM cannot wrap FusedAMP: the FusedVSGD inside it already puts noise"):
        NVRM(amp)


def test_isinstance_looks_at_the_class_only():
    """An optimizer of another package takes part without inheriting; isinstance evaluates no
    property (they may read device counters) and does not ask the instance's __getattr__."""
    class Elsewhere(torch.optim.SGD):
        noise_removed = removal_token = seed = False

        @property
        def carries_noise(self):
            raise AssertionError("isinstance evaluated a property")

        def remove_noise(self): ...
        restore_noise = reset_noise = denoised = clean_state_dict = remove_noise

    other = Elsewhere([torch.zeros(1, requires_grad=True)], lr=1)
    assert isinstance(other, NoisyOptimizer) and unwrap(Forwarding(other)) is other
    _, opt, _ = problem("nvrm-adamw")
    assert not isinstance(Forwarding(opt), NoisyOptimizer) and not isinstance(opt.optimizer, NoisyOptimizer)
    incomplete = type("Incomplete", (torch.optim.SGD,), {"remove_noise": Elsewhere.remove_noise})
    assert not isinstance(incomplete([torch.zeros(1, requires_grad=True)], lr=1), NoisyOptimizer)
