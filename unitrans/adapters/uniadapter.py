"""UniAdapter (Lu et al. 2023, arXiv:2302.06605): bottleneck adapters shared across modalities, on sub-block points."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans import fusion_context, injection
from unitrans.adapters import UniAdapterOptions
from unitrans.errors import UserError
from unitrans.interfaces import Adapter, BlockPoint, InjectionPoint

FRAME_KEY_POINT = "fusion.attn.k"  # where frame-aware attention acts: the cross-attention keys of the video tokens


def branch_of(point: InjectionPoint) -> str:
    """The up-projection a sub-block point uses: ``"V"`` (vision FFN), ``"T"`` (text FFN, and the query residual of a
    fused pass), ``"C"`` (the cross-modal FFN of a fused pass or of the decoder)."""
    if point.role == "query":
        return "T"
    return point.modality if point.modality in ("V", "T") else "C"


class Bottleneck(nn.Module):
    """One UniAdapter module (of one layer index): ``x (..., d) -> (..., d)``.

    ``h = dropout(ReLU(down(LN_in(x))))`` (``down``: d -> r, shared by every branch), then per branch
    ``V: up_V(h)``, ``T: up_T(h)``, ``C: LN_cross(up_C(h) + up_T(h))``, times ``scale``. With ``layer_norm = "out"``
    the LayerNorm acts on the scaled output instead of the input; ``"none"``: no LayerNorm.
    """

    def __init__(self, d: int, r: int, branches: set[str], options: UniAdapterOptions, device=None):
        super().__init__()
        self.layer_norm, self.scale, self.p = options.layer_norm, options.scale, options.dropout
        self.ln = nn.LayerNorm(d, device=device) if options.layer_norm != "none" else None
        self.down = nn.Linear(d, r, device=device)
        if "C" in branches:
            branches = branches | {"T"}  # the cross-modal branch adds the text up-projection
        self.up = nn.ModuleDict({b: nn.Linear(r, d, device=device) for b in sorted(branches)})
        self.ln_cross = nn.LayerNorm(d, device=device) if "C" in branches else None
        self.reset_parameters(options.init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """UniAdapter's retrieval script: down Kaiming-uniform (a = √5), the text up-projection zero, the vision and
        cross-modal up-projections N(0, 0.02²) (BERT's init, which runs over them), every bias 0; ``"zero"``: every
        up-projection zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        for branch, up in self.up.items():
            if branch == "T" or init == "zero":
                nn.init.zeros_(up.weight)
            else:
                nn.init.normal_(up.weight, std=0.02)
            nn.init.zeros_(up.bias)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        h = self.ln(x) if self.layer_norm == "in" else x
        h = F.dropout(F.relu(self.down(h)), p=self.p, training=self.training)  # (..., r)
        if branch == "C":
            up = self.ln_cross(self.up["C"](h) + self.up["T"](h))
        else:
            up = self.up[branch](h)
        up = up * self.scale
        return self.ln(up) if self.layer_norm == "out" else up


class UniAdapter(nn.Module, Adapter):
    """UniAdapter on BLIP: one :class:`Bottleneck` per layer index, shared by the vision, text and fusion (and
    decoder) layers of that index (its down-projection and input LayerNorm are shared; each branch has its own
    up-projection), as ``models/blip_retrieval.py`` builds ``self.adapters`` and hands the same list to the ViT and
    the BERT. Layers of one index but another width get a module of their own.

    It acts on sub-block points (:class:`~unitrans.interfaces.BlockPoint`): ``vision.ffn`` (``V``), ``text.ffn``
    (``T``, text-only pass), ``fusion.query`` (``T``: the query residual, reading the self-attention output of a fused
    pass) and ``fusion.ffn`` (``C``), ``decoder.query`` / ``decoder.ffn``; see ``unitrans_blip.blocks``.
    ``frame_aware_attention`` adds UniAdapter's parameter-free frame weighting of the cross-attention keys
    (:meth:`_frame_fn`).

    Parameters per module, all branches: ``4·d·r + r + 3·d`` (down, three up-projections, biases) ``+ 4·d`` (two
    LayerNorms): ``12 · (4·768·128 + 128 + 7·768) = 4,784,640`` on BLIP-base at r = 128 (the paper's 4.8M).
    It has a ReLU: there is no weight to merge it into, so ``merge`` and ``export`` are refused.
    """

    def __init__(self, options: UniAdapterOptions):
        super().__init__()
        o = self.options = options  # the validated spec fields (unitrans.adapters.UniAdapterOptions)
        self.targets = list(o.targets) + ([FRAME_KEY_POINT] if o.frame_aware_attention else [])
        self.layers, self.rank = o.layers, o.rank
        self.layer = nn.ModuleDict()  # layer key ("3", or "3_384" for a second width) -> Bottleneck
        self.points: list[InjectionPoint] = []
        self._users: dict[str, set[str]] = {}  # parameter prefix -> modalities of the points that use it
        self._stops: list = []

    def accepts(self, point: InjectionPoint) -> bool:
        return isinstance(point, BlockPoint) or (self.options.frame_aware_attention and point.name == FRAME_KEY_POINT)

    # ---- structure -------------------------------------------------------------------------------------------
    def _layer_keys(self, blocks: Sequence[BlockPoint]) -> dict[str, str]:
        """Point id -> module key: the layer index, or ``"<layer>_<width>"`` for the widths after a layer's first."""
        widths: dict[int, list[int]] = {}
        for p in blocks:
            widths.setdefault(p.layer, [])
            if p.in_features not in widths[p.layer]:
                widths[p.layer].append(p.in_features)
        return {p.id: str(p.layer) if widths[p.layer][0] == p.in_features else f"{p.layer}_{p.in_features}"
                for p in blocks}

    def attach(self, points: Sequence[InjectionPoint]) -> None:
        if self.points:
            raise RuntimeError("UniAdapter.attach called twice")
        blocks = [p for p in points if isinstance(p, BlockPoint)]
        keys = self._layer_keys(blocks)
        branches: dict[str, set[str]] = {}
        for p in blocks:
            branches.setdefault(keys[p.id], set()).add(branch_of(p))
        for key in sorted(branches, key=lambda k: (int(k.split("_")[0]), k)):
            p0 = next(p for p in blocks if keys[p.id] == key)
            device = next(p0.module.parameters()).device
            self.layer[key] = Bottleneck(p0.in_features, self.rank, branches[key], self.options, device)
        self._record_users(blocks, keys)
        by_module: dict[int, list[BlockPoint]] = {}
        for p in blocks:
            by_module.setdefault(id(p.module), []).append(p)
            self._stops.append(p.start())
        for group in by_module.values():  # one entry per module; it acts when any of its points does
            entry = dataclasses.replace(group[0], acting=lambda g=group: any(p.acts_now() for p in g))
            injection.add_delta(self, entry, self._block_fn(group, keys))
        for p in points:
            if not isinstance(p, BlockPoint):  # frame-aware attention on the cross-attention keys
                injection.add_delta(self, p, self._frame_fn(p))
                self._stops.append(fusion_context.request(p.module))
        self.points = list(points)

    def _record_users(self, blocks: Sequence[BlockPoint], keys: dict[str, str]) -> None:
        """Which modalities use each parameter group, for parameter accounting by modality."""
        for p in blocks:
            branch, key = branch_of(p), keys[p.id]
            used = ["ln", "down", f"up.{branch}"] + (["up.T", "ln_cross"] if branch == "C" else [])
            for part in used:
                self._users.setdefault(f"layer.{key}.{part}", set()).add(p.modality)

    # ---- forward ---------------------------------------------------------------------------------------------
    def _block_fn(self, group: list[BlockPoint], keys: dict[str, str]):
        """The update of every point on one module (BERT's ``output`` hosts ``text.ffn``, ``fusion.ffn`` and
        ``fusion.query``): the sum of the points that act in this call, each on its own recorded input."""
        plan = [(p, keys[p.id], branch_of(p)) for p in group]
        width = group[0].out_features

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: the module's own input, unused but for its shape
            total = None
            for p, key, branch in plan:
                inp = p.read()  # (..., d) the sub-block's input, or None in another pass
                if inp is None:
                    continue
                out = self.layer[key](inp, branch)
                total = out if total is None else total + out
            return total if total is not None else x.new_zeros(*x.shape[:-1], width)

        return delta

    def _frame_fn(self, point: InjectionPoint):
        """Frame-aware attention (UniAdapter, ``BertSelfAttention.forward``): the keys of frame t's tokens but its
        [CLS] are multiplied by ``w_t = T · softmax_t(sim_t / frame_temperature)``, with ``sim (B, T)`` the cosine of
        the pair's text and frame t (published by the backbone's ``fuse``; no gradient through ``w``). As an update:
        ``(w - 1) ⊙ (W x + b)``. Images and unimodal calls: nothing."""
        temperature = self.options.frame_temperature

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: video tokens (B, T*N, Dv) -> (B, T*N, D)
            sim = fusion_context.current_frame_similarity()
            if sim is None:
                return x.new_zeros(*x.shape[:-1], point.out_features)
            b, length = x.shape[:2]
            t = sim.shape[1]
            if sim.shape[0] != b or length % t:
                raise UserError(f"uniadapter.v1: frame-aware attention got {tuple(sim.shape)} text-frame "
                                f"similarities for {b} videos of {length} tokens")
            with torch.no_grad():
                w = t * torch.softmax(sim.float() / temperature, dim=1)  # (B, T)
                factor = torch.zeros(b, t, length // t, device=x.device, dtype=x.dtype)
                factor[:, :, 1:] = (w - 1).to(x.dtype)[:, :, None]  # each frame's [CLS] keeps its key
            keys = F.linear(x, point.module.weight, point.module.bias)  # (B, T*N, D)
            return keys * factor.reshape(b, length, 1)

        return delta

    # ---- what it cannot do -----------------------------------------------------------------------------------
    def delta_weight(self, point: InjectionPoint) -> torch.Tensor:
        raise UserError(self._no_merge())

    def merge(self) -> None:
        raise UserError(self._no_merge())

    def unmerge(self) -> None:
        """Nothing to undo: a UniAdapter is never merged."""

    @staticmethod
    def _no_merge() -> str:
        return ("uniadapter.v1 is a bottleneck network with a ReLU beside the blocks, not a weight update: it cannot "
                "be merged into the backbone's weights, so merge and export are refused. Keep it as an adapter "
                "checkpoint (adapter.safetensors) and load it with `unitrans run` or unitrans.load_adapter.")

    def detach(self) -> None:
        super().detach()
        for stop in self._stops:
            stop()
        self._stops = []

    def modality_of_parameter(self, name: str) -> str:
        prefix = name.rsplit(".", 1)[0]  # "layer.3.up.V"
        users = self._users.get(prefix, set())
        return next(iter(users)) if len(users) == 1 else "shared"
