"""nvrm_ext.integrations.transformers against a real transformers Trainer (CPU, tiny model)."""
from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from nvrm_ext import NVRM, FusedAMP, FusedVSGD  # noqa: E402
from nvrm_ext.integrations.transformers import AMPTrainer, DenoisedEvaluation  # noqa: E402
from test_integrations_reference import assert_close_to_clean, clean_reference, noise_counters  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class TinyRegressor(torch.nn.Module):
    """What Trainer needs of a model: forward(**batch) -> {"loss", "logits"}."""

    def __init__(self, init_seed=0):
        super().__init__()
        torch.manual_seed(init_seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.mse_loss(logits, labels)
        return out


def dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True).sin()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


TRAIN, EVAL = dataset(16, 0), dataset(8, 1)


def eval_tensors():
    return torch.stack([e["x"] for e in EVAL]), torch.stack([e["labels"] for e in EVAL])


OPTIMIZERS = {
    "vsgd": lambda model, seed: FusedVSGD(model.parameters(), lr=0.05, variability=0.05, num_iters=1000,
                                          momentum=0.9, seed=seed),
    "nvrm-adamw": lambda model, seed: NVRM(torch.optim.AdamW(model.parameters(), lr=0.1), variability=0.05,
                                           num_iters=1000, seed=seed),
}


def nvrm(model, seed=3, kind="vsgd"):
    return OPTIMIZERS[kind](model, seed)


def args(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                per_device_eval_batch_size=8, max_steps=6, lr_scheduler_type="constant", logging_strategy="no",
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kwargs)
    return transformers.TrainingArguments(**base)


class Recorder(transformers.TrainerCallback):
    """Before DenoisedEvaluation: at every step end that evaluates or saves, the noisy weights and
    the clean weights by the noise specification; on_evaluate: the evaluated weights and loss."""

    def __init__(self):
        self.expected, self.evaluated = [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if (control.should_evaluate or control.should_save) and not (
                self.expected and self.expected[-1][0] == state.global_step):
            opt = optimizer.optimizer  # accelerate's AcceleratedOptimizer
            clean = clean_reference(opt)
            self.expected.append((state.global_step, [p.detach().clone() for p in model.parameters()],
                                  [clean[p] for p in model.parameters()]))

    on_epoch_end = on_step_end

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        self.evaluated.append(([p.detach().clone() for p in model.parameters()], metrics["eval_loss"]))


class NextStep(transformers.TrainerCallback):
    """After DenoisedEvaluation: the weights the next training step starts from."""

    def __init__(self):
        self.weights = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = [p.detach().clone() for p in model.parameters()]


def loss_at(model, weights):
    x, y = eval_tensors()
    names = [name for name, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, weights)), (x,))
    return torch.nn.functional.mse_loss(out["logits"], y).item()


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("strategy", ["steps", "epoch"])  # decided at on_step_end / on_epoch_end
def test_evaluation_predictions_and_saved_model_see_clean_weights(tmp_path, strategy, kind):
    model = TinyRegressor()
    opt = nvrm(model, kind=kind)
    recorder, next_step = Recorder(), NextStep()
    max_steps, evaluated_at = (6, [2, 4, 6]) if strategy == "steps" else (10, [4, 8, 10])  # 4 steps per epoch
    trainer = transformers.Trainer(model=model, args=args(tmp_path, eval_strategy=strategy, eval_steps=2,
                                                          max_steps=max_steps),
                                   train_dataset=TRAIN, eval_dataset=EVAL, optimizers=(opt, None),
                                   callbacks=[recorder, DenoisedEvaluation(), next_step])
    trainer.train()
    params = list(model.parameters())
    assert [step for step, _, _ in recorder.expected] == evaluated_at and len(recorder.evaluated) == 3
    for (step, noisy, clean), (weights, eval_loss) in zip(recorder.expected, recorder.evaluated):
        assert_close_to_clean(weights, opt, dict(zip(params, clean)), params)
        assert eval_loss == pytest.approx(loss_at(model, clean), rel=1e-6)
        if step % 4:  # the noise matters
            assert eval_loss != pytest.approx(loss_at(model, noisy), rel=1e-4)
        else:  # an epoch end: num_iters was set to the 4 steps per epoch, no noise is on the weights
            assert all(torch.equal(a, b) for a, b in zip(noisy, clean))
        if step < max_steps:  # training resumed from the noisy weights, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(next_step.weights[step], noisy))
    # after train(): the model stays clean for evaluate(), predict() and save_model()
    _, _, final_clean = recorder.expected[-1]
    assert_close_to_clean([p.detach() for p in params], opt, dict(zip(params, final_clean)), params)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss_at(model, final_clean), rel=1e-6)
    predictions = trainer.predict(EVAL).predictions
    x, _ = eval_tensors()
    expected_predictions = torch.func.functional_call(
        model, dict(zip([n for n, _ in model.named_parameters()], final_clean)), (x,))["logits"]
    torch.testing.assert_close(torch.as_tensor(predictions), expected_predictions, rtol=1e-6, atol=1e-7)
    trainer.save_model(str(tmp_path / "final"))
    saved = safetensors_torch.load_file(str(tmp_path / "final" / "model.safetensors"))
    for (name, p), clean in zip(model.named_parameters(), final_clean):
        torch.testing.assert_close(saved[name], clean, rtol=0, atol=1e-7)


