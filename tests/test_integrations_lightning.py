"""nvrm_ext.integrations.lightning against a real Lightning Trainer (CPU, tiny model)."""
from __future__ import annotations

import functools

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from nvrm_ext import NVRM, FusedAMP, FusedVAdam, FusedVSGD  # noqa: E402
from nvrm_ext.integrations.lightning import DenoisedEvaluation, load_clean_weights  # noqa: E402
from test_integrations_reference import assert_close_to_clean, clean_reference  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())


def loader(n=32, seed=0):
    return torch.utils.data.DataLoader(data(n, seed), batch_size=8, shuffle=False)


def loss_fn(net, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(net(x), y)


class TinyModule:
    """An MLP; `kind`: 'vsgd' (automatic optimization), 'two' (manual, FusedVSGD + FusedVAdam on
    the two layers), 'amp' (FusedAMP around FusedVSGD, automatic: a bare-loss closure), 'nvrm'
    (NVRM around torch's AdamW, automatic)."""

    def __init__(self, kind="vsgd", seed=3, init_seed=0):
        super().__init__()
        torch.manual_seed(init_seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.kind, self.seed = kind, seed
        self.automatic_optimization = kind != "two"
        self.seen = {"validation": [], "test": [], "predict": []}

    def training_step(self, batch, batch_idx):
        loss = loss_fn(self.net, batch)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def _record(self, stage, batch):
        params = [p.detach().clone() for p in self.parameters()]
        self.seen[stage].append((params, loss_fn(self.net, batch).detach()))

    def validation_step(self, batch, batch_idx):
        self._record("validation", batch)

    def test_step(self, batch, batch_idx):
        self._record("test", batch)

    def predict_step(self, batch, batch_idx):
        self._record("predict", batch)
        return self.net(batch[0])

    def configure_optimizers(self):
        if getattr(self, "reused_optimizer", None) is not None:  # the same optimizer for every fit
            return self.reused_optimizer
        common = dict(variability=0.05, num_iters=1000, seed=self.seed)
        if self.kind == "two":
            return [FusedVSGD(self.net[0].parameters(), lr=0.05, momentum=0.9, **common),
                    FusedVAdam(self.net[2].parameters(), lr=0.01, **common)]
        if self.kind == "amp":
            return FusedAMP(self.parameters(), lr=0.05, epsilon=0.1, momentum=0.9,
                            base_optimizer=functools.partial(FusedVSGD, **common))
        if self.kind == "nvrm":
            return NVRM(torch.optim.AdamW(self.parameters(), lr=0.01), **common)
        return FusedVSGD(self.parameters(), lr=0.05, momentum=0.9, **common)


class ExpectedWeights:
    """Placed before DenoisedEvaluation: when an evaluation starts it records the noisy weights and
    the clean weights by the noise specification. Placed after it (`after=True`), it records the
    weights once the evaluation has ended."""

    def __init__(self, after=False):
        self.after = after
        self.records = []

    def _record(self, trainer, pl_module):
        noisy = [p.detach().clone() for p in pl_module.parameters()]
        clean = {}
        for opt in _nvrm_optimizers(pl_module):
            clean.update(clean_reference(opt))
        self.records.append((noisy, [clean.get(p) for p in pl_module.parameters()]))

    def on_validation_start(self, trainer, pl_module):
        if not self.after:
            self._record(trainer, pl_module)

    on_test_start = on_predict_start = on_validation_start

    def on_validation_end(self, trainer, pl_module):
        if self.after:
            self._record(trainer, pl_module)

    on_test_end = on_predict_end = on_validation_end


class Tiny(TinyModule, L.LightningModule):
    pass


class Expected(ExpectedWeights, L.Callback):
    pass


def trainer(tmp_path, callbacks, max_epochs=2, package=L, **kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    return package.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=callbacks, num_sanity_val_steps=1, **kwargs)


def check_evaluations(model, stage, before, after):
    """Every evaluation of `stage` (one batch each: the 8-sample validation set) ran on the
    reference clean weights, its loss equals the loss computed by hand there, and the noisy
    weights came back bit for bit afterwards."""
    seen = model.seen[stage]
    assert len(seen) == len(before.records) == len(after.records) >= 1
    params = list(model.parameters())
    names = dict(model.net.named_parameters())
    x, y = next(iter(loader(8, seed=1)))
    for (weights, loss), (noisy, clean), (restored, _) in zip(seen, before.records, after.records):
        assert all(torch.equal(a, b) for a, b in zip(noisy, restored)), "noise not restored bit for bit"
        reference = dict(zip(params, clean))
        assert_close_to_clean(weights, _nvrm_optimizers(model)[0], reference, params)
        by_hand = torch.func.functional_call(model.net, {k: reference[p] for k, p in names.items()}, (x,))
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(by_hand, y), rtol=1e-5, atol=1e-7)


def _nvrm_optimizers(model):
    return [getattr(o, "base_optimizer", o) for o in model.trainer.optimizers]


@pytest.mark.parametrize("kind", ["vsgd", "two", "amp", "nvrm"])
def test_validation_test_predict_see_clean_weights_and_training_gets_its_noise_back(tmp_path, kind):
    model = Tiny(kind)
    before, after = Expected(), Expected(after=True)
    denoised = DenoisedEvaluation(clean_after_fit=False)
    fit = trainer(tmp_path, [before, denoised, after], val_check_interval=2)  # mid-epoch validation
    fit.fit(model, loader(), loader(8, seed=1))
    # sanity check + 2 per epoch; the loss logged in validation_step is the clean loss
    assert len(model.seen["validation"]) == 1 + 2 * 2
    noisy_now = [p.detach().clone() for p in model.parameters()]
    check_evaluations(model, "validation", before, after)
    # noise on the weights during training: the weights are not the clean reference
    assert not all(torch.equal(a, b) for a, b in zip(before.records[-1][0], before.records[-1][1]))
    # test and predict with the fit's trainer (its optimizers are still there)
    before.records.clear(), after.records.clear()
    fit.test(model, loader(8, seed=1), verbose=False)
    fit.predict(model, loader(8, seed=1))
    assert len(before.records) == 2
    test_and_predict = {"test": model.seen["test"] + model.seen["predict"]}
    model.seen = test_and_predict
    check_evaluations(model, "test", before, after)
    assert all(torch.equal(a, b) for a, b in zip(noisy_now, model.parameters()))


def test_without_the_callback_validation_sees_noisy_weights(tmp_path):
    """The failure the callback fixes (and proof the test above can fail)."""
    model = Tiny()
    before = Expected()
    trainer(tmp_path, [before], max_epochs=1, val_check_interval=2).fit(model, loader(), loader(8, seed=1))
    noisy, clean = before.records[-1]
    weights, _ = model.seen["validation"][-1]
    assert all(torch.equal(w, n) for w, n in zip(weights, noisy))
    assert max((w - c).abs().max().item() for w, c in zip(weights, clean)) > 1e-3


def test_model_is_clean_after_fit_and_test_sees_it(tmp_path):
    model = Tiny()
    before = Expected()
    fit = trainer(tmp_path, [before, DenoisedEvaluation()], max_epochs=1, limit_val_batches=0)

    class AtFitEnd(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            before._record(trainer, pl_module)

    fit.callbacks.insert(0, AtFitEnd())
    fit.fit(model, loader())
    _, clean = before.records[-1]
    params = list(model.parameters())
    assert_close_to_clean([p.detach() for p in params], model.trainer.optimizers[0], dict(zip(params, clean)), params)
    weights_after_fit = [p.detach().clone() for p in params]
    fit.test(model, loader(8, seed=1), verbose=False)
    assert all(torch.equal(w, p) for w, p in zip(model.seen["test"][0][0], weights_after_fit))
    assert all(torch.equal(w, p) for w, p in zip(weights_after_fit, model.parameters()))  # stays clean


class FirstBatch(L.Callback):
    """The weights the first training step of a fit starts from."""

    weights = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.weights is None:
            self.weights = [p.detach().clone() for p in pl_module.parameters()]


class AtTrainEnd(L.Callback):
    """The weights when training ends, before on_fit_end cleans them: the noisy training weights."""

    def on_train_end(self, trainer, pl_module):
        self.weights = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("kind", ["vsgd", "nvrm"])
@pytest.mark.parametrize("between", ["nothing", "other weights", "clean checkpoint"])
def test_second_fit_with_the_same_optimizer_puts_the_noise_back_or_keeps_loaded_weights(tmp_path, between, kind):
    """After a fit the model is clean and the optimizer holds the noisy weights. The next fit
    starts from them; from weights loaded into the model meanwhile (kept: declared clean); and,
    resumed from a checkpoint saved while clean (the model file clean, the optimizer state with
    the noisy copies), from the checkpoint's noisy weights."""
    model = Tiny(kind)
    model.reused_optimizer = model.configure_optimizers()
    at_train_end = AtTrainEnd()
    first_fit = trainer(tmp_path / "a", [at_train_end, DenoisedEvaluation()], max_epochs=1, limit_val_batches=0)
    first_fit.fit(model, loader())
    assert model.reused_optimizer.noise_removed  # left clean after fit
    noisy = at_train_end.weights
    assert not all(torch.equal(w, p) for w, p in zip(noisy, model.parameters()))
    fit_options = {}
    if between == "other weights":  # e.g. the weights of another run: they must not be overwritten
        model.load_state_dict(Tiny(kind, init_seed=9).state_dict())
    elif between == "clean checkpoint":
        first_fit.save_checkpoint(tmp_path / "clean.ckpt")
        model.load_state_dict(Tiny(kind, init_seed=9).state_dict())  # the checkpoint's weights come back
        fit_options = dict(ckpt_path=tmp_path / "clean.ckpt")
    start = [p.detach().clone() for p in model.parameters()]
    first = FirstBatch()
    trainer(tmp_path / "b", [DenoisedEvaluation(), first], max_epochs=1 if not fit_options else 2,
            limit_val_batches=0).fit(model, loader(), **fit_options)
    expected = start if between == "other weights" else noisy
    assert all(torch.equal(w, e) for w, e in zip(first.weights, expected))


@pytest.mark.parametrize("kind", ["vsgd", "nvrm"])
def test_resume_from_model_checkpoint_is_bit_exact_and_checkpoint_gives_clean_weights(tmp_path, kind):
    uninterrupted = Tiny(kind)
    trainer(tmp_path / "a", [DenoisedEvaluation()], max_epochs=4).fit(uninterrupted, loader(), loader(8, seed=1))

    first = Tiny(kind)
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path / "b", [DenoisedEvaluation(), checkpoint], max_epochs=2,
            enable_checkpointing=True).fit(first, loader(), loader(8, seed=1))
    path = tmp_path / "ckpt" / "last.ckpt"
    resumed = Tiny(kind, seed=99, init_seed=5)  # another seed and init: both come from the checkpoint
    trainer(tmp_path / "c", [DenoisedEvaluation()], max_epochs=4).fit(
        resumed, loader(), loader(8, seed=1), ckpt_path=path)
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)

    # the checkpoint holds the noisy training weights; load_clean_weights removes the noise
    saved = torch.load(path, map_location="cpu", weights_only=False)
    reference_model = Tiny(kind, init_seed=7)
    reference_model.load_state_dict(saved["state_dict"])
    reference_opt = reference_model.configure_optimizers()
    reference_opt.load_state_dict(saved["optimizer_states"][0])
    params = list(reference_model.parameters())
    clean = clean_reference(reference_opt)
    noisy = [p.detach().clone() for p in params]
    assert max((n - clean[p]).abs().max().item() for n, p in zip(noisy, params)) > 1e-3
    deployed = load_clean_weights(Tiny(kind, init_seed=8), path)
    assert_close_to_clean([p.detach() for p in deployed.parameters()], reference_opt, clean, params)


