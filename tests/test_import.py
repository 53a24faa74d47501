"""`import nvrm_ext` stays light: it must not pull in the compiler stack or optional frameworks.

torch._dynamo (with triton and sympy behind it) added 1.5-2 s to `import nvrm_ext`; it is needed
only once something is compiled. Checked in a fresh interpreter, by what is in sys.modules
afterwards, not by timing (timings on a shared CI machine are not a test).
"""
import json
import subprocess
import sys

# torch._dynamo, triton: the compiler stack; torch.distributed.tensor: DTensor support, imported
# on demand; lightning / transformers / accelerate: optional integrations.
HEAVY = ("torch._dynamo", "triton", "torch.distributed.tensor", "lightning", "pytorch_lightning",
         "transformers", "accelerate")


def _modules_after(code: str) -> set:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_nvrm_ext_does_not_import_the_compiler_stack_or_integrations():
    modules = _modules_after("import nvrm_ext")
    assert "nvrm_ext" in modules and "torch" in modules
    assert sorted(m for m in HEAVY if m in modules) == []


def test_the_lazy_compiler_disable_still_keeps_torch_compile_out():
    """nvrm_ext._compiler.disable applies torch.compiler.disable on first use: a compiled caller
    breaks its graph at the call and does not trace into the function, as with the decorator."""
    import torch

    from nvrm_ext import _compiler

    traced = []

    @_compiler.disable
    def inner(x):
        traced.append(torch.compiler.is_compiling())
        return x * 2

    def outer(x):
        return inner(x + 1) - 1

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(outer)(torch.ones(3))
    assert explanation.graph_break_count == 1, explanation.break_reasons
    assert traced == [False]  # run eagerly, never traced
    assert torch.equal(torch.compile(outer, backend="eager")(torch.ones(3)), torch.full((3,), 3.0))
