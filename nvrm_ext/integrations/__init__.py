"""Glue for training frameworks: each submodule imports its framework, so `import nvrm_ext`
imports none of them. Import the one you use:

* ``nvrm_ext.integrations.lightning``: DenoisedEvaluation (a Lightning Callback), load_clean_weights,
  optimizer_steps_per_epoch (for num_iters);
* ``nvrm_ext.integrations.transformers``: DenoisedEvaluation (a TrainerCallback; it sets num_iters),
  AMPTrainer, optimizer_steps_per_epoch;
* ``nvrm_ext.integrations.averaging``: update_averaged (EMA / SWA of the clean weights);
* ``nvrm_ext.integrations.zero``: denoised(ZeroRedundancyOptimizer) on every rank.

They work with any optimizer that satisfies nvrm_ext.optim.NoisyOptimizer (FusedVSGD, FusedVAdam,
NVRM(optimizer)) and use only that protocol's members, found through the usual wrappers
(LightningOptimizer, accelerate's AcceleratedOptimizer, FusedAMP).
"""
