"""The abstract interfaces every component implements.

The folder is the interface, the file the implementation: ``unitrans/adapters/`` declares builders,
``unitrans/adapters/vcra.py`` implements VCRA. Helpers that several implementations use are free functions in
``unitrans/injection.py``; there is no implementation inheritance beyond these declarations.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # torch is imported lazily so `unitrans list` / `validate` stay light
    from pathlib import Path

    import torch
    from torch import nn

MODALITIES = {"V": "vision", "T": "text", "C": "cross-modal (fusion)", "D": "decoder"}


@dataclass(eq=False)
class InjectionPoint:
    """One place an adapter can act: the rows ``out_slice`` of the frozen linear ``module``.

    Attributes:
        name: layer-free dotted name that globs match, e.g. ``"vision.attn.q"``.
        layer: index of the transformer layer.
        modality: ``"V"``, ``"T"``, ``"C"`` (fusion / cross-attention) or ``"D"`` (decoder).
        module: the frozen ``nn.Linear`` computing this point (for a fused qkv, the whole fused linear).
        out_slice: the output rows of ``module`` that are this point (``None``: all of them).
        input_group: points with the same group read the same input tensor (q, k, v of one attention), so an
            adapter may compute ``A x`` once for all of them.
        attention: id of the attention block the point belongs to (k and v of one attention may share scalings).
        mode: ``None``: the point acts in every call of its linear. ``"fused"`` / ``"text"``: only in the passes of
            that kind (a BERT layer run with image tokens, i.e. as the fusion network, or without); such points sit
            on the same linears as mode-free ones (BLIP's ``fusion.self.*`` on ``text.attn.*``'s linears).
        current_pass: the backbone's probe that names the pass its encoder is in (``"fused"`` or ``"text"``);
            set together with ``mode``.
        start: for a point that needs the backbone to record something while it is in use (the pass a layer runs
            in, a sub-block's input): starts the recording (forward pre-hooks) and returns the function that stops
            it. The hook hub calls it when an update is added and the stop function when the update is removed, so
            a backbone runs no extra hook while nothing uses such a point.
    """

    name: str
    layer: int
    modality: str
    module: "nn.Linear"
    out_slice: slice | None
    in_features: int
    out_features: int
    input_group: str
    attention: str | None = None
    mode: str | None = None
    current_pass: Callable[[], str] | None = field(default=None, repr=False)
    start: "Callable[[], Callable[[], None]] | None" = field(default=None, repr=False)

    def acts_now(self) -> bool:
        """Whether the point's update applies in the call of its linear that is running now."""
        return self.mode is None or self.current_pass is None or self.current_pass() == self.mode

    @property
    def id(self) -> str:
        """Unique id, e.g. ``"vision.3.attn.q"`` (the layer index follows the first dotted part)."""
        head, _, rest = self.name.partition(".")
        return f"{head}.{self.layer}.{rest}" if rest else f"{head}.{self.layer}"

    @property
    def role(self) -> str:
        """Last part of the name: ``q``, ``k``, ``v``, ``out``, ``fc1``, ..."""
        return self.name.rsplit(".", 1)[-1]


@dataclass(eq=False)
class BlockPoint(InjectionPoint):
    """A sub-block of a layer (its feed-forward block, or the query of its cross-attention), for adapters that add a
    small network beside it instead of updating a weight (bottleneck adapters: UniAdapter).

    The update reads the sub-block's input ``read()`` ``(..., in_features)``, not the hooked module's own input,
    and is added to the output of ``module`` ``(..., out_features)`` through the same hub as a linear point (a
    forward hook on ``module`` adds ``fn(x)``; ``fn`` calls ``read()`` and ignores ``x``). ``read()`` gives
    ``None`` in a call in which the point does not act (a ``fusion.*`` point while BERT runs its text-only pass)
    and releases the recorded tensor otherwise; ``acting()`` says the same without releasing it. ``start()`` makes
    the backbone record the inputs (forward pre-hooks) and returns the function that stops it: adapters call it in
    ``attach`` and the stop function when they detach, so a backbone without a block adapter runs no extra hook.
    A block point has no weight to merge an update into: adapters on block points refuse ``merge``.
    """

    read: "Callable[[], torch.Tensor | None] | None" = field(default=None, repr=False)
    acting: Callable[[], bool] | None = field(default=None, repr=False)

    def acts_now(self) -> bool:
        """Whether the point's update applies in the call of its module that is running now."""
        return self.acting is None or self.acting()


def match_points(points: Sequence[InjectionPoint], patterns: Sequence[str], layers: Sequence[int] | None = None):
    """Points whose layer-free name matches any glob (``"vision.attn.*"``, ``"*.attn.q"``), in backbone order.

    Returns:
        (matched points, patterns that matched nothing)
    """
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(pt.name, p) for pt in points)]
    chosen = [
        pt
        for pt in points
        if any(fnmatch.fnmatchcase(pt.name, p) for p in patterns) and (layers is None or pt.layer in layers)
    ]
    return chosen, unmatched


