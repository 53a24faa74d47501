"""The CPU library's threads (csrc/cpu/thread_pool.h, csrc/api.cpp nvrm_cpu_launch).

A launch uses at most torch.get_num_threads() threads, stays on the calling thread when the
work is small, and its idle workers sleep instead of spinning; results never depend on any of
this. Thread counts and CPU times are read in a fresh interpreter, where nothing else runs.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import nvrm_ext
from nvrm_ext import noise as spec
from nvrm_ext.backends import compiled
from nvrm_ext.backends import tables as T

CPU = compiled.compiled_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
                                reason="the CPU library is not built")

# ~330k elements in 23 blocks of the launch table: enough for 10 threads, odd sizes included.
SHAPES = [(512, 300), (131072,), (40001,), (5,), (3, 7)]


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = torch.randn(shape, generator=generator).requires_grad_(True)
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    return params


OPTIMIZERS = {
    "vsgd": lambda params, backend: nvrm_ext.FusedVSGD(params, lr=0.05, variability=0.05, num_iters=4,
                                                       momentum=0.9, nesterov=True, weight_decay=1e-3,
                                                       seed=7, backend=backend),
    "vadam": lambda params, backend: nvrm_ext.FusedVAdam(params, lr=0.01, variability=0.05, num_iters=4,
                                                         amsgrad=True, noise_type="Laplace", seed=7,
                                                         backend=backend),
}


def _train(name, backend, threads, steps=5):
    """Parameters and optimizer state after `steps` steps (crossing a num_iters boundary)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = _params()
        opt = OPTIMIZERS[name](params, backend)
        for _ in range(steps):
            opt.step()
    finally:
        torch.set_num_threads(previous)
    tensors = [p.detach() for p in params]
    for p in params:
        tensors += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return tensors


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_results_are_bit_identical_for_every_thread_count(name):
    single = _train(name, "cpu", 1)
    for threads in (2, 3, 10):
        for a, b in zip(single, _train(name, "cpu", threads)):
            assert torch.equal(a, b), f"{threads} threads change the result"
    # and the single-threaded result is the algorithm's (the per-tensor torch reference backend)
    for a, b in zip(single, _train(name, "torch", 1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def test_concurrent_launches_from_two_threads_give_the_sequential_results():
    """A launch made while another is in flight runs on its own thread; nothing is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = [_digest(_train("vsgd", "cpu", 2)), _digest(_train("vadam", "cpu", 2))]
        results = {}
        workers = [threading.Thread(target=lambda n=n: results.__setitem__(n, _digest(_train(n, "cpu", 2))))
                   for n in ("vsgd", "vadam")]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert [results.get("vsgd"), results.get("vadam")] == expected
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_launches_on_threads_of_its_own():
    """The parent's workers do not exist in a forked child (DataLoader workers, multiprocessing
    'fork'): a multi-threaded launch there must start its own instead of waiting forever."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = _params()
        opt = OPTIMIZERS["vsgd"](params, "cpu")
        opt.step()  # the parent's pool now has a worker
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: one more step, then report the result
            try:
                opt.step()
                os.write(write, _digest([p.detach() for p in params]).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            child = {}
            reader = threading.Thread(target=lambda: child.setdefault("digest", pipe.read()))
            reader.start()
            reader.join(timeout=60)
        if reader.is_alive():
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        assert not reader.is_alive(), "the forked child's launch hung"
        opt.step()  # the same step in the parent, from the same state
        assert child["digest"] == _digest([p.detach() for p in params])
    finally:
        torch.set_num_threads(previous)


_PROBE = """
import json, os, sys, time, torch, nvrm_ext
threads = int(sys.argv[1])
torch.set_num_threads(threads)
torch.ones(1 << 22).add_(1)  # torch's own intra-op threads start here, before anything is counted

def count():
    return len(os.listdir("/proc/self/task"))

def optimizer(shapes):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = nvrm_ext.FusedVSGD(params, lr=0.01, variability=0.01, num_iters=10**6, momentum=0.9,
                             seed=1, backend="cpu")
    opt.step()  # state and launch data
    return opt

def others_cpu(opt, steps):
    # CPU seconds of every thread but this one, during `steps` steps
    process, this = time.process_time(), time.thread_time()
    for _ in range(steps):
        opt.step()
    return (time.process_time() - process) - (time.thread_time() - this)

out = {}
small = optimizer([(16,)] * 148)  # the 148-tensor layout: 2,368 elements
out["threads_before"] = count()
out["small_others_cpu"] = others_cpu(small, 300)
out["threads_after_small"] = count()
big = optimizer([(1 << 20,)])
out["big_others_cpu"] = others_cpu(big, 5)
out["threads_after_big"] = count()
start = time.process_time()
time.sleep(0.3)
out["idle_cpu"] = time.process_time() - start
print(json.dumps(out))
"""


def _probe(threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(threads)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_small_launches_stay_on_the_calling_thread_and_large_ones_follow_torch_threads():
    probe = _probe(3)
    # 300 small steps: no thread created, no CPU time anywhere but in the calling thread (the
    # OpenMP team of the old library spent ~0.014 s in these steps, forking and spin-waiting)
    assert probe["threads_after_small"] == probe["threads_before"]
    assert probe["small_others_cpu"] < 0.004, probe
    # a 1M-element step: torch.get_num_threads() - 1 workers, and they do part of the work
    assert probe["threads_after_big"] == probe["threads_after_small"] + 2
    assert probe["big_others_cpu"] > 0.0, probe
    # idle workers sleep
    assert probe["idle_cpu"] < 0.03, probe


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_one_torch_thread_means_one_thread():
    probe = _probe(1)
    assert probe["threads_after_big"] == probe["threads_before"]
    assert probe["big_others_cpu"] < 0.004, probe


def test_the_launch_under_torch_compile_goes_through_the_custom_op_with_the_eager_bits():
    """Eager launches call the library directly; traced ones must still reach it, as the
    nvrm_ext::cpu_launch custom op, and write the same bits."""
    def noise_plan(param):
        floats = [0.0] * T.FLOAT_COLUMNS
        floats[T.F_NEW_SCALE] = 0.5
        code = spec.noise_type_code("Gaussian")
        flags = (code << T.FLAG_OLD_TYPE_SHIFT) | (code << T.FLAG_NEW_TYPE_SHIFT)
        return T.TensorPlan(param, None, (), 3, 0, 9, flags, tuple(floats), 0)

    def run(launch):
        param = torch.zeros(70001)
        ints, floats = (torch.from_numpy(a) for a in T.build_rows([noise_plan(param)]))
        blocks = torch.from_numpy(T.build_block_table([param.numel()], [0], CPU.block_size))
        launch(ints, floats, blocks)
        return param

    def launch(ints, floats, blocks):
        CPU.launch(T.OP_NOISE, torch.float32, ints, floats, blocks, 1234)

    torch._dynamo.reset()
    eager = run(launch)
    compiled_launch = torch.compile(launch, backend="aot_eager", fullgraph=True)
    assert torch.equal(run(compiled_launch), eager)
    # the specification's noise, within its float64-reference tolerance (docs/noise.md §8)
    torch.testing.assert_close(eager, spec.noise("Gaussian", 0.5, 1234, 3, 9, 70001), rtol=4e-6, atol=4e-6)
