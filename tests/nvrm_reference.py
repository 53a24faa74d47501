"""The expected weights of an NVRM step, built from plain torch.optim and the noise specification.

NVRM's rule (the original code's order): the base optimizer steps on the weights as they are,
perturbed, with the gradient taken there; then every parameter that had a gradient swaps its
noise, ``p += n(new) - n(old)``. Parameter k (its position in the flat list of all groups'
parameters) counts t, the steps in which it had a gradient; the new noise is that of step t, or
none when t % num_iters == 0 or the group's variability is 0; the old one is what it got last
time. ``denoise=False`` (PSGD) never removes the old noise.

`LockstepReference` runs that rule next to an optimizer under test: before each step it copies
the weights the optimizer under test holds (perturbed) and their gradients into its own
parameters, steps the same torch optimizer class on them and applies the swap from
nvrm_ext/noise.py. So only one step's rounding can separate the two, never an accumulated drift,
and nothing of the code under test is used to build the expectation.
"""
from __future__ import annotations

import torch

from nvrm_ext import noise as spec

NOISE_KEYS = ("variability", "num_iters", "noise_type")

# The fused kernels evaluate the noise with float32 polynomials that agree with noise.py to a few
# ulp of the noise, and may round `p - n(old) + n(new)` in another order than `p + (n(new) -
# n(old))`: a couple of ulp of the weights. A missing or wrong noise is about `variability`.
RTOL = 4e-7
ATOL = 2e-7


def spec_noise(seed: int, key: int, noise: tuple, like: torch.Tensor) -> torch.Tensor:
    """The noise `noise` = (noise_type, scale, step) of parameter `key`, laid out like `like`
    (its memory order, docs/noise.md); zeros for step 0 (no noise)."""
    noise_type, scale, step = noise
    if step == 0 or like.numel() == 0:
        return torch.zeros_like(like)
    flat = spec.noise(noise_type, scale, seed, key, step, like.numel())
    return spec.from_memory_order(flat, like).to(like.dtype)


class NoiseBook:
    """Per parameter key: the steps in which it had a gradient and the noise its weights carry."""

    def __init__(self, seed: int, denoise: bool = True):
        self.seed = seed
        self.denoise = denoise
        self.steps: dict[int, int] = {}
        self.on_weights: dict[int, tuple] = {}

    def noise_on(self, key: int, like: torch.Tensor) -> torch.Tensor:
        return spec_noise(self.seed, key, self.on_weights.get(key, ("Gaussian", 0.0, 0)), like)

    def swap(self, key: int, p: torch.Tensor, variability: float, num_iters: int, noise_type: str) -> None:
        """p += n(new) - n(old), in place, after a step in which parameter `key` had a gradient."""
        t = self.steps[key] = self.steps.get(key, 0) + 1
        step = 0 if variability == 0 or t % num_iters == 0 else t
        new = (noise_type, float(variability), step)
        delta = spec_noise(self.seed, key, new, p)
        if self.denoise:
            delta = delta - self.noise_on(key, p)
        p.add_(delta)
        self.on_weights[key] = new


def same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (a transposed parameter stays transposed: the noise is laid
    out in memory order)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t)


class LockstepReference:
    """The expectation for an optimizer under test, one step at a time (see the module docstring).

    `groups` are the groups as the test wrote them: "params" (the parameters under test) and any
    options; the noise options (NOISE_KEYS) fall back to `noise_defaults`, the others go to
    `make_inner(groups)`, which builds the plain torch optimizer over this reference's copies.
    """

    def __init__(self, make_inner, groups: list, noise_defaults: dict, seed: int, denoise: bool = True):
        self.params, self.copies, self.settings, self.group_of = [], [], [], []
        self.group_count = 0
        self.noise_defaults = noise_defaults
        self.inner = make_inner([self._copy_group(group) for group in groups])
        self.book = NoiseBook(seed, denoise)

    def _copy_group(self, group: dict) -> dict:
        """The inner group over copies; the group's parameters and noise settings recorded."""
        options = {k: v for k, v in group.items() if k != "params" and k not in NOISE_KEYS}
        noise = {k: group.get(k, self.noise_defaults[k]) for k in NOISE_KEYS}
        copies = [torch.nn.Parameter(same_layout_copy(p.detach())) for p in group["params"]]
        self.params += list(group["params"])
        self.copies += copies
        self.settings += [(float(noise["variability"]), int(noise["num_iters"]), noise["noise_type"])] * len(copies)
        self.group_of += [self.group_count] * len(copies)
        self.group_count += 1
        return {"params": copies, **options}

    def edit_group_noise(self, group_index: int, **noise) -> None:
        """As editing a param group's noise values between steps: the noise on the weights stays
        what it was (it is removed at the scale it was added with), the next one follows the edit."""
        for index, group in enumerate(self.group_of):
            if group == group_index:
                old = dict(zip(NOISE_KEYS, self.settings[index]))
                old.update(noise)
                self.settings[index] = (float(old["variability"]), int(old["num_iters"]), old["noise_type"])

    def add_param_group(self, group: dict) -> None:
        """As the optimizer under test's add_param_group: appended, so its keys follow the others."""
        self.inner.add_param_group(self._copy_group(group))

    @torch.no_grad()
    def step(self) -> list:
        """Copy the weights and gradients of the parameters under test, step, swap the noise;
        returns the expected weights (clones)."""
        for p, c in zip(self.params, self.copies):
            c.copy_(p)
            c.grad = None if p.grad is None else same_layout_copy(p.grad)
        self.inner.step()
        for key, (c, settings) in enumerate(zip(self.copies, self.settings)):
            if c.grad is not None:
                self.book.swap(key, c, *settings)
        return [c.detach().clone() for c in self.copies]

    def clean(self) -> list:
        """The expected clean weights now: the reference's weights minus the noise on them."""
        return [c.detach() - self.book.noise_on(key, c) for key, c in enumerate(self.copies)]

    def inner_state(self, index: int) -> dict:
        return self.inner.state.get(self.copies[index], {})


def assert_weights_equal(actual, expected, *, what: str = "", rtol: float = RTOL, atol: float = ATOL) -> None:
    """Each parameter's weights equal the expectation, up to the rounding of one step."""
    actual = list(actual)
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach(), e, rtol=rtol, atol=atol,
                                   msg=lambda m, index=index: f"{what} parameter {index}: {m}")