#: The version of the backbone plugin contract (this module's capability interfaces). A backbone says which one it
#: was written against in ``contract_version``; the engine refuses another, naming both (docs/backbone_plugin.md).
CONTRACT = "2"


class Backbone(ABC):
    """A frozen pre-trained model, as a plugin provides it: its weights and its named injection points.

    What a task, a side network or ``export`` may ask of it beyond that is declared by the capability interfaces
    below (:class:`DualEncoder`, :class:`FusionNetwork`, :class:`FusionEncoder`, :class:`ItmHead`,
    :class:`EncoderDecoder`, :class:`QuestionEncoder`, :class:`Exportable`): a backbone class inherits the ones it
    implements, a component lists the ones it needs (``required_capabilities``), and :func:`check_capabilities`
    refuses a mismatch when a spec is built, naming the missing capability. A backbone never imports the loop, the
    CLI or the report.

    Attributes:
        name: the registered name (``"blip.v1"``), used in messages.
        model: the ``nn.Module`` holding every backbone weight (moved to the device, counted, merged into).
        contract_version: the :data:`CONTRACT` the class was written against; a class that does not say is taken
            as written for contract ``"1"`` (methods found by name), which the engine refuses.
        image_size, image_mean, image_std: what the data module resizes and normalises images to.
        recomputes_activations: True when blocks are recomputed in backward (gradient checkpointing): a recomputed
            block must save the same tensors it saved the first time, so adapters then reuse nothing across blocks.
    """

    name: str
    model: "nn.Module"
    contract_version: str = "1"
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    recomputes_activations: bool = False

    @abstractmethod
    def injection_points(self) -> list[InjectionPoint]:
        """Every injection point, in forward order."""

    @abstractmethod
    def declared_points(self) -> list[str]:
        """The point vocabulary as globs (``"vision.attn.{q,k,v}"``), for error messages."""

    @abstractmethod
    def trainable_parameters(self) -> dict[str, "torch.nn.Parameter"]:
        """Backbone parameters that train (empty when frozen, everything when ``freeze = false``)."""

    def capability_hint(self, capability: type) -> str:
        """How a user gets ``capability`` from this backbone, if it can have it (e.g. BLIP: ``'set
        backbone.task_model = "captioning"'``); ``""`` when it cannot. Appended to the refusal message."""
        return ""


