"""The names the noise engine keeps in param groups, per-parameter state and state_dicts: the
checkpoint format, in one place for every module that reads or writes it."""

SEED_KEY = "nvrm_seed"  # param_groups entry: where every checkpoint path keeps groups
STATE_DICT_KEY = "nvrm"  # top-level state_dict entry: {"seed", "format", "optimizer"}
NOISY_PARAM_KEY = "noisy_param"  # per-parameter state, only in a state_dict taken while the noise is removed
NOISY_COMPENSATION_KEY = "noisy_compensation"
NOISY_STEP_KEY = "noisy_noise_step"  # the noise step the noisy copies carry (noise_step itself says 0)
NOISY_KEYS = (NOISY_PARAM_KEY, NOISY_COMPENSATION_KEY, NOISY_STEP_KEY)
