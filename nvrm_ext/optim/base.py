"""The noise engine's former module, kept so that imports from it keep working: the engine is
engine.py, its parts checkpoint.py, denoise.py, records.py, seed.py, keys.py and launch/
(docs/architecture.md)."""
from ..backends.select import NVRM_BACKENDS as BACKENDS, warn_once as _warn_once  # noqa: F401
from .checkpoint import _host_counters  # noqa: F401
from .denoise import _REMOVALS  # noqa: F401
from .engine import NeuralVariableOptimizer, NoiseEngine  # noqa: F401
from .keys import (NOISY_COMPENSATION_KEY, NOISY_KEYS, NOISY_PARAM_KEY, NOISY_STEP_KEY, SEED_KEY,  # noqa: F401
                   STATE_DICT_KEY)
from .launch.plan import UpdateRule, _BucketPlan  # noqa: F401
from .launch.steady import _StepLayout  # noqa: F401
from .params import (_capturing, _compensation, _fp32, _global_offset, _is_dense, _is_dtensor, _local,  # noqa: F401
                     _number, _pinned_like, _refuse_capture)
from .records import WeightsChangedError, _bits, _record_key, _samples_differ  # noqa: F401
from .seed import broadcast_seed, draw_seed, is_seed as _is_seed  # noqa: F401