def test_fused_amp_in_automatic_optimization_matches_a_hand_written_loop(tmp_path):
    """Lightning's closure returns a bare loss; FusedAMP takes its two passes through it."""
    model = Tiny("amp")
    trainer(tmp_path, [], max_epochs=2, limit_val_batches=0).fit(model, loader())

    hand = Tiny("amp")
    opt = hand.configure_optimizers()
    for _ in range(2):
        for batch in loader():
            def closure():
                opt.zero_grad()
                loss = loss_fn(hand.net, batch)
                loss.backward()
                return loss
            opt.step(closure)
    for p, q in zip(model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(model.parameters()), next(Tiny("amp").parameters()))  # it trained


def test_the_pytorch_lightning_package_name_works_too(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from nvrm_ext.integrations.pytorch_lightning import DenoisedEvaluation as PLDenoisedEvaluation

    class PLTiny(TinyModule, pl.LightningModule):
        pass

    class PLExpected(ExpectedWeights, pl.Callback):
        pass

    model = PLTiny()
    before, after = PLExpected(), PLExpected(after=True)
    trainer(tmp_path, [before, PLDenoisedEvaluation(clean_after_fit=False), after], max_epochs=1,
            package=pl, val_check_interval=2).fit(model, loader(), loader(8, seed=1))
    check_evaluations(model, "validation", before, after)


def reference_clean_weights(full_checkpoint, kind):
    """The clean weights a full checkpoint stands for, by the noise specification: its noisy
    weights minus the noise its optimizer states know (each optimizer its own parameters)."""
    saved = torch.load(full_checkpoint, map_location="cpu", weights_only=False)
    model = Tiny(kind, init_seed=7)
    model.load_state_dict(saved["state_dict"])
    optimizers = model.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    clean = {}
    for optimizer, state in zip(optimizers, saved["optimizer_states"]):
        optimizer.load_state_dict(state)
        clean.update(clean_reference(optimizer))
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: c for p, c in clean.items()}, saved["state_dict"], optimizers[0]


