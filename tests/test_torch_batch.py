"""The 'torch' backend's batch programs (backends/torch_batch.py): their workspaces and kept noise.

tests/test_torch_step.py compares the batch programs' weights with the eager path's (cases,
edits, checkpoints, scaled gradients, signed zeros); here: that a batch's kept noise is the
specification's noise, that a workspace follows its members' layout, and that workspaces do
not outlive their batches.
"""
import gc
import math

import numpy as np
import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.backends import torch_batch, torch_noise

SEED = 0x5EED0F5E7


@pytest.fixture(autouse=True)
def batch_programs(monkeypatch):
    """Batch programs for any group of small tensors, with the kept noise, and no workspaces left
    from other tests."""
    monkeypatch.delenv("NVRM_TORCH_COMPILE", raising=False)
    monkeypatch.delenv("NVRM_TORCH_NOISE_CACHE", raising=False)
    monkeypatch.setattr(torch_noise, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_batch, "_workspaces", {})


def _workspace_of(param):
    entry = torch_batch._workspaces.get(id(param))
    assert entry is not None and entry[0]() is param
    return entry[1]


def test_a_batchs_kept_noise_is_the_specifications():
    """After one step with zero gradients the weights are w + noise, and the batch's kept noise
    is that noise, member after member (nvrm_ext.noise, to the ulp), keyed by what made it."""
    shapes = [(16,), (6, 10), (300, 7)]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, variability=0.1, num_iters=3, seed=SEED, backend="torch")
    opt.step()
    workspace = _workspace_of(params[0])
    expected = torch.cat([spec.noise("Gaussian", 0.1, SEED, key, 1, p.numel()) for key, p in enumerate(params)])
    ulp = torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs()
    assert workspace.kept.dtype == torch.float32 and ((workspace.kept - expected).abs() <= ulp).all()
    assert torch.equal(torch.cat([p.detach().view(-1) for p in params]), workspace.kept)
    seed, columns = workspace.kept_key
    assert seed == SEED
    # per member: key, offset, numel, step, noise type code, the scale's float32 bits
    members = np.frombuffer(columns, dtype=np.int64).reshape(len(params), -1)
    scale_bits = int(np.float32(0.1).view(np.int32))
    assert members.tolist() == [[key, 0, p.numel(), 1, 0, scale_bits] for key, p in enumerate(params)]


def test_a_workspace_follows_its_members_layout(monkeypatch):
    """A member replaced by a tensor of another shape (with its state dropped, as the error for
    it asks) gives a new workspace whose views have the new shapes; the weights are the eager path's."""
    def run():
        g = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(16,), (6, 10), (8,)]]
        opt = nvrm_ext.FusedVSGD(params, lr=0.1, momentum=0.9, variability=0.05, num_iters=2, seed=SEED,
                                 backend="torch")
        views = []
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if step == 2:  # the end of a period: the weights are clean, a new layout may come
                opt.reset_noise()
                params[1].data = torch.randn(4, 12, generator=g)
                params[1].grad = torch.randn(4, 12, generator=g)
                del opt.state[params[1]]
            opt.step()
            if torch_batch._workspaces:
                views.append([tuple(v.shape) for v in _workspace_of(params[0]).views[0]])
        return [p.detach().clone() for p in params], views
    ours, views = run()
    assert views[0] == [(16,), (6, 10), (8,)] and views[-1] == [(16,), (4, 12), (8,)]
    monkeypatch.setenv("NVRM_TORCH_COMPILE", "0")
    eager, _ = run()
    for a, b in zip(ours, eager):
        ulp = torch.nextafter(b.abs(), torch.tensor(math.inf)) - b.abs()
        assert ((a - b).abs() <= ulp).all()


def test_workspaces_go_with_their_batches():
    """A workspace goes with its first parameter (garbage collected), when a batch that begins
    with another member takes that parameter, and after some batch runs unused."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(3)]
    opt = nvrm_ext.FusedVSGD(params, lr=0.1, variability=0.05, seed=SEED, backend="torch")

    def step(without=()):
        for index, p in enumerate(params):
            p.grad = None if index in without else torch.randn(8)
        opt.step()

    step()
    assert set(torch_batch._workspaces) == {id(params[0])}
    step(without=(0,))  # the batch begins with params[1]
    assert set(torch_batch._workspaces) == {id(params[0]), id(params[1])}
    step()  # params[1] is a member again: its own batch is gone
    assert set(torch_batch._workspaces) == {id(params[0])}
    step(without=(0,))
    for _ in range(torch_batch._IDLE_RUNS + 1):  # params[0] frozen: its workspace is idle
        step(without=(0,))
    assert set(torch_batch._workspaces) == {id(params[1])}
    ident = id(params[1])
    del opt, params
    gc.collect()
    assert ident not in torch_batch._workspaces
