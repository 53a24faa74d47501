"""Glue for training frameworks: each submodule imports its framework, so `import nvrm_ext`
imports none of them. Import the one you use:

* ``nvrm_ext.integrations.lightning``: DenoisedEvaluation (a Lightning Callback), load_clean_weights;
* ``nvrm_ext.integrations.transformers``: DenoisedEvaluation (a TrainerCallback), AMPTrainer;
* ``nvrm_ext.integrations.averaging``: update_averaged (EMA / SWA of the clean weights);
* ``nvrm_ext.integrations.zero``: denoised(ZeroRedundancyOptimizer) on every rank.
"""
