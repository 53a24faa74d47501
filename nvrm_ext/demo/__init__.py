"""Small-scale reproduction of the NVRM paper's claims: `python -m nvrm_ext.demo` / `nvrm-demo`.

Runs on scikit-learn's bundled digits (no download) on a CPU in minutes; see __main__ for the
subcommands, experiments for what each one measures, tune for how the defaults were chosen.
"""
