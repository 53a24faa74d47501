"""Neuron Steadiness Regularization (Fu, Du, Mao et al., "Neuron with Steady Response Leads to
Better Generalization", NeurIPS 2022). See docs/regularizers.md.

The penalty is the sum, over the chosen layers, neurons j and classes k present in the batch, of
the intra-class response variance

    var_jk = mean over samples i of class k of (z_ij - mu_jk)**2      (population variance),

times ``lam``. A neuron of a conv map (N, C, H, W) is a channel; its response to a sample is the
spatial mean of the channel. Class statistics come from one pass of segment sums of z and z**2
(``index_add``), shifted by the detached batch mean of each neuron to avoid cancellation. With
``queue_length > 0`` the last ``queue_length`` responses of each class (detached) join the
current batch in the class statistics through running float64 sums; only the current batch
carries gradient.
"""
from __future__ import annotations

import numbers
from typing import Iterable

import torch
from torch import nn


# --- validation ----------------------------------------------------------------------------

def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
    return int(num_classes)


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not float(lam) >= 0.0 \
            or float(lam) == float("inf"):
        raise ValueError(f"lam must be a finite real number >= 0; got {lam!r}")
    return float(lam)


def _check_queue_length(queue_length) -> int:
    if isinstance(queue_length, bool) or not isinstance(queue_length, numbers.Integral) \
            or queue_length < 0:
        raise ValueError(f"queue_length must be an integer >= 0; got {queue_length!r}")
    return int(queue_length)


def _check_labels(labels, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,); got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must have an integer dtype; got {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("labels is empty: NSR needs at least one sample")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); "
                         f"got values from {low} to {high}")


def _responses(features, where: str) -> torch.Tensor:
    """(N, D) responses: (N, D) as is; (N, C, *spatial) averaged over the spatial dims."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"{where} must be a torch.Tensor; got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"{where} must be (N, D) or (N, C, ...) with a batch dimension; "
                         f"got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{where} must be floating point; got dtype {features.dtype}")
    if features.dim() > 2:
        features = features.mean(dim=tuple(range(2, features.dim())))
    return features


def _check_batch(labels: torch.Tensor, responses: torch.Tensor, where: str) -> None:
    if responses.shape[0] != labels.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but {where} has a batch of "
                         f"{responses.shape[0]}")


# --- statistics ----------------------------------------------------------------------------

def _class_variances(responses: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     queue: "_ResponseQueue | None" = None):
    """Per-class population variance of each neuron, (K, D), and the per-class sample counts.

    One pass of segment sums over the batch; a `queue` adds its remembered responses through
    its running float64 sums, so it costs O(K·D), not O(K·queue_length·D).
    """
    if responses.dtype in (torch.float16, torch.bfloat16):
        responses = responses.float()  # half-precision sums of squares lose the variance
    shift = responses.detach().mean(dim=0)
    centred = responses - shift
    counts = torch.bincount(labels, minlength=num_classes).to(responses.dtype)
    sums = responses.new_zeros(num_classes, responses.shape[1]).index_add(0, labels, centred)
    squares = responses.new_zeros(num_classes, responses.shape[1]).index_add(
        0, labels, centred * centred)
    if queue is not None:
        # Shift the remembered sums by the same s: sum(b - s) = S1 - n s and
        # sum((b - s)**2) = S2 - 2 s S1 + n s**2, in float64 so the subtraction does not cancel.
        fill = queue.fill.to(torch.float64)[:, None]
        shift64 = shift.to(torch.float64)
        remembered_sums = queue.sums - fill * shift64
        remembered_squares = queue.squares - 2 * shift64 * queue.sums + fill * shift64**2
        sums = sums + remembered_sums.to(responses.dtype)
        squares = squares + remembered_squares.to(responses.dtype)
        counts = counts + queue.fill.to(responses.dtype)
    safe_counts = counts.clamp(min=1)[:, None]
    mean = sums / safe_counts
    return squares / safe_counts - mean * mean, counts


def _sum_over_present_classes(variances: torch.Tensor, labels: torch.Tensor,
                              num_classes: int) -> torch.Tensor:
    """Sum of the (K, D) variances over classes with a sample in the batch (no host sync)."""
    present = torch.bincount(labels, minlength=num_classes) > 0
    return torch.where(present[:, None], variances, torch.zeros_like(variances)).sum()


def nsr_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Batch-only NSR: sum over neurons and classes present of the intra-class variance.

    features: (N, D), or (N, C, ...) whose neurons are channels (spatial mean response).
    """
    num_classes = _check_num_classes(num_classes)
    _check_labels(labels, num_classes)
    responses = _responses(features, "features")
    _check_batch(labels, responses, "features")
    labels = labels.to(device=responses.device, dtype=torch.int64)
    variances, _ = _class_variances(responses, labels, num_classes)
    return _sum_over_present_classes(variances, labels, num_classes)