@pytest.mark.parametrize("kind", ["vsgd", "two", "nvrm"])
def test_weights_only_checkpoint_holds_the_clean_weights_and_training_is_unchanged(tmp_path, kind):
    """ModelCheckpoint(save_weights_only=True) saves the clean weights its metric was computed on
    (both optimizers cleaning their own parameters), beside a full checkpoint of the same moment
    that keeps the noisy weights and the state that knows their noise; training goes on bit for
    bit as without any checkpoint."""
    weights_only = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "w", save_last=True, save_top_k=0,
                                               save_weights_only=True, mode="max")  # mode: another state_key
    full = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "f", save_last=True, save_top_k=0)
    model = Tiny(kind)
    trainer(tmp_path / "a", [DenoisedEvaluation(clean_after_fit=False), weights_only, full], max_epochs=2,
            enable_checkpointing=True).fit(model, loader(), loader(8, seed=1))
    plain = Tiny(kind)
    trainer(tmp_path / "b", [DenoisedEvaluation(clean_after_fit=False)], max_epochs=2).fit(
        plain, loader(), loader(8, seed=1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))

    clean, noisy, optimizer = reference_clean_weights(tmp_path / "f" / "last.ckpt", kind)
    saved = torch.load(tmp_path / "w" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" not in saved and saved["nvrm_ext_clean_weights"] is True
    assert set(saved["state_dict"]) == set(clean)
    for name, c in clean.items():
        torch.testing.assert_close(saved["state_dict"][name], c, rtol=0, atol=1e-6 * 0.05 + 1e-7)
        assert (noisy[name] - c).abs().max() > 1e-3  # the full checkpoint: noisy, as before

    deployed = load_clean_weights(Tiny(kind, init_seed=8), tmp_path / "w" / "last.ckpt")
    assert all(torch.equal(p.detach(), saved["state_dict"][name]) for name, p in deployed.named_parameters())
    from_full = load_clean_weights(Tiny(kind, init_seed=8), tmp_path / "f" / "last.ckpt")
    for name, p in from_full.named_parameters():
        torch.testing.assert_close(p.detach(), clean[name], rtol=0, atol=1e-6 * 0.05 + 1e-7)


def test_weights_only_checkpoint_without_the_callback_is_refused_by_load_clean_weights(tmp_path):
    """Without DenoisedEvaluation a weights-only file holds the noisy weights and nothing that
    knows their noise: load_clean_weights cannot clean it and says so, loading nothing."""
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "w", save_last=True, save_top_k=0,
                                             save_weights_only=True)
    trainer(tmp_path, [checkpoint], max_epochs=1, limit_val_batches=0, enable_checkpointing=True).fit(Tiny(), loader())
    target = Tiny(init_seed=8)
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(ValueError, match="no optimizer states.*saved without DenoisedEvaluation"):
        load_clean_weights(target, tmp_path / "w" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))


