"""Shared by the integration tests: the clean weights by the noise specification (nvrm_ext/noise.py,
independent of the kernels and of the integrations), and the light-import check."""
from __future__ import annotations

import subprocess
import sys

import torch

from nvrm_ext import NVRM
from nvrm_ext import noise as spec


def clean_reference(optimizer) -> dict:
    """{parameter: its clean weights} for every parameter of an nvrm_ext optimizer whose noise is
    on it: the weights minus the noise regenerated from the specification (docs/noise.md). The
    fused kernels' transforms agree with the specification to a few ulp, so compare with a
    tolerance of about 1e-6 of the noise scale."""
    clean = {}
    key = 0
    counters = noise_counters(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = counters.get(key, {})
            step = int(state.get("noise_step", 0))
            n = spec.noise(spec.NOISE_TYPES[int(state["noise_type"])], float(state["noise_scale"]),
                           optimizer.seed, key, step, p.numel()) if step else torch.zeros(p.numel())
            clean[p] = p.detach() - spec.from_memory_order(n.to(p.dtype), p)
            key += 1
    return clean


def noise_counters(optimizer) -> dict:
    """{flat parameter index: its noise counters (noise_step, noise_type, noise_scale)}. The
    fused optimizers keep them in their per-parameter state; NVRM(optimizer)'s state is the inner
    optimizer's, and its state_dict carries the counters prefixed ``nvrm_``."""
    if isinstance(optimizer, NVRM):
        prefix = "nvrm_"
        return {index: {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                for index, state in optimizer.state_dict()["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {index: optimizer.state.get(p, {}) for index, p in enumerate(params)}


def assert_close_to_clean(tensors, optimizer, expected_clean: dict, params) -> None:
    """Each of `tensors` equals the reference clean weights of the matching parameter."""
    scale = max(float(g["variability"]) for g in optimizer.param_groups)
    for t, p in zip(tensors, params):
        torch.testing.assert_close(t, expected_clean[p], rtol=0, atol=1e-6 * max(scale, 1e-3) + 1e-7)


def test_import_nvrm_ext_imports_no_integration_nor_framework():
    code = ("import sys, nvrm_ext; "
            "bad = sorted(m for m in sys.modules if m.startswith(('nvrm_ext.integrations', 'lightning', "
            "'pytorch_lightning', 'transformers', 'accelerate', 'timm'))); print(bad); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_clean_reference_matches_the_original_algorithm_with_the_same_noise():
    """The helper itself: the original NVRM (noise replayed from the spec, clean weights held
    separately) and the fused optimizer minus the reference noise agree."""
    from nvrm_ext import FusedVSGD
    from nvrm_ext.original import OriginalVSGD

    torch.manual_seed(0)
    fused_model = torch.nn.Linear(5, 3)
    original_model = torch.nn.Linear(5, 3)
    original_model.load_state_dict(fused_model.state_dict())
    fused = FusedVSGD(fused_model.parameters(), lr=0.1, variability=0.05, num_iters=100, momentum=0.9, seed=7)

    def replay(index, p, step):
        return spec.from_memory_order(spec.noise("Gaussian", 0.05, 7, index, step, p.numel()), p)

    original = OriginalVSGD(original_model.parameters(), lr=0.1, variability=0.05, num_iters=100, momentum=0.9,
                            noise_fn=replay)
    x = torch.randn(8, 5)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (original_model, original)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    clean = clean_reference(fused)
    for p, q in zip(fused_model.parameters(), original_model.parameters()):
        noise1 = original.state[q]["noise1"]
        torch.testing.assert_close(clean[p], q.detach() - noise1, rtol=0, atol=1e-6)
