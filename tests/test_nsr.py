"""Neuron Steadiness Regularization against an explicit per-class reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from nvrm_ext.nn import NeuronSteadiness, nsr_loss


def reference_penalty(responses, labels, num_classes, remembered=None):
    """Sum over classes in the batch and neurons of the population intra-class variance.

    remembered[k]: (m, D) detached responses of class k from earlier batches (or absent).
    """
    total = responses.new_zeros(())
    for k in range(num_classes):
        current = responses[labels == k]
        if current.shape[0] == 0:
            continue
        if remembered is not None and k in remembered and remembered[k].shape[0]:
            current = torch.cat([remembered[k], current])
        mean = current.mean(dim=0)
        total = total + ((current - mean) ** 2).mean(dim=0).sum()
    return total


def _make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5))


@pytest.mark.parametrize("shape", [(32, 7), (16, 4, 5, 3)])
def test_nsr_loss_matches_reference_values_and_gradients(shape):
    torch.manual_seed(1)
    features = (torch.randn(shape) * 3 + 10).requires_grad_(True)  # offset tests cancellation
    labels = torch.randint(0, 6, (shape[0],))
    labels[0] = 5  # make sure some class is present, class absence is likely for others
    loss = nsr_loss(features, labels, 6)
    loss.backward()
    reference_features = features.detach().clone().requires_grad_(True)
    responses = reference_features.flatten(2).mean(2) if len(shape) == 4 else reference_features
    expected = reference_penalty(responses, labels, 6)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.grad, reference_features.grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 12), width=st.integers(1, 5), num_classes=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_nsr_loss_matches_reference_on_random_batches(batch, width, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    torch.testing.assert_close(nsr_loss(features, labels, num_classes),
                               reference_penalty(features, labels, num_classes))


def test_nsr_loss_of_single_sample_classes_is_zero():
    features = torch.randn(3, 4)
    assert nsr_loss(features, torch.tensor([0, 1, 2]), 3).abs().item() < 1e-6


def test_penalty_without_queue_matches_reference_over_layers():
    net = _make_net()
    x, labels = torch.randn(24, 6), torch.randint(0, 5, (24,))
    with NeuronSteadiness([net[0], net[2]], lam=0.3, num_classes=5) as nsr:
        hidden = net[0](x)
        out = net[2](net[1](hidden))
        penalty = nsr.penalty(labels)
        grads = torch.autograd.grad(penalty, list(net.parameters()), retain_graph=True)
        expected = 0.3 * (reference_penalty(hidden, labels, 5) + reference_penalty(out, labels, 5))
        expected_grads = torch.autograd.grad(expected, list(net.parameters()))
        torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        per_layer = nsr.layer_variances()
        torch.testing.assert_close(per_layer.sum().float(), (expected / 0.3).detach(),
                                   rtol=1e-5, atol=1e-6)


def test_penalty_with_queue_matches_reference_with_history():
    net = _make_net()
    queue_length, num_classes = 3, 4
    history = {k: [] for k in range(num_classes)}
    with NeuronSteadiness([net[0]], lam=1.0, num_classes=num_classes,
                          queue_length=queue_length) as nsr:
        for step in range(4):
            x = torch.randn(10, 6)
            labels = torch.randint(0, num_classes, (10,))
            net(x)
            hidden = net[0](x)  # a second call overwrites the first: the hook keeps the latest
            remembered = {k: torch.stack(rows[-queue_length:]) if rows else hidden[:0].detach()
                          for k, rows in history.items()}
            expected = reference_penalty(hidden, labels, num_classes, remembered)
            expected_grads = torch.autograd.grad(expected, [net[0].weight], retain_graph=True)
            penalty = nsr.penalty(labels)
            (grad,) = torch.autograd.grad(penalty, [net[0].weight])
            torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, expected_grads[0], rtol=1e-4, atol=1e-6)
            for row, k in zip(hidden.detach(), labels.tolist()):
                history[k].append(row)

            bank, fill = nsr.queue_contents(0)
            for k in range(num_classes):
                want = history[k][-queue_length:]
                assert fill[k].item() == len(want)
                stored = bank[k, :len(want)]
                want = torch.stack(want) if want else stored
                # ring order differs from arrival order: compare as multisets of rows
                torch.testing.assert_close(stored[stored[:, 0].argsort()],
                                           want[want[:, 0].argsort()])


def test_queue_keeps_last_samples_of_an_oversized_class():
    layer = nn.Identity()
    with NeuronSteadiness([layer], lam=1.0, num_classes=2, queue_length=2) as nsr:
        layer(torch.arange(5.0)[:, None])
        nsr.penalty(torch.tensor([0, 0, 0, 1, 0]))
        bank, fill = nsr.queue_contents(0)
        assert fill.tolist() == [2, 1]
        assert sorted(bank[0, :, 0].tolist()) == [2.0, 4.0]
        assert bank[1, 0, 0].item() == 3.0
        layer(torch.tensor([[7.0]]))
        nsr.penalty(torch.tensor([0]))
        bank, fill = nsr.queue_contents(0)
        assert sorted(bank[0, :, 0].tolist()) == [4.0, 7.0]  # 2.0, the oldest, was replaced


def test_queue_running_sums_track_the_stored_rows():
    layer = nn.Identity()
    generator = torch.Generator().manual_seed(3)
    history = {k: [] for k in range(3)}
    with NeuronSteadiness([layer], lam=1.0, num_classes=3, queue_length=4) as nsr:
        for _ in range(20):
            rows = torch.randn(7, 5, generator=generator) + 1000.0  # far from 0: no cancellation
            labels = torch.randint(0, 3, (7,), generator=generator)
            layer(rows)
            nsr.penalty(labels)
            remembered = {k: torch.stack(h[-4:]).double() if h else torch.zeros(0, 5, dtype=torch.float64)
                          for k, h in history.items()}
            for row, k in zip(rows, labels.tolist()):
                history[k].append(row)
        queue = nsr._queues[0]
        bank = queue.bank.double()
        torch.testing.assert_close(queue.sums, bank.sum(dim=1))
        torch.testing.assert_close(queue.squares, (bank * bank).sum(dim=1))
        # the last penalty's variance from the running sums equals the two-pass variance of
        # the last batch plus the rows each class remembered (centred: no cancellation there)
        expected = reference_penalty(rows.double(), labels, 3, remembered)
        torch.testing.assert_close(nsr.layer_variances(), expected.reshape(1), rtol=1e-6, atol=1e-9)


def test_conv_maps_use_channel_means():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x, labels = torch.randn(8, 2, 5, 5), torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    with NeuronSteadiness([conv], lam=2.0, num_classes=3) as nsr:
        maps = conv(x)
        penalty = nsr.penalty(labels)
    expected = 2.0 * reference_penalty(maps.mean(dim=(2, 3)), labels, 3)
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-6)


def test_remove_unhooks_and_context_manager_removes():
    net = _make_net()
    nsr = NeuronSteadiness([net[0], net[2]], lam=1.0, num_classes=5)
    assert len(net[0]._forward_hooks) == 1 and len(net[2]._forward_hooks) == 1
    nsr.remove()
    assert not net[0]._forward_hooks and not net[2]._forward_hooks
    nsr.remove()  # idempotent
    with NeuronSteadiness([net[0]], lam=1.0, num_classes=5):
        assert len(net[0]._forward_hooks) == 1
    assert not net[0]._forward_hooks
    with pytest.raises(ValueError, match="was removed"):
        nsr.penalty(torch.zeros(2, dtype=torch.int64))


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(lam=-0.1, num_classes=3), r"lam must be a finite real number >= 0; got -0.1"),
    (dict(lam=1.0, num_classes=0), r"num_classes must be an integer >= 1; got 0"),
    (dict(lam=1.0, num_classes=3, queue_length=-1),
     r"queue_length must be an integer >= 0; got -1"),
])
def test_bad_constructor_arguments_register_no_hooks(kwargs, message):
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=message):
        NeuronSteadiness([layer], **kwargs)
    assert not layer._forward_hooks
    with pytest.raises(ValueError, match=r"modules\[1\] must be an nn.Module; got str"):
        NeuronSteadiness([layer, "fc"], lam=1.0, num_classes=2)
    assert not layer._forward_hooks


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 1, 3, 1]),
     r"labels must lie in \[0, num_classes=3\); got values from 0 to 3"),
    (torch.tensor([0, -1, 2, 1]),
     r"labels must lie in \[0, num_classes=3\); got values from -1 to 2"),
    (torch.tensor([0, 1, 2]), r"labels has 3 entries but the output of layer 0 \(Linear\) has a "
                              r"batch of 4"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), r"labels must have an integer dtype; got torch.float32"),
])
def test_bad_labels_raise_and_change_nothing(labels, message):
    layer = nn.Linear(3, 2)
    with NeuronSteadiness([layer], lam=1.0, num_classes=3, queue_length=4) as nsr:
        layer(torch.randn(4, 3))
        nsr.penalty(torch.tensor([0, 1, 2, 1]))
        bank_before, fill_before = nsr.queue_contents(0)
        variances_before = nsr.layer_variances()
        layer(torch.randn(4, 3))
        recorded = nsr._outputs[0]
        with pytest.raises(ValueError, match=message):
            nsr.penalty(labels)
        bank_after, fill_after = nsr.queue_contents(0)
        assert torch.equal(bank_before, bank_after) and torch.equal(fill_before, fill_after)
        assert torch.equal(variances_before, nsr.layer_variances())
        assert nsr._outputs[0] is recorded  # the recorded batch is still there to retry


def test_penalty_needs_a_forward_pass():
    layer = nn.Linear(3, 2)
    with NeuronSteadiness([layer], lam=1.0, num_classes=3) as nsr:
        with pytest.raises(ValueError, match=r"layer 0 \(Linear\) produced no output since the "
                                             r"last penalty\(\) call"):
            nsr.penalty(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"needs a previous penalty\(labels\) call"):
            nsr.layer_variances()


def test_nsr_loss_bad_inputs():
    with pytest.raises(ValueError, match=r"labels has 2 entries but features has a batch of 3"):
        nsr_loss(torch.randn(3, 4), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"features must be \(N, D\) or \(N, C, \.\.\.\)"):
        nsr_loss(torch.randn(3), torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1; got 0"):
        nsr_loss(torch.randn(3, 4), torch.tensor([0, 0, 0]), 0)
