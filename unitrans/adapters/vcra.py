"""VCRA: vector-based cross-modal random matrix adaptation (UniTrans §3.2, eq. 3-4)."""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans import injection
from unitrans.adapters import VCRAOptions
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
    * ``A x`` is computed once per input and pair: q, k and v of one attention read the same input, and the
      forward hooks of their linears find it in a one-entry cache keyed on the input tensor object, the
      version counter of A and the grad mode. The scalings fold into ``B`` (``s·diag(λb) B diag(λa)``, an
      ``(d_out, r)`` matrix), so a point costs one ``F.linear`` of ``A x`` and no full-size elementwise work; k
      and v sharing their λ pair and input get one update computed once; the three slices of a fused qkv get one
      ``F.linear`` with their folded ``B`` stacked.

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
        # pair key -> [(x, state, A x)], most recent first; ("out", scaling key) -> (x, state, update);
        # ("folded" | "stacked", ...) -> (parameter state, matrix)
        self._cache: dict = {}
        self._kv_shared: set[str] = set()  # scaling keys used by more than one point (k and v of an attention)
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
        users: dict[str, int] = {}
        for p in points:
            users[self._scaling_of[p.id]] = users.get(self._scaling_of[p.id], 0) + 1
        self._kv_shared = {sk for sk, n in users.items() if n > 1}
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
    def _project(self, key: str, x: torch.Tensor, d_in: int) -> torch.Tensor:
        """``A x`` for the pair ``key``, from a small per-pair cache of recent inputs: q, k and v of one attention
        read one input; the cross-attention k and v of every fusion layer read the same image tokens (one
        ``A x`` for all layers when the pair is shared); QASN reads each fusion block's input, which is also that
        block's self-attention input. Entries match on the input tensor object, A's version and the grad mode."""
        a = self.pair(key)[0]
        state = (a._version, torch.is_grad_enabled(), d_in)
        entries = self._cache.setdefault(key, [])
        for i, (cx, cstate, cax) in enumerate(entries):
            if cx is x and cstate == state:
                if i:  # most recently used first
                    entries.insert(0, entries.pop(i))
                return cax
        ax = F.linear(x, a[:, :d_in].to(x.dtype))  # (..., r)
        entries.insert(0, (x, state, ax))
        # Under gradient checkpointing only q, k, v of one call share (a recomputed block must save what it saved)
        del entries[self.CACHE_INPUTS if self.reuse_across_calls else 1:]
        return ax

    def projector(self, modality: str):
        """``x, d_in -> A[:, :d_in] x`` through the cache of the pair that serves ``modality`` (QASN calls it on
        the fusion blocks' inputs), or ``None`` when no pair is shared with that modality."""
        if self.share == "none" or not self.reuse_across_calls:
            return None
        key = next((k for k, mods in self.pair_modalities.items() if modality in mods), None)
        return None if key is None else (lambda x, d_in: self._project(key, x, d_in))

    def _folded_b(self, p: InjectionPoint) -> torch.Tensor:
        """``s · diag(λb) B diag(λa)`` of a point, ``(d_out, r)``: the scalings act on the small matrix, never on
        a ``(..., d_out)`` activation (no full-size multiply in forward, nothing full-size saved for backward).
        Cached until a parameter changes, the grad mode changes or a backward pass runs through it: a training
        step runs the text encoder several times (ITC, ITM positives, ITM negatives) and every run reuses the one
        folded matrix; the next micro-batch of an accumulation (same parameters, graph freed) folds afresh."""
        sk = _safe(self._scaling_of[p.id])
        key, state = ("folded", self._pair_of[p.id], sk), self._params_state(p)
        hit = self._cached(key, state)
        if hit is not None:
            return hit
        b = self.pair(self._pair_of[p.id])[1][: p.out_features]
        folded = b * self.lambda_a[sk] * (self.lambda_b[sk] * self.scale[p.modality])[:, None]
        return self._remember(key, state, folded)

    def _cached(self, key, state) -> torch.Tensor | None:
        """A matrix cached under ``key`` for exactly this parameter ``state`` (never under gradient checkpointing)."""
        hit = self._cache.get(key) if self.reuse_across_calls else None
        return hit[1] if hit is not None and hit[0] == state else None

    def _remember(self, key, state, tensor: torch.Tensor) -> torch.Tensor:
        """Cache ``tensor`` under ``key`` until the parameters change or backward runs through it; returns it."""
        if self.reuse_across_calls:
            self._cache[key] = (state, tensor)
            if tensor.requires_grad:
                tensor.register_hook(self._forget(key, tensor))
        return tensor

    def _forget(self, key, tensor: torch.Tensor):
        """A gradient hook that drops ``key`` from the cache once backward has run through ``tensor`` (its graph
        is freed then, so it must not be reused). The hook holds neither the tensor nor the adapter: a tensor
        whose own hook refers to it is a cycle through the autograd graph that Python's collector cannot see, and
        every step would leak its graph."""
        ident, owner = id(tensor), weakref.ref(self)

        def hook(grad):
            adapter = owner()
            entries = adapter._cache if adapter is not None else {}
            hit = entries.get(key)
            if hit is not None and id(hit[-1]) == ident:
                del entries[key]
            return None

        return hook

    def _params_state(self, p: InjectionPoint) -> tuple:
        a, b = self.pair(self._pair_of[p.id])
        sk = _safe(self._scaling_of[p.id])
        return (a._version, b._version, self.lambda_a[sk]._version, self.lambda_b[sk]._version,
                self.scale[p.modality]._version, torch.is_grad_enabled())

    def _delta_fn(self, p: InjectionPoint):
        pair, sk, d_in = self._pair_of[p.id], self._scaling_of[p.id], p.in_features
        reuse = sk in self._kv_shared  # k and v of one attention read one input and share λ: equal updates

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
            if reuse:
                hit = self._cache.pop(("out", sk), None)
                if hit is not None and hit[0] is x and hit[1] == (pair, d_in, self._params_state(p)):
                    return hit[2]
            ax = self._project(pair, x, d_in)  # (..., r), shared by q, k, v
            out = F.linear(ax, self._folded_b(p).to(x.dtype))
            if reuse:
                self._cache[("out", sk)] = (x, (pair, d_in, self._params_state(p)), out)
            return out

        return delta

    def _fused_delta_fn(self, group: list[InjectionPoint]):
        """One update for every row of a fused linear (BLIP's vision qkv): ``A x`` once, then one ``F.linear``
        with the points' folded ``B`` stacked in row order (shared k/v scalings folded once)."""
        group = sorted(group, key=lambda p: p.out_slice.start)
        pair, d_in = self._pair_of[group[0].id], group[0].in_features

        key = ("stacked", group[0].id)

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., sum of d_out)
            state = tuple(self._params_state(p) for p in group)
            w = self._cached(key, state)
            if w is None:  # (d_out_total, r)
                w = self._remember(key, state, torch.cat([self._folded_b(p) for p in group]))
            return F.linear(self._project(pair, x, d_in), w.to(x.dtype))

        return delta

    def clear_cache(self) -> None:
        self._cache.clear()

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