def full_checkpoint(tmp_path, kind="vsgd"):
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "f", save_last=True, save_top_k=0)
    trainer(tmp_path, [DenoisedEvaluation(), checkpoint], max_epochs=1, limit_val_batches=0,
            enable_checkpointing=True).fit(Tiny(kind), loader())
    return torch.load(tmp_path / "f" / "last.ckpt", map_location="cpu", weights_only=False)


def optimizer_snapshot(optimizer):
    state = optimizer.state_dict()
    return [(i, k, v.clone() if isinstance(v, torch.Tensor) else v)
            for i, s in sorted(state["state"].items()) for k, v in sorted(s.items())]


def same_snapshot(a, b):
    return len(a) == len(b) and all(
        x[:2] == y[:2] and (torch.equal(x[2], y[2]) if isinstance(x[2], torch.Tensor) else x[2] == y[2])
        for x, y in zip(a, b))


@pytest.mark.parametrize("mismatch", ["group sizes", "optimizer class", "second optimizer", "weight shapes",
                                      "missing weight"])
def test_load_clean_weights_with_a_mismatch_changes_nothing(tmp_path, mismatch):
    """Every mismatch is an error that leaves the module's weights and the given optimizers'
    states as they were: checked before loading, or undone when an optimizer's own load refuses."""
    saved = full_checkpoint(tmp_path, kind="two" if mismatch in ("optimizer class", "second optimizer") else "vsgd")
    target = Tiny("two" if mismatch in ("optimizer class", "second optimizer") else "vsgd", init_seed=8)
    optimizers = target.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    # a trained state in the given optimizers, to see that it survives
    for _ in range(2):
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss_fn(target.net, next(iter(loader()))).backward()
        for optimizer in optimizers:
            optimizer.step()
    if mismatch == "group sizes":  # an optimizer over the first layer only
        optimizers = [FusedVSGD(target.net[0].parameters(), lr=0.05, variability=0.05, num_iters=1000, seed=3)]
        match = "doesn't match the size"
    elif mismatch == "optimizer class":  # FusedVAdam's state offered to FusedVSGD and back
        saved["optimizer_states"] = saved["optimizer_states"][::-1]
        optimizers = [FusedVSGD(target.net[2].parameters(), lr=0.05, variability=0.05, num_iters=1000, seed=3),
                      FusedVAdam(target.net[0].parameters(), lr=0.01, variability=0.05, num_iters=1000, seed=3)]
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss_fn(target.net, next(iter(loader()))).backward()
        for optimizer in optimizers:
            optimizer.step()
        match = "saved by"
    elif mismatch == "second optimizer":  # the first loads, the second refuses: the first is undone
        saved["optimizer_states"][1] = {**saved["optimizer_states"][1],
                                        "nvrm": {**saved["optimizer_states"][1]["nvrm"],
                                                     "optimizer": "FusedVSGD"}}
        match = "saved by FusedVSGD"
    elif mismatch == "weight shapes":
        saved["state_dict"]["net.0.weight"] = torch.zeros(3, 4)
        match = "size mismatch for net.0.weight"
    else:
        del saved["state_dict"]["net.2.bias"]
        match = 'Missing key.*"net.2.bias"'
    weights = [p.detach().clone() for p in target.parameters()]
    states = [optimizer_snapshot(optimizer) for optimizer in optimizers]
    with pytest.raises((ValueError, RuntimeError), match=match):
        load_clean_weights(target, saved, optimizers)
    assert all(torch.equal(a, b) for a, b in zip(weights, target.parameters()))
    assert all(same_snapshot(s, optimizer_snapshot(o)) for s, o in zip(states, optimizers))
    assert not any(optimizer.noise_removed for optimizer in optimizers)


