"""What a user sees around the package itself: `nvrm-demo` after a plain install (without the demo
extra's packages), and the message of a source checkout imported instead of the installed build.

Each runs a real interpreter in a subprocess, on the nvrm_ext this test imports (the checkout, or
the installed wheel when the tests run against it)."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import nvrm_ext
from nvrm_ext.backends import compiled

PACKAGE = Path(nvrm_ext.__file__).resolve().parent
CHECKOUT = Path(__file__).resolve().parent.parent
INSTALL_DEMO = 'pip install "nvrm_ext[demo]"'


def _environment(*first_on_path: Path) -> dict:
    """The environment of a subprocess that imports this nvrm_ext (after `first_on_path`)."""
    env = dict(os.environ)
    paths = [str(path) for path in first_on_path] + [str(PACKAGE.parent)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _python(code: str, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ nvrm-demo without the demo extra
def _console_script() -> str:
    """The `nvrm-demo` entry point, module:function: setup.py's in a checkout, else the
    installed package's."""
    setup_py = CHECKOUT / "setup.py"
    if setup_py.is_file():
        found = re.search(r'"nvrm-demo\s*=\s*([\w.]+:\w+)"', setup_py.read_text())
        assert found, "setup.py declares no nvrm-demo console script"
        return found.group(1)
    (entry_point,) = [entry_point for entry_point in metadata.distribution("nvrm_ext").entry_points
                      if (entry_point.group, entry_point.name) == ("console_scripts", "nvrm-demo")]
    return entry_point.value


def _block(*modules: str) -> str:
    """Code that makes `modules` unimportable, as where they are not installed."""
    return "import sys\n" + "".join(f"sys.modules[{module!r}] = None\n" for module in modules)


def _run_console_script(blocked: tuple, *args: str) -> subprocess.CompletedProcess:
    """What the console-script wrapper pip writes does: import the entry point and exit with it."""
    module, function = _console_script().split(":")
    code = _block(*blocked) + textwrap.dedent(f"""
        sys.argv[0] = "nvrm-demo"
        from {module} import {function}
        sys.exit({function}())
    """)
    return _python(code, *args, cwd=PACKAGE.parent, env=_environment())


@pytest.mark.parametrize("args", [["--help"], [], ["perturbation", "--seeds", "1"]])
def test_nvrm_demo_without_tqdm_says_what_to_install_in_one_line(args):
    done = _run_console_script(("tqdm",), *args)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"nvrm-demo: the demo needs tqdm, which is not installed; install it with: {INSTALL_DEMO}\n"


def test_nvrm_demo_names_every_missing_package():
    done = _run_console_script(("tqdm", "sklearn", "matplotlib"), "--help")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("nvrm-demo: the demo needs tqdm, scikit-learn, matplotlib, which are not installed; "
                           f"install them with: {INSTALL_DEMO}\n")


@pytest.mark.parametrize("module", ["nvrm_ext.demo", "nvrm_ext.demo.tune"])
def test_python_m_demo_without_tqdm_says_what_to_install_in_one_line(module):
    code = _block("tqdm") + f"import runpy\nsys.argv[0] = {module!r}\nrunpy.run_module({module!r}, run_name='__main__')"
    done = _python(code, "--help", cwd=PACKAGE.parent, env=_environment())
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"python -m {module}: the demo needs tqdm, which is not installed; "
                           f"install it with: {INSTALL_DEMO}\n")