def test_without_the_callback_evaluation_sees_noisy_weights(tmp_path):
    """The failure the callback fixes (and proof the test above can fail)."""
    model = TinyRegressor()
    recorder = Recorder()
    transformers.Trainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=2),
                         train_dataset=TRAIN, eval_dataset=EVAL, optimizers=(nvrm(model), None),
                         callbacks=[recorder]).train()
    (_, noisy, clean), (weights, eval_loss) = recorder.expected[0], recorder.evaluated[0]
    assert all(torch.equal(a, b) for a, b in zip(weights, noisy))
    assert eval_loss != pytest.approx(loss_at(model, clean), rel=1e-4)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resume_from_checkpoint_is_bit_exact(tmp_path, kind):
    """Checkpoints hold the clean model and the optimizer's exact noisy copies: resuming from one
    (mid-epoch, another init and seed) continues the uninterrupted run bit for bit."""
    common = dict(max_steps=8, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3)
    uninterrupted = TinyRegressor()
    transformers.Trainer(model=uninterrupted, args=args(tmp_path / "a", **common), train_dataset=TRAIN,
                         eval_dataset=EVAL, optimizers=(nvrm(uninterrupted, kind=kind), None),
                         callbacks=[DenoisedEvaluation()]).train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    resumed = TinyRegressor(init_seed=5)
    transformers.Trainer(model=resumed, args=args(tmp_path / "b", **common), train_dataset=TRAIN,
                         eval_dataset=EVAL, optimizers=(nvrm(resumed, seed=99, kind=kind), None),
                         callbacks=[DenoisedEvaluation()]).train(resume_from_checkpoint=str(checkpoint))
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("max_steps", [8, 9])  # the last step saves (noise removed) / does not (noise on)
def test_load_best_model_at_end_gives_the_best_checkpoints_clean_weights(tmp_path, max_steps, kind):
    model = TinyRegressor()
    opt = nvrm(model, kind=kind)
    recorder = Recorder()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2,
                               eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                               metric_for_best_model="eval_loss", greater_is_better=False),
        train_dataset=TRAIN, eval_dataset=EVAL, optimizers=(opt, None), callbacks=[recorder, DenoisedEvaluation()])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    best_step = int(best.rsplit("-", 1)[1])
    assert best_step < 8  # an earlier checkpoint than the last: the model was overwritten
    saved = safetensors_torch.load_file(f"{best}/model.safetensors")
    clean = next(c for step, _, c in recorder.expected if step == best_step)
    for (name, p), c in zip(model.named_parameters(), clean):
        torch.testing.assert_close(saved[name], c, rtol=0, atol=1e-7)  # the checkpoint: clean
        assert torch.equal(p, saved[name])  # the model after train(): that checkpoint's weights
    assert not opt.noise_removed
    trainer.save_model(str(tmp_path / "final"))
    final = safetensors_torch.load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(final[name], saved[name]) for name in saved)
    # the optimizer now treats the loaded weights as clean: training on perturbs them afresh
    assert all(int(s.get("noise_step", 0)) == 0 for s in noise_counters(opt).values())