class _ResponseQueue:
    """Ring buffer of the last `length` detached responses of each class, with running sums.

    `sums`/`squares` (K, D, float64) track the sum and sum of squares of the stored responses;
    evicted rows are subtracted, so each push costs O(batch · D).
    """

    def __init__(self, num_classes: int, length: int, width: int, like: torch.Tensor):
        self.bank = like.new_zeros(num_classes, length, width)
        self.fill = torch.zeros(num_classes, dtype=torch.int64, device=like.device)
        self.head = torch.zeros(num_classes, dtype=torch.int64, device=like.device)
        self.sums = torch.zeros(num_classes, width, dtype=torch.float64, device=like.device)
        self.squares = torch.zeros_like(self.sums)

    def push(self, responses: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch; a class with more than `length` samples keeps its last ones."""
        num_classes, length, _ = self.bank.shape
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        counts = torch.bincount(labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
        skipped = (counts - length).clamp(min=0)  # oldest of the batch that do not fit
        keep = rank >= skipped[sorted_labels]
        classes = sorted_labels[keep]
        slots = ((self.head[sorted_labels] + rank - skipped[sorted_labels]) % length)[keep]
        incoming = responses.detach()[order][keep].to(self.bank.dtype)
        evicted = self.bank[classes, slots].to(torch.float64)  # zeros where a slot was empty
        self.bank[classes, slots] = incoming
        incoming = incoming.to(torch.float64)
        self.sums.index_add_(0, classes, incoming - evicted)
        self.squares.index_add_(0, classes, incoming * incoming - evicted * evicted)
        stored = counts - skipped
        self.head = (self.head + stored) % length
        self.fill = (self.fill + stored).clamp(max=length)


class NeuronSteadiness:
    """NSR on the outputs of `modules`: ``loss = ce + nsr.penalty(labels)`` (lam is inside).

    Forward hooks remember each module's latest output; penalty(labels) turns them into
    ``lam * sum of intra-class variances`` and (queue_length > 0) pushes them to the per-class
    queues. Use as a context manager or call remove() to unhook.
    """

    def __init__(self, modules: Iterable[nn.Module], lam: float, num_classes: int,
                 queue_length: int = 0):
        if isinstance(modules, nn.Module):
            modules = [modules]
        modules = list(modules)
        if not modules:
            raise ValueError("modules must contain at least one nn.Module")
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise ValueError(f"modules[{index}] must be an nn.Module; "
                                 f"got {type(module).__name__}")
        self.lam = _check_lam(lam)
        self.num_classes = _check_num_classes(num_classes)
        self.queue_length = _check_queue_length(queue_length)
        self.modules = modules
        self._outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._queues: list[_ResponseQueue | None] = [None] * len(modules)
        self._last_variances: list[torch.Tensor] | None = None
        self._handles = [module.register_forward_hook(self._recorder(index))
                         for index, module in enumerate(modules)]

    def _recorder(self, index: int):
        def record(module, inputs, output):
            self._outputs[index] = output
        return record

    def _layer_name(self, index: int) -> str:
        return f"layer {index} ({type(self.modules[index]).__name__})"

    def penalty(self, labels: torch.Tensor) -> torch.Tensor:
        """lam * sum over layers, neurons and classes in the batch of intra-class variance.

        Consumes the outputs recorded since the last call; validates everything before it
        changes any state.
        """
        if not self._handles:
            raise ValueError("NeuronSteadiness was removed: its hooks no longer record outputs")
        _check_labels(labels, self.num_classes)
        responses = []
        for index, output in enumerate(self._outputs):
            if output is None:
                raise ValueError(f"{self._layer_name(index)} produced no output since the last "
                                 "penalty() call: run the forward pass first")
            layer_responses = _responses(output, f"the output of {self._layer_name(index)}")
            _check_batch(labels, layer_responses, f"the output of {self._layer_name(index)}")
            queue = self._queues[index]
            if queue is not None and queue.bank.shape[2] != layer_responses.shape[1]:
                raise ValueError(f"{self._layer_name(index)} has {layer_responses.shape[1]} "
                                 f"neurons but its queue holds {queue.bank.shape[2]}")
            responses.append(layer_responses)

        total = None
        per_layer = []
        for index, layer_responses in enumerate(responses):
            layer_labels = labels.to(device=layer_responses.device, dtype=torch.int64)
            queue = self._queues[index]
            variances, _ = _class_variances(layer_responses, layer_labels, self.num_classes,
                                            queue)
            layer_total = _sum_over_present_classes(variances, layer_labels, self.num_classes)
            per_layer.append(layer_total.detach())  # no host sync until layer_variances()
            total = layer_total if total is None else total + layer_total.to(total.device)

        if self.queue_length > 0:
            for index, layer_responses in enumerate(responses):
                if self._queues[index] is None:
                    self._queues[index] = _ResponseQueue(self.num_classes, self.queue_length,
                                                         layer_responses.shape[1],
                                                         layer_responses.detach())
                self._queues[index].push(
                    layer_responses, labels.to(device=layer_responses.device, dtype=torch.int64))
        self._outputs = [None] * len(self.modules)
        self._last_variances = per_layer
        return self.lam * total

    def layer_variances(self) -> torch.Tensor:
        """Per-layer aggregated intra-class variance (no lam) of the last penalty() call.

        The paper applies NSR to the layer where this is largest.
        """
        if self._last_variances is None:
            raise ValueError("layer_variances() needs a previous penalty(labels) call")
        return torch.stack([value.to(device="cpu", dtype=torch.float64)
                            for value in self._last_variances])

    def queue_contents(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(bank (K, L, D), fill (K,)) of one layer's queue, or None before the first push."""
        queue = self._queues[layer]
        return None if queue is None else (queue.bank.clone(), queue.fill.clone())

    def remove(self) -> None:
        """Unhook every module and drop the recorded outputs (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = [None] * len(self.modules)

    def __enter__(self) -> "NeuronSteadiness":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
