"""Parameter lists shaped like real models, in three size profiles.

An optimizer step's cost depends on how the parameters are split into tensors (per-tensor launch
and Python overhead) as much as on their total size, so the workloads reproduce real models'
lists of shapes rather than one big tensor. torchvision and transformers are not dependencies:
the shapes are written out here from the models' definitions.

Profiles: "full" (the real sizes; GPU), "cpu" (GPT-2 shrunk so that the CPU suite finishes in a
few minutes; the other workloads keep their real size) and "smoke" (CI: tiny tensors, and fewer
of them in the synthetic cases, since the per-tensor reference backend costs per tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PROFILES = ("full", "cpu", "smoke")


@dataclass(frozen=True)
class Workload:
    name: str    # stable id used in test ids and in the JSON
    label: str   # what the report prints
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def resnet_shapes(width: int = 64, num_classes: int = 1000, blocks_per_stage=(3, 4, 6, 3)) -> list[tuple[int, ...]]:
    """torchvision's BasicBlock ResNet parameter shapes, in named_parameters() order.

    Stages of blocks_per_stage blocks with width, 2*width, 4*width, 8*width channels; the first
    block of stages 2-4 has a 1x1 strided downsample conv + BN. The defaults are
    torchvision.models.resnet34: 21,797,672 parameters in 110 tensors.
    """
    shapes: list[tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]  # conv1, bn1
    in_channels = width
    for stage, blocks in enumerate(blocks_per_stage):
        channels = width * 2**stage
        for block in range(blocks):
            shapes += [(channels, in_channels, 3, 3), (channels,), (channels,),   # conv1, bn1
                       (channels, channels, 3, 3), (channels,), (channels,)]      # conv2, bn2
            if block == 0 and stage > 0:
                shapes += [(channels, in_channels, 1, 1), (channels,), (channels,)]  # downsample
            in_channels = channels
    shapes += [(num_classes, in_channels), (num_classes,)]  # fc
    return shapes


def gpt2_shapes(n_layer: int = 12, d_model: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> list[tuple[int, ...]]:
    """HuggingFace GPT2Model's parameter shapes (the LM head is tied to wte).

    The defaults are GPT-2 small: 124,439,808 parameters in 148 tensors.
    """
    shapes: list[tuple[int, ...]] = [(vocab, d_model), (n_ctx, d_model)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [(d_model,), (d_model,),                              # ln_1
                   (d_model, 3 * d_model), (3 * d_model,),              # attn.c_attn (Conv1D)
                   (d_model, d_model), (d_model,),                      # attn.c_proj
                   (d_model,), (d_model,),                              # ln_2
                   (d_model, 4 * d_model), (4 * d_model,),              # mlp.c_fc
                   (4 * d_model, d_model), (d_model,)]                  # mlp.c_proj
    shapes += [(d_model,), (d_model,)]  # ln_f
    return shapes


def workloads(profile: str) -> list[Workload]:
    """The four workloads of a size profile, smallest first."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (expected one of {PROFILES})")
    if profile == "smoke":
        resnet = Workload("resnet", "ResNet-10 layout (width 8, 10 classes)", tuple(resnet_shapes(8, 10, (1, 1, 1, 1))))
        gpt2 = Workload("gpt2", "GPT-2 (1 layer, d=64, vocab 512)", tuple(gpt2_shapes(1, 64, 512, 64)))
        tiny = Workload("tiny", "30 tensors x 1k", ((1000,),) * 30)
        equal = Workload("equal", "16 tensors x 2k", ((2000,),) * 16)
    else:
        resnet = Workload("resnet", "ResNet-34", tuple(resnet_shapes()))
        if profile == "full":
            gpt2 = Workload("gpt2", "GPT-2 small", tuple(gpt2_shapes()))
        else:
            gpt2 = Workload("gpt2", "GPT-2 (6 layers, d=256, vocab 8192)", tuple(gpt2_shapes(6, 256, 8192, 512)))
        tiny = Workload("tiny", "2000 tensors x 1k", ((1000,),) * 2000)
        equal = Workload("equal", "64 tensors x 125k (8M)", ((125_000,),) * 64)
    return sorted([tiny, equal, gpt2, resnet], key=lambda w: w.numel)