def test_nvrm_demo_with_the_demo_extra_runs_the_demo():
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    done = _run_console_script((), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: nvrm-demo")


def test_the_check_looks_for_exactly_the_demo_extra():
    """The console script's list of the demo's packages is the `demo` extra's."""
    from nvrm_ext.demo._entry import DEMO_PACKAGES

    setup_py = CHECKOUT / "setup.py"
    if setup_py.is_file():
        found = re.search(r'"demo":\s*\[([^]]*)\]', setup_py.read_text())
        assert found, "setup.py declares no demo extra"
        extra = set(re.findall(r'"([^"]+)"', found.group(1)))
    else:
        requirements = metadata.distribution("nvrm_ext").requires or []
        extra = {re.split(r"[\s;<>=!~\[]", requirement)[0] for requirement in requirements
                 if re.search(r"""extra\s*==\s*["']demo["']""", requirement)}
    assert set(DEMO_PACKAGES.values()) == extra


# ------------------------------------------------------------------ a source checkout without _lib/
def _checkout_without_libraries(root: Path) -> Path:
    """A copy of this nvrm_ext as a source checkout that was never built (setup.py, csrc/, no _lib/)."""
    shutil.copytree(PACKAGE, root / "nvrm_ext", ignore=shutil.ignore_patterns("_lib", "__pycache__"))
    (root / "setup.py").write_text("")
    (root / "csrc").mkdir()
    return root


def _installed_distribution(site: Path) -> Path:
    """A site directory holding an installed nvrm_ext (its files listed in RECORD, as pip writes)."""
    (site / "nvrm_ext").mkdir(parents=True)
    (site / "nvrm_ext" / "__init__.py").write_text("")
    info = site / "nvrm_ext-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvrm_ext\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("nvrm_ext/__init__.py,,\nnvrm_ext-0.1.0.dist-info/METADATA,,\n")
    return site / "nvrm_ext"


def test_a_checkout_shadowing_the_installed_package_is_named_with_the_fix(tmp_path):
    """Run from a checkout's root after a non-editable install, `import nvrm_ext` is the source tree."""
    checkout = _checkout_without_libraries(tmp_path / "checkout").resolve()
    installed = _installed_distribution(tmp_path / "site").resolve()
    code = textwrap.dedent("""
        import warnings
        import torch
        import nvrm_ext
        print(nvrm_ext.__file__)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nvrm_ext.FusedVSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
        for warning in caught:
            print(warning.message)
    """)
    done = _python(code, cwd=checkout, env=_environment(tmp_path / "site"))
    assert done.returncode == 0, done.stderr
    imported, *messages = done.stdout.splitlines()
    assert imported == str(checkout / "nvrm_ext" / "__init__.py")
    expected = (f"the CPU library nvrm_ext/_lib/libnvrm_cpu.so is missing: the nvrm_ext imported is the "
                f"source checkout at {checkout / 'nvrm_ext'}, which has no compiled libraries, and it shadows "
                f"the installed nvrm_ext at {installed}; run from another directory, or build them in place: "
                f"cd {checkout} && {sys.executable} setup.py build_ext --inplace")
    assert messages == [f"nvrm_ext: no fused backend for torch.float32 parameters on cpu (cpu: {expected}); "
                        "using the much slower 'torch' backend"]


@pytest.fixture
def checkout_library_dir(tmp_path, monkeypatch):
    """compiled.LIB_DIR pointed at an unbuilt checkout's nvrm_ext/_lib/; the caches reset around."""
    checkout = _checkout_without_libraries(tmp_path / "checkout")
    monkeypatch.setattr(compiled, "LIB_DIR", checkout / "nvrm_ext" / "_lib")
    compiled._cpu_library.cache_clear()
    yield checkout
    compiled._cpu_library.cache_clear()


def test_a_checkout_with_nothing_installed_is_named_with_the_fix(checkout_library_dir, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(checkout_library_dir)])  # no installed nvrm_ext to find
    reason = compiled._cpu_library()[1]
    assert reason == (f"the CPU library nvrm_ext/_lib/libnvrm_cpu.so is missing: the nvrm_ext imported is the "
                      f"source checkout at {checkout_library_dir / 'nvrm_ext'}, which has no compiled libraries; "
                      f"run from another directory, or build them in place: "
                      f"cd {checkout_library_dir} && {sys.executable} setup.py build_ext --inplace")


def test_a_checkout_with_an_unusable_library_says_to_rebuild_it_in_place(checkout_library_dir):
    (checkout_library_dir / "nvrm_ext" / "_lib").mkdir()
    (checkout_library_dir / "nvrm_ext" / "_lib" / compiled.CPU_LIBRARY).write_bytes(b"not an ELF file")
    reason = compiled._cpu_library()[1]
    assert reason.startswith("the CPU library nvrm_ext/_lib/libnvrm_cpu.so cannot be used (")
    assert reason.endswith(f"): rebuild it in place: cd {checkout_library_dir} && "
                           f"{sys.executable} setup.py build_ext --inplace")