# ---- backbone capabilities ---------------------------------------------------------------------------------------
class DualEncoder(ABC):
    """Unimodal image and text features for contrastive alignment (ITC, MCAM) and ITC retrieval."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str], device: Any) -> dict[str, "torch.Tensor"]:
        """``{"input_ids": (B, L), "attention_mask": (B, L)}`` on ``device``."""

    @abstractmethod
    def encode_image(self, pixel_values: "torch.Tensor") -> "torch.Tensor":
        """``(B, 3, H, W)`` (or a video ``(B, T, 3, H, W)`` where supported) -> image tokens ``(B, N, D)``; a
        pooled dual encoder returns one token ``(B, 1, P)``."""

    @abstractmethod
    def image_feat(self, image_embeds: "torch.Tensor") -> "torch.Tensor":
        """Image tokens -> L2-normalised ITC feature ``(B, P)``, or ``(B, Q, P)``: Q features per image (BLIP-2's
        query tokens), whose similarity to a text is the best one's cosine
        (:func:`unitrans.alignment_losses.itc.pair_similarity`; ITC, MCAM and retrieval all score through it)."""

    @abstractmethod
    def encode_text(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
        """``(B, L)`` -> text tokens ``(B, L, D)`` (or one pooled token ``(B, 1, P)``)."""

    @abstractmethod
    def text_feat(self, text_embeds: "torch.Tensor") -> "torch.Tensor":
        """Text tokens -> L2-normalised ITC feature ``(B, P)``."""


class FusionNetwork(ABC):
    """A fusion network run as an ordered list of blocks in which text tokens attend to image tokens: what side
    networks (QASN) hook (the injection point ``fusion.blocks``)."""

    @abstractmethod
    def fusion_blocks(self) -> list["nn.Module"]:
        """The blocks of the fusion network, in order (what ``fusion.blocks`` names)."""

    @abstractmethod
    def fusion_width(self) -> int:
        """D, the width of the stream the fusion blocks read and write."""

    def block_reads_image(self, args: tuple, kwargs: Mapping[str, Any]) -> bool:
        """Whether this call of a fusion block (its positional and keyword arguments) attends to image tokens: the
        same blocks may also run unimodally (BLIP's text encoder), and side networks act only on fused calls.
        Default: every call does."""
        return True

    def block_input(self, args: tuple, kwargs: Mapping[str, Any]) -> "torch.Tensor":
        """The stream ``(B, L, D)`` a fusion block's call reads. Default: its first argument or ``hidden_states``."""
        return args[0] if args else kwargs["hidden_states"]


class FusionEncoder(FusionNetwork):
    """Text encoded over image tokens by the fusion network (question encoding, ITM)."""

    @abstractmethod
    def fuse(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor", image_embeds: "torch.Tensor",
             image_atts: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Text ``(B, L)`` over image tokens ``(B, N, Dv)`` (mask ``(B, N)``, default all ones) -> ``(B, L, D)``."""


class ItmHead(ABC):
    """Image-text matching on the fusion network's output (ITM training and re-ranking)."""

    @abstractmethod
    def itm_logits(self, fused: "torch.Tensor") -> "torch.Tensor":
        """:meth:`FusionEncoder.fuse` output ``(B, L, D)`` -> no-match / match logits ``(B, 2)``."""


class EncoderDecoder(ABC):
    """A text decoder conditioned on context tokens (image tokens, or question states): captioning and VQA.

    Decoder sequences are ``[bos] text [eos]``, right-padded; a prefix (a prompt) is such a sequence without its
    ``[eos]``. The context is ``(B, N, D)`` tokens with a ``(B, N)`` mask; a cross-attending decoder (BLIP) attends to
    it, a decoder-only language model may read it as a prefix.
    """

    @abstractmethod
    def encode_image(self, pixel_values: "torch.Tensor") -> "torch.Tensor":
        """``(B, 3, H, W)`` -> image tokens ``(B, N, D)``, the context of a captioning decoder."""

    @abstractmethod
    def decoder_tokenize(self, texts: Sequence[str], device: Any,
                         max_length: int | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``[bos] text [eos]`` per text, right-padded: ``input_ids (B, L)``, ``attention_mask (B, L)``."""

    @abstractmethod
    def decode_logits(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor | None",
                      context: "torch.Tensor", context_mask: "torch.Tensor") -> "torch.Tensor":
        """Next-token logits ``(B, L, V)`` for decoder input ``(B, L)`` (mask ``None``: all valid); position t
        predicts token t + 1."""

    @abstractmethod
    def generate(self, prefix_ids: "torch.Tensor", context: "torch.Tensor", context_mask: "torch.Tensor", *,
                 num_beams: int, max_length: int, min_length: int = 1,
                 repetition_penalty: float = 1.0) -> "torch.Tensor":
        """Beam search (no sampling) from ``prefix_ids (B, P)``: ``(B, <= max_length)`` token ids, the prefix
        included (``max_length`` and ``min_length`` count it too), ended by ``[eos]`` or the length."""

    @abstractmethod
    def decode_text(self, ids: "torch.Tensor") -> list[str]:
        """Token id rows ``(B, L)`` -> strings, special tokens dropped and whitespace stripped."""


class QuestionEncoder(ABC):
    """Question states for visual question answering: the question read against the image."""

    @abstractmethod
    def encode_question(self, questions: Sequence[str],
                        image_embeds: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Questions over image tokens ``(B, N, Dv)`` -> states ``(B, Lq, D)`` and their mask ``(B, Lq)``: the
        context an :class:`EncoderDecoder` answers from."""


class Exportable(ABC):
    """The adapted backbone can be written in its own library's format (``unitrans export``)."""

    @abstractmethod
    def save_pretrained(self, directory: "str | Path") -> None:
        """Write the model (adapters merged by the caller) and its processor or tokenizer so that the backbone's own
        library loads it with no UniTrans code; refuse (``UserError``) what that format cannot hold."""


CAPABILITIES: tuple[type, ...] = (DualEncoder, FusionNetwork, FusionEncoder, ItmHead, EncoderDecoder,
                                  QuestionEncoder, Exportable)


def capability_names(backbone: Any) -> list[str]:
    """The capability interfaces ``backbone`` implements, by name (``["DualEncoder", "ItmHead"]``)."""
    return [c.__name__ for c in CAPABILITIES if isinstance(backbone, c)]


def _methods(capability: type) -> str:
    return ", ".join(sorted(getattr(capability, "__abstractmethods__", ())))


def check_capabilities(backbone: Any, required: Sequence[type], who: str, hint: str = "") -> None:
    """Refuse, naming the missing capability, a backbone that lacks one of ``required`` (at build time).

    Args:
        backbone: the built backbone.
        required: capability interfaces the component needs.
        who: the component, for the message (``"task captioning.v1"``).
        hint: what the user may change instead (appended).

    Raises:
        UserError: ``task captioning.v1 needs backbone capability EncoderDecoder (decode_logits, ...); backbone
            toy.v1 implements: DualEncoder. ...``
    """
    from unitrans.errors import UserError

    check_contract(backbone)
    missing = [c for c in required if not isinstance(backbone, c)]
    if not missing:
        return
    cap = missing[0]
    has = ", ".join(capability_names(backbone)) or "none of them"
    advice = " ".join(s for s in (backbone.capability_hint(cap) if isinstance(backbone, Backbone) else "", hint) if s)
    raise UserError(
        f"{who} needs backbone capability {cap.__name__} ({_methods(cap)}); backbone "
        f"{getattr(backbone, 'name', type(backbone).__name__)} implements: {has}." + (f" {advice}" if advice else "")
    )


def check_contract(backbone: Any) -> None:
    """Refuse a backbone written for another plugin contract than :data:`CONTRACT`."""
    from unitrans.errors import UserError

    version = str(getattr(backbone, "contract_version", "1"))
    if version != CONTRACT:
        raise UserError(
            f"backbone {getattr(backbone, 'name', type(backbone).__name__)} ({type(backbone).__qualname__}) is "
            f"written for backbone contract {version}; this UniTrans implements contract {CONTRACT}. Declare the "
            "capabilities it implements and set contract_version (docs/backbone_plugin.md, 'Contract versions')."
        )


class Adapter(ABC):
    """Adds a trainable update to the frozen linears at a set of injection points (an ``nn.Module`` too).

    Lifecycle: built from its spec (unattached) -> ``attach(points)`` -> train -> ``merge()`` for
    zero-overhead inference, ``unmerge()`` to restore the frozen weights exactly.
    """

    targets: list[str]
    layers: list[int] | None
    points: list[InjectionPoint]  # the points it acts on, once attached
    # Set to False by the engine, before ``attach``, when the backbone recomputes activations: results (``A x``,
    # folded matrices) may then be reused only inside one linear's or one attention's call, never across blocks.
    reuse_across_calls: bool = True

    @abstractmethod
    def attach(self, points: Sequence[InjectionPoint]) -> None:
        """Create the parameters for these points and start acting on them."""

    @abstractmethod
    def delta_weight(self, point: InjectionPoint) -> "torch.Tensor":
        """The update of this point as a dense matrix, shape ``(out_features, in_features)`` (for merging)."""

    def merge(self) -> None:
        """Fold :meth:`delta_weight` of every point into the frozen weights; the update stops running in forward.
        An adapter that is not a weight update overrides it to refuse (``UserError``)."""
        from unitrans import injection

        injection.merge(self, self.points, self.delta_weight)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (the frozen weights come back bit for bit once no adapter stays merged)."""
        from unitrans import injection

        injection.unmerge(self, self.points, self.delta_weight)

    def detach(self) -> None:
        """Stop acting: remove this adapter's updates from the backbone (unmerge first to restore the weights)."""
        from unitrans import injection

        injection.remove_deltas(self, self.points)

    def clear_cache(self) -> None:
        """Drop whatever the adapter keeps between forward calls (the engine calls it after every backward and
        every evaluation, so no activation outlives its step). Default: nothing is kept."""

    def modality_of_parameter(self, name: str) -> str:
        """``V``/``T``/``C``/``D`` or ``shared`` for a parameter name (parameter accounting by modality)."""
        return "shared"

    def accepts(self, point: InjectionPoint) -> bool:
        """Whether this adapter can act on ``point``; targets are matched among the points it accepts. Default: the
        linear points (a weight update); :class:`BlockPoint` s are for adapters that add a sub-block (UniAdapter)."""
        return not isinstance(point, BlockPoint)


class SharedProjection(ABC):
    """An adapter capability: random projections ``(A, B)`` shared with other components.

    A side network that needs low-rank maps of the same modality may reuse the adapter's pair (QASN reuses VCRA's
    fusion pair, paper §3.3.1) instead of drawing its own.
    """

    @abstractmethod
    def shared_pair(self, modality: str) -> tuple["torch.Tensor", "torch.Tensor"] | None:
        """``(A (r, d_in_max), B (d_out_max, r))`` serving ``modality`` (``"C"``, ...), or ``None`` when no pair is
        shared with it. The tensors are the adapter's own (trainable or frozen), not copies."""

    def projector(self, modality: str):
        """A function ``(x (..., d), d) -> A[:, :d] x (..., r)`` that may reuse the adapter's own results for the
        same input, or ``None`` (the caller then projects itself). Default: ``None``."""
        return None


class SideNetwork(ABC):
    """Runs beside an ordered list of blocks through hooks on their inputs and outputs."""

    def required_capabilities(self) -> tuple[type, ...]:
        """Backbone capabilities :meth:`attach` needs (checked, by name, before it is called)."""
        return (FusionNetwork,)

    @abstractmethod
    def attach(self, backbone: Backbone, adapters: Sequence[Adapter]) -> None: ...

    @abstractmethod
    def detach(self) -> None: ...

    @abstractmethod
    def suspended(self):
        """A context manager inside which the side network adds nothing (the blocks run bare)."""


class AlignmentLoss(ABC):
    """Image/text feature alignment. Returns named scalar terms; the total is their sum."""

    @abstractmethod
    def __call__(
        self, image_feat: "torch.Tensor", text_feat: "torch.Tensor", image_ids: "torch.Tensor"
    ) -> dict[str, "torch.Tensor"]:
        """Args: L2-normalised ``image_feat (B, P)``, ``text_feat (B, P)`` and ``image_ids (B,)`` of the local
        batch. Implementations gather across ranks themselves."""


class Task(ABC):
    """A task head: owns its task loss and its evaluation."""

    name: str = ""  # the registered name ("captioning.v1"), for messages
    metric_keys: tuple[str, ...] = ()
    primary_metric: str = ""

    def required_capabilities(self) -> tuple[type, ...]:
        """The backbone capabilities this task (with its options) uses, e.g. ``(EncoderDecoder,)``."""
        return ()

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse (``UserError``, naming both sides) a backbone that lacks what this task needs. Called at build.
        Default: :func:`check_capabilities` on :meth:`required_capabilities`."""
        check_capabilities(backbone, self.required_capabilities(), f"task {self.name or type(self).__name__}")

    @abstractmethod
    def training_step(self, backbone: Backbone, batch: Mapping[str, Any], alignment: AlignmentLoss | None):
        """Returns a dict of named scalar loss terms (their sum is optimised)."""

    # ---- training hooks (the loop calls them; every default does nothing) ------------------------------------
    def setup(self, built: Any) -> None:
        """Called once after every component is built, before data or training (e.g. to keep a momentum copy of
        ``built.trainable_state()``)."""

    def on_step_start(self, step: int, epoch: int, steps_per_epoch: int) -> None:
        """Called before the micro-batches of optimizer step ``step`` (0-based; ``epoch = step // steps_per_epoch``)."""

    def on_optimizer_step(self) -> None:
        """Called after every ``optimizer.step()`` (e.g. a momentum (EMA) update of a copy of the trainable tensors)."""

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        """Training state the task keeps between steps (queues, momentum copies, counters as 0-d tensors), saved
        in every resume checkpoint as tensors only (safetensors: nothing is ever unpickled). Default: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, "torch.Tensor"]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""

    @abstractmethod
    def evaluate(self, backbone: Backbone, dataset: Any, batch_size: int, *, device: Any = "cpu",
                 collate: Any = None, num_workers: int = 0, output_dir: Any = None, split: str = "test",
                 ) -> dict[str, float]:
        """Metrics on ``dataset`` (keys ``metric_keys``). Runs on every rank; each rank may score a shard and
        gather (``unitrans.distributed``); every rank returns the same dict. Files a task writes (e.g.
        ``captions_<split>.json``) go to ``output_dir`` and are written by the main rank only."""


@dataclass
class DataModule:
    """What a dataset builder returns: datasets per split plus the collate function."""

    train: Any
    val: Any | None
    test: Any | None
    collate: Any = None
    extras: dict = field(default_factory=dict)


@dataclass
class Preflight:
    """What a data builder can tell about its data before any model is built (``builder.preflight(deep)``).

    Attributes:
        sizes: items per split (``"train"``, ``"val"``, ``"test"``); ``None`` for a split the spec does not give;
            a split generated on first use reports the size it will have.
        problems: one line per problem found (missing or unparsable file, empty split, unreadable image with
            ``deep``), each naming the file; empty when all is well.
        checked_files: media files opened (``deep``) or checked to exist.
    """

    sizes: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0
