"""What the optimizer knows about the weights beyond its state dicts.

A model file and an optimizer state are saved and loaded separately, and the optimizer cannot
tell which weights a model file holds: the noisy training weights (resume as saved), their clean
form (`clean_state_dict()`, a model saved inside `denoised()`), or weights of another origin (a
model file of another run, a state loaded into parameters in another order). So `state_dict()`
stores, per parameter with noise on it, the parameter's values at a few positions
(tables.sample_view) in both forms: noisy, and clean as denoised() gives them (the same launch,
16-bit compensation included). The first noise operation after a load compares the parameters
with them (check_loaded), in whichever order the model and the optimizer were loaded.

The noise a parameter carries lives in its state dict, which users clear to reset momentum
(`optimizer.state.clear()`, `opt.state[p] = {}`). The launch plans and the last load keep their
own copy of the counters, and refill_cleared / check_loaded give a cleared state that noise back
where the weights are still what the optimizer left.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

from .. import noise as spec
from ..backends import tables as T
from ..backends.torch_ref import TORCH
from .params import _is_dtensor, _local, _number
from .records import WeightsChangedError, _samples_differ

_LEFT = operator.itemgetter(1)  # an entry's noisy sample (the parameter's device and dtype)
SAMPLES_KEY = "weight_samples"  # per-parameter state_dict entry: [2, count] tensor, rows (noisy, clean)


def reconcile(opt, *, resolve: bool = True) -> None:
    """Before a noise operation: settle what a load left to check and refill cleared states.
    `resolve=False` (state_dict()) raises nothing and leaves undecided loads pending."""
    adopt_foreign_samples(opt)
    if opt._held is not None:
        refill_held(opt)
    if opt._loaded:
        check_loaded(opt, resolve=resolve)
    refill_cleared(opt)


# ---------------------------------------------------------------------- state_dict samples
@torch.no_grad()
def state_dict_samples(opt, noisy) -> dict:
    """index -> [2, count] tensor (the noisy sample, the clean sample) for the (key, param,
    state, (noise step, type code, scale)) in `noisy`. The noisy sample is what the optimizer's
    last operation left (its weight record; the weights now where it has none), the clean one
    those values with the noise removed by the launch denoised() runs, one element per row:
    bit for bit what clean_state_dict() gives at those positions. DTensor shards are left out
    (a resharded load could not compare them): they are trusted, as state without samples."""
    opt._spill_records()
    sampled = []
    for key, p, state, (step, code, scale) in noisy:
        t = _local(p)
        if _is_dtensor(p) or t.numel() == 0:
            continue
        count = min(T.SAMPLE_SIZE, t.numel())
        record = opt._records.get(id(p))
        if record is not None and record[0][0] == id(state) and record[3] == count:
            _, taken, first, _ = record
            left = taken[first:first + count]
        else:
            left = T.sample_view(t)
        compensation = state.get("compensation")
        compensation = (None if compensation is None or t.dtype not in (torch.float16, torch.bfloat16)
                        else T.sample_view(_local(compensation)))
        positions = np.arange(count, dtype=np.int64) * (t.numel() // count)
        sampled.append((key, left, compensation, positions, step, code, scale))
    out = {}
    for bucket, entries in T.by_bucket(sampled, _LEFT).items():
        noisy_values = torch.cat([left for _, left, _, _, _, _, _ in entries])  # a copy
        values = noisy_values.clone()
        compensated = bucket[1] in (torch.float16, torch.bfloat16)
        compensation = torch.cat([torch.zeros_like(left) if c is None else c.to(left.dtype)
                                  for _, left, c, _, _, _, _ in entries]) if compensated else None
        _remove_noise_elementwise(opt, bucket, values, compensation, entries)
        start = 0
        for key, left, _, _, _, _, _ in entries:
            count = left.numel()
            out[key] = torch.stack([noisy_values[start:start + count], values[start:start + count]])
            start += count
    return out


def _remove_noise_elementwise(opt, bucket, values, compensation, entries) -> None:
    """One OP_NOISE launch over `values` with one row per element: each element is its own
    tensor of one element at the global index it has in its parameter, so the kernel removes
    exactly the noise it removes there in a whole-tensor launch."""
    n = values.numel()
    rows = np.arange(n, dtype=np.int64)
    ints = np.zeros((n, T.INT_COLUMNS), dtype=np.int64)
    floats = np.zeros((n, T.FLOAT_COLUMNS), dtype=np.float32)

    counts = [len(e[3]) for e in entries]

    def per_row(column):  # an entry's value in every one of its rows
        return np.repeat(np.asarray([e[column] for e in entries], dtype=np.float64), counts)

    ints[:, T.I_PARAM] = values.data_ptr() + rows * values.element_size()
    ints[:, T.I_NUMEL] = 1
    ints[:, T.I_KEY] = per_row(0).astype(np.int64)
    ints[:, T.I_OLD_STEP] = per_row(4).astype(np.int64)
    codes = per_row(5).astype(np.int64)
    ints[:, T.I_FLAGS] = (codes << T.FLAG_OLD_TYPE_SHIFT) | (codes << T.FLAG_NEW_TYPE_SHIFT)
    ints[:, T.I_OFFSET] = np.concatenate([e[3] for e in entries])  # sample positions (unsharded: offset 0)
    if compensation is not None:
        ints[:, T.I_COMP] = compensation.data_ptr() + rows * compensation.element_size()
    scales = per_row(6).astype(np.float32)  # rounded to float32 once, as _noise_launch does
    floats[:, T.F_OLD_SCALE] = scales
    floats[:, T.F_NEW_SCALE] = scales
    ints[:, T.I_FLAGS] |= T.alignment_flags(ints)
    backend = opt._resolve_backend(*bucket)
    if backend is TORCH:  # its per-row loop would cost ~60 us per element: the same math at once
        _torch_remove_noise(opt._seed, values, compensation, ints, floats)
    else:
        opt._launch(backend, T.OP_NOISE, bucket, None, ints, floats)


def _torch_remove_noise(seed: int, values, compensation, ints, floats) -> None:
    """What TorchBackend.run does with these one-element OP_NOISE rows, over all of them at
    once: the specification's noise of each row (one Philox pass per noise type), scaled by
    its float32 scale, subtracted by TorchBackend._run_one's elementwise arithmetic."""
    codes = (ints[:, T.I_FLAGS] >> T.FLAG_OLD_TYPE_SHIFT) & T.NOISE_TYPE_MASK
    z = torch.empty(len(ints), dtype=torch.float32, device=values.device)
    for code in np.unique(codes).tolist():
        rows = np.flatnonzero(codes == code)
        segments = [(key, step, offset, 1) for key, step, offset in
                    ints[rows][:, [T.I_KEY, T.I_OLD_STEP, T.I_OFFSET]].tolist()]
        flat = spec.standard_noise_segments(spec.NOISE_TYPES[code], seed, segments, device=values.device)
        z[torch.from_numpy(rows).to(values.device)] = torch.cat(flat)
    noise = z * torch.from_numpy(floats[:, T.F_OLD_SCALE]).to(values.device)  # float32 * float32, one rounding
    if values.dtype == torch.float64:  # the float32 noise widened exactly (docs/noise.md §7)
        noise = noise.to(torch.float64)
    TORCH._run_one(T.OP_NOISE, values, None, (), compensation, 0, None, -noise, None)  # delta = -n_old