def test_the_class_instead_of_an_instance_gets_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match=r"callbacks=\[DenoisedEvaluation\(\)\]"):
        trainer(tmp_path, [DenoisedEvaluation], max_epochs=1, limit_val_batches=0).fit(Tiny(), loader())


@pytest.mark.parametrize("max_steps", [-1, 10])  # max_steps cuts the run: estimated_stepping_batches // epochs is off
def test_optimizer_steps_per_epoch_in_configure_optimizers_makes_every_epoch_end_clean(tmp_path, max_steps):
    """7 batches, accumulate_grad_batches=2: Lightning steps 4 times per epoch (the last step
    on one batch). num_iters = optimizer_steps_per_epoch(trainer) = 4: every epoch ends on
    clean weights by the noise specification, and only the epoch ends do."""
    from nvrm_ext.integrations.lightning import optimizer_steps_per_epoch

    class Counted(Tiny):
        def configure_optimizers(self):
            self.steps_per_epoch = optimizer_steps_per_epoch(self.trainer)
            return FusedVSGD(self.parameters(), lr=0.05, momentum=0.9, variability=0.05,
                             num_iters=self.steps_per_epoch, seed=3)

    class CleanAtStepEnd(L.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            if int(trainer.global_step) == (self.steps[-1][0] if self.steps else 0):
                return  # an accumulating batch: no step
            clean = clean_reference(opt)
            self.steps.append((int(trainer.global_step),
                               all(torch.equal(p.detach(), clean[p]) for p in pl_module.parameters())
                               and all(int(s["noise_step"]) == 0 for s in opt.state.values())))

    model = Counted()
    seen = CleanAtStepEnd()
    seven = torch.utils.data.DataLoader(data(14), batch_size=2, shuffle=False)
    trainer(tmp_path, [seen], max_epochs=3, max_steps=max_steps, accumulate_grad_batches=2,
            limit_val_batches=0).fit(model, seven)
    assert model.steps_per_epoch == 4
    steps = [step for step, _ in seen.steps]
    assert steps == list(range(1, 13 if max_steps == -1 else 11))
    assert [step for step, clean in seen.steps if clean] == [4, 8, 12][:len(steps) // 4]
