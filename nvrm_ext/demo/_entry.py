"""The `nvrm-demo` console script, which every install of nvrm_ext gets: it checks for the
packages of the `demo` extra before importing the demo, so that a plain install says in one line
what to install instead of ending in a ModuleNotFoundError traceback."""
from __future__ import annotations

import importlib.util

#: The demo extra (setup.py extras_require["demo"]): import name -> distribution name.
DEMO_PACKAGES = {"tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "scipy": "scipy"}
INSTALL_COMMAND = 'pip install "nvrm_ext[demo]"'


def missing_demo_packages() -> list[str]:
    """The demo extra's distributions that cannot be found (find_spec: nothing is imported)."""
    return [package for module, package in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_demo_packages(command: str) -> None:
    """Exit (status 1) with one line naming the missing packages and the install command."""
    missing = missing_demo_packages()
    if missing:
        which, it = ("which is", "it") if len(missing) == 1 else ("which are", "them")
        raise SystemExit(f"{command}: the demo needs {', '.join(missing)}, {which} not installed; "
                         f"install {it} with: {INSTALL_COMMAND}")


def main() -> int:
    require_demo_packages("nvrm-demo")
    from .__main__ import main as demo_main

    return demo_main()