def check_samples_fit(samples: dict, param_of: dict, name: str) -> None:
    """Refuse, before anything is loaded, weight samples that cannot belong to the parameter
    their index maps to."""
    for index, value in samples.items():
        p = param_of.get(index)
        if p is None:
            continue
        count = min(T.SAMPLE_SIZE, p.numel())
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                and tuple(value.shape) == (2, count)):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}.load_state_dict: state of parameter {index} has '{SAMPLES_KEY}' {shape}, "
                             f"expected a floating-point tensor of shape (2, {count}) for its parameter of "
                             f"shape {tuple(p.shape)}; nothing was loaded")


# ---------------------------------------------------------------------- after a load
def adopt_foreign_samples(opt) -> None:
    """States that a loader other than ours put in place with their samples (ZeroRedundancyOptimizer's
    load sets the per-parameter state directly): take the samples out and check them like ours."""
    if not any(SAMPLES_KEY in state for state in opt.state.values()):
        return
    param_of = dict(enumerate(opt._flat_params()))
    samples, held = {}, {id(p) for p, _, _ in opt._held or ()}
    for index, p in param_of.items():
        state = opt.state.get(p)
        if state and SAMPLES_KEY in state:
            samples[index] = state[SAMPLES_KEY]
    check_samples_fit(samples, param_of, type(opt).__name__)
    for index in samples:
        del opt.state[param_of[index]][SAMPLES_KEY]
    adopted = loaded_noise(opt, {i: param_of[i] for i in samples}, samples,
                           {i for i in samples if id(param_of[i]) in held})
    known = {id(entry.state) for entry in opt._loaded}
    opt._loaded = opt._loaded + [entry for entry in adopted if id(entry.state) not in known]


@dataclass(eq=False)  # compared by identity (it holds tensors)
class Loaded:
    """What a load said is on one parameter, kept until a step's launch data knows it."""

    index: int
    param: torch.Tensor
    state: dict  # the loaded state dict (an identity: a cleared or replaced state is another)
    noise: tuple  # (noise step, type code, scale)
    compensation: torch.Tensor | None
    samples: torch.Tensor | None  # rows (noisy, clean) as saved; after the check, (the weights then,)
    checked: bool = False


def loaded_noise(opt, param_of: dict, samples: dict, held: set) -> list:
    """What a load says is on each parameter, for the loaded states with noise (the held,
    removed-state ones aside). check_loaded settles them."""
    entries = []
    for index, p in param_of.items():
        state = opt.state.get(p)
        if not state or index in held:
            continue
        step = int(_number(state.get("noise_step", 0)))
        if not step:
            continue
        noise = (step, int(_number(state.get("noise_type", 0))), float(_number(state.get("noise_scale", 0.0))))
        sample = samples.get(index)
        if sample is not None:
            sample = sample.detach().to(device=_local(p).device, dtype=p.dtype)
        entries.append(Loaded(index, p, state, noise, state.get("compensation"), sample))
    return entries


