"""BLIP's sub-block injection points (``vision.ffn``, ``text.ffn``, ``fusion.ffn``, ``fusion.query``, ``decoder.*``),
for adapters that add a small network beside a sub-block instead of updating a weight (UniAdapter).

Where UniAdapter (Lu et al. 2023; its BLIP code, ``models/vit.py`` ``Block.forward`` and ``models/med.py``
``BertLayer.forward``) reads and writes:

* ViT layer (pre-norm): the adapter reads the residual stream after self-attention (the input of ``norm2``) and its
  output is added to the MLP's output, before the residual add. Here: recorded at ``layer_norm2``'s input, added
  to ``mlp``'s output.
* BERT layer, text-only pass: it reads the feed-forward block's input (the attention output) and its output is added
  to the layer output, *after* ``BertOutput``'s residual add and LayerNorm (``layer_output + adapt_x``). Here:
  recorded at ``output``'s second argument (``input_tensor``), added to ``output``'s output.
* BERT layer, fused pass (``mode='multimodal'``): the text branch reads the self-attention output, i.e. the query
  of the cross-attention ("query residual"), and the cross-modal branch reads the cross-attention output (the
  feed-forward input); both are added to the layer output. Here: ``fusion.query`` recorded at ``crossattention``'s
  input, ``fusion.ffn`` at ``output``'s second argument, both added to ``output``'s output.

A point's input is recorded by a forward pre-hook that exists only while an adapter uses the point (``start()``),
and released when the adapter reads it. Which pass a BERT stack is in is recorded by pre-hooks on its layers
(:class:`PassProbe`, shared with the pass-dependent linear points ``fusion.self.*``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from unitrans.interfaces import BlockPoint


class _Started:
    """Reference-counted forward pre-hooks: installed on the first ``start()``, removed after the last stop."""

    def __init__(self, modules: list[nn.Module], hook: Callable, with_kwargs: bool = False):
        self.modules, self.hook, self.with_kwargs = modules, hook, with_kwargs
        self.users, self.handles = 0, []

    def start(self) -> Callable[[], None]:
        if self.users == 0:
            self.handles = [m.register_forward_pre_hook(self.hook, with_kwargs=self.with_kwargs) for m in self.modules]
        self.users += 1
        stopped = []

        def stop() -> None:
            if stopped:
                return
            stopped.append(True)
            self.users -= 1
            if self.users == 0:
                for h in self.handles:
                    h.remove()
                self.handles = []

        return stop


class PassProbe(_Started):
    """Which pass a BERT stack is in: ``"fused"`` while a layer runs with image tokens (as the fusion network),
    ``"text"`` while it runs without. A forward pre-hook on each layer records it before any of the layer's linears
    run (it sees the layer's ``encoder_hidden_states``); the hooks exist only while a point that asks the pass is in
    use (reference-counted ``start()``). Gradient checkpointing recomputes a layer's ``forward`` without the layer's
    own hooks: the backbone's checkpoint ``context_fn`` then replays the pass recorded when the layer first ran
    (``unitrans_blip.backbone._replay_passes``)."""

    def __init__(self, layers):
        super().__init__(list(layers), self._record, with_kwargs=True)
        self.current = "text"

    def _record(self, module, args, kwargs):
        image_tokens = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        self.current = "text" if image_tokens is None else "fused"

    def __call__(self) -> str:
        return self.current


class InputRecorder(_Started):
    """The input of one sub-block (argument ``index`` of ``module``'s call), recorded while started."""

    def __init__(self, module: nn.Module, index: int, probe: PassProbe | None = None):
        super().__init__([module], self._record)
        self.index, self.probe, self.value = index, probe, None

    def _record(self, module, args):
        self.value = args[self.index]

    def acting(self, mode: str | None) -> bool:
        """Whether a point of ``mode`` (``None``: every pass) acts in the call running now."""
        return mode is None or (self.probe is not None and self.probe.current == mode)

    def read(self, mode: str | None) -> torch.Tensor | None:
        """The recorded input, released, if a point of ``mode`` acts now; else ``None``."""
        if not self.acting(mode):
            return None
        value, self.value = self.value, None
        return value

    def start(self) -> Callable[[], None]:
        stops = [super().start()] + ([self.probe.start()] if self.probe is not None else [])

        def stop() -> None:
            self.value = None
            for s in stops:
                s()

        return stop


def _block(name: str, layer: int, modality: str, output: nn.Module, recorder: InputRecorder, mode: str | None,
           width: int, group: str) -> BlockPoint:
    return BlockPoint(name, layer, modality, output, None, width, width, group, None,
                      read=lambda: recorder.read(mode), acting=lambda: recorder.acting(mode), start=recorder.start)


def vision_blocks(layers) -> list[BlockPoint]:
    """``vision.ffn`` of every ViT layer: reads ``layer_norm2``'s input, adds to ``mlp``'s output."""
    pts = []
    for i, layer in enumerate(layers):
        d = layer.layer_norm2.normalized_shape[0]
        pts.append(_block("vision.ffn", i, "V", layer.mlp, InputRecorder(layer.layer_norm2, 0), None, d,
                          f"vision.{i}.ffn_in"))
    return pts


def bert_blocks(layers, probe: PassProbe, prefix: str, cross_prefix: str, modality: str, cross_modality: str,
                text_pass: bool = True) -> list[BlockPoint]:
    """Per BERT layer: ``{prefix}.ffn`` (text-only pass; with ``text_pass``), and, where the layer has
    cross-attention, ``{cross_prefix}.ffn`` and ``{cross_prefix}.query`` (fused pass). All add to the layer
    output (``output``'s output, after its LayerNorm, where UniAdapter adds). ``probe``: the stack's pass probe."""
    pts = []
    for i, layer in enumerate(layers):
        d = layer.output.LayerNorm.normalized_shape[0]
        ffn_in = InputRecorder(layer.output, 1, probe)  # BertOutput(intermediate_output, input_tensor)
        if text_pass:
            pts.append(_block(f"{prefix}.ffn", i, modality, layer.output, ffn_in, "text", d, f"{prefix}.{i}.ffn_in"))
        if hasattr(layer, "crossattention"):
            pts.append(_block(f"{cross_prefix}.query", i, cross_modality, layer.output,
                              InputRecorder(layer.crossattention, 0, probe), "fused", d, f"{cross_prefix}.{i}.query"))
            pts.append(_block(f"{cross_prefix}.ffn", i, cross_modality, layer.output, ffn_in, "fused", d,
                              f"{cross_prefix}.{i}.ffn_in"))
    return pts