def test_amp_trainer_matches_a_hand_written_loop(tmp_path):
    """FusedAMP (around FusedVSGD) under Trainer: two passes per step, one optimizer update; the
    callback finds FusedVSGD through AcceleratedOptimizer and FusedAMP."""
    def make(model):
        return FusedAMP(model.parameters(), lr=0.05, epsilon=0.1, momentum=0.9,
                        base_optimizer=functools.partial(FusedVSGD, variability=0.05, num_iters=3, seed=3))

    model = TinyRegressor()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    AMPTrainer(model=model, args=args(tmp_path, max_steps=4, max_grad_norm=0.0, train_sampling_strategy="sequential"),
               train_dataset=TRAIN, optimizers=(make(model), None),
               callbacks=[DenoisedEvaluation(set_num_iters=False)]).train()
    assert len(calls) == 2 * 4

    hand = TinyRegressor()
    opt = make(hand)
    x = torch.stack([e["x"] for e in TRAIN])
    y = torch.stack([e["labels"] for e in TRAIN])
    for step in range(4):
        batch = slice(4 * step, 4 * step + 4)

        def closure():
            opt.zero_grad()
            loss = hand(x[batch], y[batch])["loss"]
            loss.backward()
            return loss
        opt.step(closure)
    opt.base_optimizer.remove_noise()  # the callback leaves the model clean after train()
    for p, q in zip(model.parameters(), hand.parameters()):
        assert torch.equal(p, q)


class EpochEnds(transformers.TrainerCallback):
    """The optimizer steps of each epoch, and at each step end whether the weights are clean by
    the noise specification (the reference clean weights equal them) and every counter is 0."""

    def __init__(self):
        self.steps_per_epoch, self.clean_at_step_end = [0], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps_per_epoch[-1] += 1
        opt = optimizer.optimizer
        clean = clean_reference(opt)
        self.clean_at_step_end.append(
            (state.global_step, all(torch.equal(p.detach(), clean[p]) for p in model.parameters())
             and all(int(s["noise_step"]) == 0 for s in opt.state.values())))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.steps_per_epoch.append(0)


SEVEN_BATCHES = dataset(14, 0)  # batch size 2: 7 batches; accumulation 2: 4 optimizer steps per epoch


def seven_batch_args(tmp_path, **kwargs):
    return args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=-1,
                num_train_epochs=3, **kwargs)


def test_num_iters_is_the_trainers_steps_per_epoch_so_every_epoch_ends_clean(tmp_path):
    """7 batches, accumulation 2: Trainer steps 4 times per epoch (the last step on one batch),
    not 7 // 2 = 3. The callback sets num_iters = 4: every epoch ends on clean weights, and
    only the epoch ends do."""
    model = TinyRegressor()
    opt = nvrm(model)  # num_iters left at its default
    ends = EpochEnds()
    transformers.Trainer(model=model, args=seven_batch_args(tmp_path), train_dataset=SEVEN_BATCHES,
                         optimizers=(opt, None), callbacks=[ends, DenoisedEvaluation()]).train()
    assert ends.steps_per_epoch[:3] == [4, 4, 4]
    assert [g["num_iters"] for g in opt.param_groups] == [4]
    assert [step for step, clean in ends.clean_at_step_end if clean] == [4, 8, 12]


def test_the_old_recipe_num_iters_leaves_the_epoch_ends_noisy_and_is_refused(tmp_path):
    """num_iters = len(train_dataloader) // gradient_accumulation_steps = 3: kept with
    set_num_iters=False, the epoch ends carry noise (what the callback prevents); with the
    default, train() refuses it before the first step, nothing changed."""
    model = TinyRegressor()
    opt = FusedVSGD(model.parameters(), lr=0.05, variability=0.05, num_iters=3, momentum=0.9, seed=3)
    ends = EpochEnds()
    transformers.Trainer(model=model, args=seven_batch_args(tmp_path / "a"), train_dataset=SEVEN_BATCHES,
                         optimizers=(opt, None), callbacks=[ends, DenoisedEvaluation(set_num_iters=False)]).train()
    assert [step for step, clean in ends.clean_at_step_end if clean] == [3, 6, 9, 12]  # not the epoch ends 4, 8

    model = TinyRegressor()
    opt = FusedVSGD(model.parameters(), lr=0.05, variability=0.05, num_iters=3, momentum=0.9, seed=3)
    weights = [p.detach().clone() for p in model.parameters()]
    trainer = transformers.Trainer(model=model, args=seven_batch_args(tmp_path / "b"), train_dataset=SEVEN_BATCHES,
                                   optimizers=(opt, None), callbacks=[DenoisedEvaluation()])
    with pytest.raises(ValueError, match=r"num_iters=3, but Trainer runs 4 optimizer steps per epoch"):
        trainer.train()
    assert opt.param_groups[0]["num_iters"] == 3 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


