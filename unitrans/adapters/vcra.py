"""VCRA: vector-based cross-modal random matrix adaptation (UniTrans §3.2, eq. 3-4)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from unitrans import injection
from unitrans.adapters import VCRAOptions
from unitrans.adapters.lowrank import InputCache, folded_product, project
from unitrans.adapters.passes import refuse_pass_dependent_merge, split_passes
from unitrans.interfaces import Adapter, InjectionPoint, SharedProjection

_ENCODER_OF = {"V": "vision", "T": "text", "C": "text", "D": "decoder"}  # share="encoder": ViT / BERT / decoder


def _safe(key: str) -> str:
    return key.replace(".", "_")


def _whole_module(group: list[InjectionPoint]) -> InjectionPoint | None:
    """For slices of one fused linear that tile all its rows with one modality, a point covering the
    whole linear (the hub then adds one update); otherwise ``None``."""
    if len(group) < 2 or any(p.out_slice is None for p in group):
        return None
    p0, rows = group[0], sorted((p.out_slice.start, p.out_slice.stop) for p in group)
    if rows[0][0] != 0 or rows[-1][1] != p0.module.out_features or any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        return None
    if len({(p.modality, p.in_features) for p in group}) != 1:
        return None
    return InjectionPoint(p0.name, p0.layer, p0.modality, p0.module, None, p0.in_features, p0.module.out_features,
                          p0.input_group, p0.attention)


def _is_cross_attention(p: InjectionPoint) -> bool:
    """k and v of a cross-attention (``fusion.attn.*``, ``decoder.fusion.attn.*``): they read the image tokens."""
    return p.name.endswith(("fusion.attn.k", "fusion.attn.v"))


class VCRA(nn.Module, Adapter, SharedProjection):
    """Eq. 4: ``VCRA(x^M) = W0 x^M + s_M · diag(λb) B diag(λa) A x^M``, ``M ∈ {V, T, C}``.

    * One pair ``A (r, d_in_max)``, ``B (d_out_max, r)`` is shared by every targeted point of the vision encoder,
      the text encoder and the fusion layers (``share="all"``); the decoder (``D``) gets a pair of its own
      (paper §4.3.1). ``share="encoder"``: one pair per encoder, the ViT's and the BERT's (text and fusion, whose
      layers are the same BERT's; Table 8 "+scaling vectors"); ``share="modality"``: one pair per modality;
      ``share="none"``: one per point. A point of width ``(d_out, d_in)`` uses ``B[:d_out]`` and ``A[:, :d_in]``.
    * Every point has ``λa ∈ R^r`` (init 1) and ``λb ∈ R^{d_out}`` (init 0): the model equals the frozen
      backbone at init. With ``share_kv_scaling`` the k and v points of one attention share their λ pair
      (``"cross"``: only in cross-attention, whose k and v read the image tokens).
    * A point may act in one pass of its linear only (``fusion.self.*``: the text encoder's self-attention when
      it runs as the fusion network); targeted beside its mode-free twin (``text.attn.*``), each pass gets its
      own λ pair (``unitrans.adapters.passes``).
    * ``s`` is one learnable scalar per modality.
    * A and B are drawn from ``torch.Generator().manual_seed(projection_seed + pair index)`` on the CPU:
      equal on every machine and rank. ``A ~ N(0, 1/d_in)``, ``B ~ N(0, 1/r)`` (normal, as the paper says,
      scaled so ``B A x`` keeps the magnitude of ``x``).
    * ``A x`` is computed once per input and pair: the points of one attention that read one input (q, k, v;
      the slices of a fused qkv) compute their updates as one product in the first of their hooks, with the
      scalings folded into ``B`` (``s·diag(λb) B diag(λa)``, ``(d_out, r)``) inside it, so no full-size
      elementwise work runs and, when A trains, the only activation kept for backward is ``x`` itself
      (:mod:`unitrans.adapters.lowrank`); k and v sharing their λ pair are one head. No caller has to clear
      anything between steps.

    Parameter count with ``share="all"``, N points of width d, k/v scalings not shared:
    ``2·d·r + N·(d + r) + #modalities`` (the paper's Θ, plus the scalars ``s``).
    """

    # Recent inputs whose ``A x`` a pair keeps. A fusion block with every attention linear targeted projects five:
    # its input (self-attention q, k, v), the self-attention output-dense input, the cross-attention query
    # input, the image tokens and the cross-attention output-dense input; QASN then asks for the block input.
    CACHE_INPUTS = 6

    def __init__(self, options: VCRAOptions):
        super().__init__()
        o = self.options = options  # the validated spec fields (unitrans.adapters.VCRAOptions)
        self.targets, self.layers, self.rank = list(o.targets), o.layers, o.rank
        self.share, self.train_projections, self.projection_seed = o.share, o.train_projections, o.projection_seed
        self.share_kv_scaling = o.share_kv_scaling
        self.scale_init, self.lambda_a_init, self.lambda_b_init = o.scale_init, o.lambda_a_init, o.lambda_b_init
        self.A = nn.ParameterDict()  # pair key -> (r, d_in_max); empty when projections are frozen
        self.B = nn.ParameterDict()  # pair key -> (d_out_max, r)
        self.lambda_a = nn.ParameterDict()  # scaling key -> (r,)
        self.lambda_b = nn.ParameterDict()  # scaling key -> (d_out,)
        self.scale = nn.ParameterDict()  # modality -> ()
        self._frozen_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.points: list[InjectionPoint] = []
        self._pair_of: dict[str, str] = {}  # point id -> pair key
        self._scaling_of: dict[str, str] = {}  # point id -> scaling key
        self._ax_caches: dict[str, InputCache] = {}  # pair key -> A x of recent inputs (see the forward section)
        self._pending = None  # (group ids, x, state, {point id: update}): the rest of one attention call's updates
        self.pair_modalities: dict[str, set[str]] = {}

    # ---- structure -------------------------------------------------------------------------------------------
    def pair_key(self, p: InjectionPoint) -> str:
        if self.share == "all":
            return "decoder" if p.modality == "D" else "shared"
        if self.share == "encoder":
            return _ENCODER_OF.get(p.modality, p.modality)
        if self.share == "modality":
            return p.modality
        return p.id

    def scaling_key(self, p: InjectionPoint) -> str:
        shared = self.share_kv_scaling is True or (self.share_kv_scaling == "cross" and _is_cross_attention(p))
        if shared and p.attention is not None and p.role in ("k", "v"):
            return f"{p.attention}.kv"
        return p.id

    def attach(self, points: Sequence[InjectionPoint]) -> None:
        if self.points:
            raise RuntimeError("VCRA.attach called twice")
        points = split_passes(points)
        pairs: dict[str, list[InjectionPoint]] = {}
        for p in points:
            pairs.setdefault(self.pair_key(p), []).append(p)
        device = points[0].module.weight.device if points else torch.device("cpu")
        for index, key in enumerate(sorted(pairs)):
            pts = pairs[key]
            d_in, d_out = max(p.in_features for p in pts), max(p.out_features for p in pts)
            a, b = self.draw_pair(self.projection_seed, index, self.rank, d_in, d_out)
            self.pair_modalities[key] = {p.modality for p in pts}
            if self.train_projections:
                self.A[_safe(key)] = nn.Parameter(a.to(device))
                self.B[_safe(key)] = nn.Parameter(b.to(device))
            else:
                self._frozen_pairs[key] = (a.to(device), b.to(device))
        for p in points:
            sk = self.scaling_key(p)
            if _safe(sk) not in self.lambda_a:
                self.lambda_a[_safe(sk)] = nn.Parameter(torch.full((self.rank,), float(self.lambda_a_init), device=device))
                self.lambda_b[_safe(sk)] = nn.Parameter(torch.full((p.out_features,), float(self.lambda_b_init), device=device))
            elif self.lambda_b[_safe(sk)].shape[0] != p.out_features:
                raise ValueError(f"VCRA: points sharing scalings '{sk}' have different output widths")
            if p.modality not in self.scale:
                self.scale[p.modality] = nn.Parameter(torch.tensor(float(self.scale_init), device=device))
            self._pair_of[p.id] = self.pair_key(p)
            self._scaling_of[p.id] = sk
            self.points.append(p)
        by_module: dict[int, list[InjectionPoint]] = {}
        for p in points:
            by_module.setdefault(id(p.module), []).append(p)
        for group in by_module.values():
            whole = _whole_module(group) if len({self._pair_of[p.id] for p in group}) == 1 else None
            if whole is not None:  # a fused qkv whose rows are all targeted: one F.linear for the three slices
                injection.add_delta(self, whole, self._fused_delta_fn(group))
            else:
                for p in group:
                    injection.add_delta(self, p, self._delta_fn(p))

    @staticmethod
    def draw_pair(seed: int, index: int, rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair ``index`` of a VCRA with this seed: ``A (rank, d_in)``, ``B (d_out, rank)``, on the CPU."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
        a = torch.randn(rank, d_in, generator=g, device="cpu") / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=g, device="cpu") / math.sqrt(rank)
        return a, b

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of a pair: trainable parameters or frozen tensors."""
        if self.train_projections:
            return self.A[_safe(key)], self.B[_safe(key)]
        return self._frozen_pairs[key]

    def shared_pair(self, modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pair that serves ``modality`` (QASN reuses the fusion pair), or ``None`` (``share = "none"``)."""
        for key, mods in self.pair_modalities.items():
            if modality in mods and (self.share != "none"):
                return self.pair(key)
        return None

    # ---- forward ---------------------------------------------------------------------------------------------
    # Nothing here needs a call from the caller to stay correct (no ``clear_cache`` after backward): the points of
    # one attention that read one input compute their updates together, in the first of their hooks, and hand the
    # others their share within that attention's call; ``A x`` is shared across calls (the image tokens of every
    # fusion layer, QASN's block inputs) only through an :class:`InputCache`, which drops an entry when its input
    # dies or backward runs through it. Nothing folded is cached: the scalings fold inside the product.

    def _ax_cache(self, pair: str) -> InputCache:
        if pair not in self._ax_caches:
            self._ax_caches[pair] = InputCache(self.CACHE_INPUTS)
        return self._ax_caches[pair]

    def _project(self, key: str, x: torch.Tensor, d_in: int) -> torch.Tensor:
        """``A[:, :d_in] x`` (``(..., r)``) for the pair ``key``; across calls (``reuse_across_calls``) from the
        pair's :class:`InputCache`: the cross-attention k and v of every fusion layer read the same image tokens,
        and QASN reads each fusion block's input, which that block's self-attention projected."""
        a = self.pair(key)[0]
        if not self.reuse_across_calls:  # gradient checkpointing: a recomputed block must save what it saved
            return project(x, a, d_in)
        cache, state = self._ax_cache(key), (a._version, torch.is_grad_enabled(), d_in)
        hit = cache.get(x, state)
        return hit if hit is not None else cache.put(x, state, project(x, a, d_in, shared=True))

    def projector(self, modality: str):
        """``x, d_in -> A[:, :d_in] x`` through the cache of the pair that serves ``modality`` (QASN calls it on
        the fusion blocks' inputs), or ``None`` when no pair is shared with that modality."""
        if self.share == "none":
            return None
        key = next((k for k, mods in self.pair_modalities.items() if modality in mods), None)
        return None if key is None else (lambda x, d_in: self._project(key, x, d_in))

    def _head(self, p: InjectionPoint):
        sk = _safe(self._scaling_of[p.id])
        return self.lambda_a[sk], self.lambda_b[sk], self.scale[p.modality]

    def _group_update(self, pts: list[InjectionPoint], x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The updates of ``pts`` (one pair, one input ``x (..., d_in)``) as one product ``(..., Σ d_out)``: the
        row blocks are the distinct scalings ``rows`` indexes (k and v sharing theirs are one head)."""
        pair = self._pair_of[pts[0].id]
        a, b = self.pair(pair)
        heads, seen = [], {}
        for p in pts:
            key = (self._scaling_of[p.id], p.modality)
            if key not in seen:
                seen[key] = len(heads)
                heads.append(self._head(p))
        ax = self._project(pair, x, pts[0].in_features)
        return folded_product(ax, x, a if self.train_projections else None, b, heads, rows)

    def _heads_of(self, pts: list[InjectionPoint]) -> list[int]:
        """For each point, the index of its head among the distinct (scaling, modality) pairs, in order."""
        seen: dict = {}
        return [seen.setdefault((self._scaling_of[p.id], p.modality), len(seen)) for p in pts]

    def _call_group(self, p: InjectionPoint) -> list[InjectionPoint]:
        """The points of this adapter and pair that read ``p``'s input within one call: q, k, v of one
        self-attention, k and v of one cross-attention (same attention and input group), or slices of one fused
        linear; ``p`` included, in forward order. Points of one linear that act in different passes
        (``text.attn.q`` beside ``fusion.self.q``) are never in one group: each pass computes its own."""

        def together(q: InjectionPoint) -> bool:
            one_call = q.module is p.module or (p.attention is not None and q.attention == p.attention
                                                  and q.input_group == p.input_group)
            return one_call and q.mode == p.mode and self._pair_of[q.id] == self._pair_of[p.id]

        return [q for q in self.points if together(q)]

    def _version_state(self, pts: list[InjectionPoint]) -> tuple:
        a, b = self.pair(self._pair_of[pts[0].id])
        vs = [torch.is_grad_enabled(), a._version, b._version]
        for p in pts:
            vs += [t._version for t in self._head(p)]
        return tuple(vs)

    def _delta_fn(self, p: InjectionPoint):
        group = self._call_group(p)
        heads = self._heads_of(group)
        rows = sorted(set(heads))
        widths = {h: q.out_features for h, q in zip(heads, group)}
        starts = {h: sum(widths[j] for j in rows[:rows.index(h)]) for h in rows}
        mine = heads[group.index(p)]
        ids = tuple(q.id for q in group)

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
            pending, self._pending = self._pending, None  # another point of this group computed it just now
            if pending is not None and pending[0] == ids and pending[1] is x and p.id in pending[3]:
                if pending[2] == self._version_state(group):
                    rest = pending[3]
                    out = rest.pop(p.id)
                    if rest:
                        self._pending = pending
                    return out
            out = self._group_update(group, x, rows)
            if len(group) == 1:
                return out
            parts = {q.id: out[..., starts[h]:starts[h] + widths[h]] for q, h in zip(group, heads) if q is not p}
            self._pending = (ids, x, self._version_state(group), parts)
            return out[..., starts[mine]:starts[mine] + widths[mine]]

        return delta

    def _fused_delta_fn(self, group: list[InjectionPoint]):
        """One update for every row of a fused linear (BLIP's vision qkv): ``A x`` once, then one product with
        the points' folded ``B`` stacked in row order (k and v sharing scalings fold once, used twice)."""
        group = sorted(group, key=lambda p: p.out_slice.start)
        rows = self._heads_of(group)

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., sum of d_out)
            self._pending = None
            return self._group_update(group, x, rows)

        return delta

    def clear_cache(self) -> None:
        """Drop what is cached (never needed for correctness: see the forward section)."""
        self._pending = None
        for cache in self._ax_caches.values():
            cache.clear()

    def delta_weight(self, point: InjectionPoint) -> torch.Tensor:
        a, b = self.pair(self._pair_of[point.id])
        sk = _safe(self._scaling_of[point.id])
        la, lb, s = self.lambda_a[sk], self.lambda_b[sk], self.scale[point.modality]
        d_in, d_out = point.in_features, point.out_features
        return s * lb[:, None] * (b[:d_out] @ (la[:, None] * a[:, :d_in]))  # (d_out, d_in)

    def merge(self) -> None:
        refuse_pass_dependent_merge("vcra", self.points)
        self.clear_cache()
        injection.merge(self, self.points, self.delta_weight)

    def unmerge(self) -> None:
        injection.unmerge(self, self.points, self.delta_weight)

    def modality_of_parameter(self, name: str) -> str:
        group, _, key = name.partition(".")
        if group == "scale":
            return key
        if group in ("A", "B"):
            mods = next((m for k, m in self.pair_modalities.items() if _safe(k) == key), set())
            return next(iter(mods)) if len(mods) == 1 else "shared"
        for p in self.points:
            if _safe(self._scaling_of[p.id]) == key:
                return p.modality
        return "shared"