@torch.no_grad()
def check_loaded(opt, *, resolve: bool = True) -> None:
    """Compare the parameters with the samples their loaded states were saved with.

    A loaded state still in place: weights equal to the noisy sample resume as saved; equal to
    the clean sample, they are clean weights (a deployment save, a model saved inside
    denoised()): their noise step becomes 0 and their compensation 0, as reset_noise() does for
    them; neither: WeightsChangedError, nothing changed. A state without samples is trusted.
    A loaded state cleared since gets its noise back where the weights are still the noisy
    ones (without samples: trusted). `resolve=False` (state_dict()): no error, and what is not
    decided stays pending (the model file may not be loaded yet)."""
    to_check, cleared, kept = [], [], []
    for entry in opt._loaded:
        now = opt.state.get(entry.param)
        if now is entry.state:
            (to_check if resolve and not entry.checked else kept).append(entry)
        elif not now:
            cleared.append(entry)
    compared = [e for e in to_check + cleared if e.samples is not None]
    tensors = [_local(e.param) for e in compared]
    noisy_differs = _samples_differ(tensors, [e.samples[0] for e in compared]) if compared else []
    clean_differs = _samples_differ(tensors, [e.samples[-1] for e in compared]) if compared else []
    verdict = {id(e): ("noisy" if not nd else "clean" if not cd and not e.checked else "neither")
               for e, nd, cd in zip(compared, noisy_differs, clean_differs)}
    for entry in to_check:
        if entry.samples is not None and verdict[id(entry)] == "neither":
            _raise_unknown_weights(opt, entry)
    for entry in to_check:  # every check passed: change things now
        if entry.samples is not None and verdict[id(entry)] == "clean":
            _declare_clean(entry.state)
            continue
        # noisy, or trusted: remember the weights as they are, for a clear before the next step
        entry.samples = T.sample_view(_local(entry.param)).clone().unsqueeze(0)
        entry.checked = True
        kept.append(entry)
    for entry in cleared:
        if entry.samples is None or verdict[id(entry)] == "noisy":
            refill(opt, entry.param, entry.noise, entry.compensation)
        elif not resolve and not entry.checked:
            kept.append(entry)  # the model may not be loaded yet
    opt._loaded = kept


def forget_stepped(opt) -> None:
    """After a step: the launch data knows the noise on the parameters it stepped."""
    planned = {id(p) for plan in opt._plans.values() for p in plan.params}
    opt._loaded = [entry for entry in opt._loaded if id(entry.param) not in planned]


def _declare_clean(state: dict) -> None:
    noise_step = state.get("noise_step")
    if isinstance(noise_step, torch.Tensor):
        noise_step.fill_(0)
    else:
        state["noise_step"] = 0
    compensation = state.get("compensation")
    if compensation is not None:
        compensation.zero_()


def _raise_unknown_weights(opt, entry) -> None:
    index, p, (step, _, _) = entry.index, entry.param, entry.noise
    raise WeightsChangedError(
        f"{type(opt).__name__}: parameter {index} (shape {tuple(p.shape)}) holds neither the weights its "
        f"loaded optimizer state was saved with (noise step {step} on them) nor their clean form, so the "
        "noise that state describes is not on it; nothing was changed. Load the model file saved with "
        "this optimizer state (model.load_state_dict), or, if the parameters hold clean weights of "
        "another origin, call optimizer.reset_noise(). A state_dict loaded into an optimizer whose "
        "parameters come in another order than the saving one's also ends here.")


# ---------------------------------------------------------------------- cleared states
def refill(opt, p, noise: tuple, compensation) -> None:
    """Give a parameter whose state was emptied the noise on its weights: a fresh base-optimizer
    state (step 0, as a cleared state starts) that still knows which noise the next step must
    remove. A new dict, so that the launch data holding the emptied one is rebuilt."""
    step, code, scale = noise
    state = {"step": 0, "noise_step": step, "noise_type": code, "noise_scale": scale}
    if compensation is not None:
        state["compensation"] = compensation
    opt.state[p] = state


def refill_held(opt) -> None:
    """While the noise is removed: a parameter whose state was emptied gets the noise its held
    noisy copy carries, which restore_noise() puts back on the weights."""
    for (p, _, _), noise in zip(opt._held, opt._held_noise):
        if not opt.state.get(p):
            refill(opt, p, noise, None)


def refill_cleared(opt) -> None:
    """Refill the cleared state of every parameter a plan stepped whose weights still hold what
    that step left (the recorded sample): the plans keep their own copy of the counters. One
    pass over the planned parameters; reads the device only where a state is empty."""
    spilled = False
    for plan in list(opt._plans.values()):
        empty = [p for p in plan.params if not opt.state.get(p)]
        if not empty:
            continue
        if not spilled:
            opt._spill_records()
            spilled = True
        on_weights = opt._still_on_weights(plan.noise_on_weights(), empty)
        for p in empty:
            kept = on_weights.get(id(p))
            if kept is not None:
                refill(opt, p, kept[:3], kept[3])