class Trigger(transformers.TrainerCallback):
    """A user callback that asks for an evaluation or a save at step 3 (no strategy would), and
    records the noisy weights and the clean ones by the specification at that moment."""

    def __init__(self, what):
        self.what, self.expected = what, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 3:
            clean = clean_reference(optimizer.optimizer)
            self.expected = ([p.detach().clone() for p in model.parameters()],
                             [clean[p] for p in model.parameters()])
            setattr(control, f"should_{self.what}", True)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("what", ["evaluate", "save"])
@pytest.mark.parametrize("order", ["trigger first", "trigger last"])
def test_evaluation_or_save_asked_by_any_callback_in_any_order_sees_clean_weights(tmp_path, what, order, kind):
    model = TinyRegressor()
    opt = nvrm(model, kind=kind)
    trigger, recorder, next_step = Trigger(what), Recorder(), NextStep()
    denoised = DenoisedEvaluation()
    callbacks = [trigger, recorder, denoised, next_step] if order == "trigger first" else \
        [recorder, denoised, next_step, trigger]
    transformers.Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=TRAIN, eval_dataset=EVAL,
                         optimizers=(opt, None), callbacks=callbacks).train()
    noisy, clean = trigger.expected
    assert max((n - c).abs().max().item() for n, c in zip(noisy, clean)) > 1e-3  # noise was on at step 3
    params = list(model.parameters())
    if what == "evaluate":
        (weights, eval_loss), = recorder.evaluated
        assert_close_to_clean(weights, opt, dict(zip(params, clean)), params)
        assert eval_loss == pytest.approx(loss_at(model, clean), rel=1e-6)
        assert eval_loss != pytest.approx(loss_at(model, noisy), rel=1e-4)
    else:
        saved = safetensors_torch.load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
        for (name, _), c in zip(model.named_parameters(), clean):
            torch.testing.assert_close(saved[name], c, rtol=0, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(next_step.weights[3], noisy))  # training resumed noisy
    # the run itself is the one without any evaluation or save, bit for bit
    plain = TinyRegressor()
    transformers.Trainer(model=plain, args=args(tmp_path / "plain", max_steps=6), train_dataset=TRAIN,
                         optimizers=(nvrm(plain, kind=kind), None), callbacks=[DenoisedEvaluation()]).train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_late_evaluation_under_data_parallel_replicas_is_refused(tmp_path, kind):
    """nn.DataParallel's replicas copy the weights before any hook runs: an evaluation asked
    after DenoisedEvaluation decided would run on the noisy copies, so it is an error. (The
    replica is made by hand: DataParallel replicates only on several GPUs.)"""
    class ReplicaEvaluation(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    model._replicate_for_data_parallel()(eval_tensors()[0])

    model = TinyRegressor()
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=TRAIN,
                                   optimizers=(nvrm(model, kind=kind), None),
                                   callbacks=[DenoisedEvaluation(), ReplicaEvaluation()])
    with pytest.raises(RuntimeError, match="under nn.DataParallel started on the noisy weights"):
        trainer.train()


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_read_between_accumulated_batches_sees_clean_weights_and_training_is_unchanged(tmp_path, kind):
    """model.state_dict() and a no-grad forward between two micro-batches of one accumulation
    (on_substep_end) get the clean weights; the next micro-batch's training forward puts the noise
    back, so the run is the one without the reads, bit for bit."""
    class Reads(transformers.TrainerCallback):
        read = None

        def on_substep_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 3:
                clean = clean_reference(optimizer.optimizer)
                expected = [clean[p] for p in model.parameters()]
                weights = [t.clone() for t in model.state_dict().values()]
                with torch.no_grad():
                    output = model(eval_tensors()[0])["logits"]
                self.read = (weights, output, expected)

    def run(out, callbacks):
        model = TinyRegressor()
        opt = nvrm(model, kind=kind)
        transformers.Trainer(model=model, args=args(out, per_device_train_batch_size=2, gradient_accumulation_steps=2),
                             train_dataset=TRAIN, optimizers=(opt, None), callbacks=callbacks).train()
        return model, opt

    reads = Reads()
    model, opt = run(tmp_path / "a", [reads, DenoisedEvaluation()])
    weights, output, expected = reads.read
    params = list(model.parameters())
    assert_close_to_clean(weights, opt, dict(zip(params, expected)), params)
    names = [name for name, _ in model.named_parameters()]
    by_hand = torch.func.functional_call(model, dict(zip(names, expected)), (eval_tensors()[0],))["logits"]
    torch.testing.assert_close(output, by_hand, rtol=1e-5, atol=1e-6)
    plain, _ = run(tmp_path / "b", [DenoisedEvaluation()])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
