"""The command line: ``python -m unitrans {list,validate,run,sweep,params,export,score}``.

``list`` and ``validate`` never import torch or transformers: listing reads ``registry.toml`` and the live
registrations; validating imports only the builder modules, which import their implementation inside the
builder's body. Mistakes a user can fix (a bad spec, an unknown name, a missing file) print one line each on
stderr and exit with status 2, never with a traceback.

Examples:
    python -m unitrans list adapters
    python -m unitrans validate examples/flickr30k_vcra.toml --set adapters.0.name=lora --set adapters.0.rank=32
    python -m unitrans run examples/quickstart.toml --output-dir runs/try
    python -m unitrans params examples/flickr30k_vcra.toml --json
    python -m unitrans sweep examples/ablation/table8_small.toml --seeds 0,1,2
    python -m unitrans score caption --results runs/x/captions_test.json --annotations coco_karpathy_test_gt.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from unitrans import __version__, registry
from unitrans.errors import UserError

if TYPE_CHECKING:
    from unitrans.spec import Spec

EXIT_OK = 0
EXIT_FAILED = 1  # a run failed for a reason that is not the user's spec (e.g. a missing optional dependency)
EXIT_USER = 2  # the user's spec, command line or files are wrong

_KIND_ALIASES = {k.rstrip("s"): k for k in registry.KINDS} | {
    "alignment_loss": "alignment_losses",
    "losses": "alignment_losses",
    "data": "datasets",
    "side_network": "side_networks",
}


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _kind_name(text: str) -> str:
    """``"adapter"``, ``"side-networks"``, ``"adapters"`` -> the registry kind; unknown -> UserError."""
    key = text.strip().lower().replace("-", "_")
    if key in registry.KINDS:
        return key
    if key in _KIND_ALIASES:
        return _KIND_ALIASES[key]
    raise UserError(f"unknown kind '{text}'; kinds are: {', '.join(registry.KINDS)}")


def _summary_of(builder: Any) -> str:
    doc = (getattr(builder, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _cmd_list(args: argparse.Namespace) -> int:
    kinds = [_kind_name(args.kind)] if args.kind else list(registry.KINDS)
    summaries = {(e.kind, e.name): e.summary for e in registry.read_index()}
    for kind in kinds:
        names = registry.available(kind)
        live = registry.kind(kind).live()
        print(f"{kind}:")
        if not names:
            print("  (none)")
        width = max((len(n) for n in names), default=0)
        for name in names:
            summary = summaries.get((kind, name)) or _summary_of(live.get(name))
            print(f"  {name:<{width}}  {summary}".rstrip())
    return EXIT_OK


def _load(args: argparse.Namespace) -> "Spec":
    from unitrans.spec import load_spec

    try:
        return load_spec(args.spec, args.overrides)
    except FileNotFoundError as exc:  # only the spec file itself is read here
        raise UserError(f"{exc}" if "spec file" in str(exc) else f"spec file not found: {args.spec}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"spec file {args.spec} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                        f"{exc.start}); save it as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"spec file {args.spec} is a folder, not a TOML file") from None


def _summary_lines(spec: "Spec") -> list[str]:
    from unitrans.spec import resolve

    resolved = resolve(spec)
    rows: list[tuple[str, str]] = [("backbone", resolved["backbone"]["name"])]
    if resolved["adapters"]:
        rows += [(f"adapters[{i}]", a["name"]) for i, a in enumerate(resolved["adapters"])]
    else:
        rows.append(("adapters", "(none)"))
    rows += [(slot, resolved[slot]["name"]) for slot in ("side_network", "alignment_loss", "task", "data")]
    t = resolved["train"]
    rows.append(
        (
            "train",
            f"epochs={t['epochs']} batch_size={t['batch_size']} lr={t['lr']} precision={t['precision']}"
            + (f" max_steps={t['max_steps']}" if t.get("max_steps") else ""),
        )
    )
    rows.append(("output_dir", str(resolved["output_dir"])))
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    if spec.sweep is not None:  # every variant of a sweep must be a valid spec too (all problems at once)
        from unitrans.engine.sweep import load_sweep

        n = len(load_sweep(args.spec, args.overrides).variants)
        print(f"ok: {args.spec} ({n} sweep variant{'s' if n != 1 else ''})")
    else:
        print(f"ok: {args.spec}")
    if args.resolved:
        from unitrans.spec import dump_toml

        print(dump_toml(spec), end="")
    else:
        print("\n".join(_summary_lines(spec)))
    return _validate_data(spec, args.deep) if spec.sweep is None else EXIT_OK


def _validate_data(spec: "Spec", deep: bool) -> int:
    """The second half of ``validate``: the data pre-flight (exit 2 with every problem listed)."""
    from unitrans.engine.preflight import data_preflight, format_problems, missing_data

    absent = [] if deep else missing_data(spec)
    if absent:
        print(f"data: not checked: none of its files is on this machine ({', '.join(absent)})")
        return EXIT_OK
    report = data_preflight(spec, deep=deep)
    if report.problems:
        _err(f"error: {format_problems(report.problems, shown=None)}")
        return EXIT_USER
    sizes = ", ".join(f"{k} {v:,}" for k, v in report.sizes.items() if v is not None)
    media = f"; {report.checked_files:,} media files {'opened' if deep else 'found'}" if report.checked_files else ""
    print(f"data: ok ({sizes or 'sizes unknown'}{media})")
    return EXIT_OK


def _missing_dependency(exc: ModuleNotFoundError) -> int:
    """Report a missing third-party module (not a bug of unitrans itself) without a traceback."""
    _err(
        f"error: {exc}. Running needs the optional dependencies: pip install -e '.[torch]' "
        "(or '.[all]' for CLIP, video and caption metrics)"
    )
    return EXIT_FAILED


def _is_third_party(exc: ModuleNotFoundError) -> bool:
    top = (exc.name or "").partition(".")[0]
    return bool(top) and not top.startswith("unitrans")


def _cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args)
    if args.output_dir is not None:
        spec = spec.model_copy(update={"output_dir": str(args.output_dir)})
    train_updates: dict[str, Any] = {}
    if args.resume:
        train_updates["resume"] = "latest"
    if args.overwrite:
        train_updates["overwrite"] = True
    if args.allow_change:
        train_updates["allow_change"] = sorted({*spec.train.allow_change, *args.allow_change})
    if args.nproc_per_node is not None:
        train_updates["nproc_per_node"] = args.nproc_per_node
    if train_updates:
        from pydantic import ValidationError

        from unitrans.spec import SpecError, TrainSpec

        try:  # validated: an --allow-change KEY that cannot change is refused like the spec field
            train = TrainSpec.model_validate(spec.train.model_dump() | train_updates)
        except ValidationError as exc:
            raise SpecError([f"train -> {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
        spec = spec.model_copy(update={"train": train})
    from unitrans.distributed import launched_by_torchrun
    from unitrans.engine.run import run

    nproc = spec.train.nproc_per_node
    if (nproc > 1 or str(args.nnodes) != "1") and not launched_by_torchrun():
        from unitrans.engine.launch import launch

        return launch(args.argv, nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                      rdzv_endpoint=args.rdzv_endpoint, rdzv_backend=args.rdzv_backend,
                      max_restarts=args.max_restarts)
    run(spec)
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run every variant x seed of a sweep in its own subprocess, then write results.{md,json,csv} and plots."""
    from unitrans.engine.sweep import load_sweep, parse_seeds, run_sweep

    try:
        sweep = load_sweep(args.spec, args.overrides, grid_args=args.grid,
                           seeds=parse_seeds(args.seeds) if args.seeds else None, output_dir=args.output_dir,
                           only=[n.strip() for n in args.only.split(",") if n.strip()] if args.only else ())
    except FileNotFoundError:
        raise UserError(f"spec file not found: {args.spec}") from None
    if args.dry_run:
        for v in sweep.variants:
            print(f"{v.name}: {v.overrides or '(the spec as written)'}")
        print(f"seeds: {sweep.seeds}; output: {sweep.output_dir}/<variant>/seed<k>")
        return EXIT_OK
    return run_sweep(sweep, plots=not args.no_plots)


def _cmd_params(args: argparse.Namespace) -> int:
    spec = _load(args)
    from unitrans.engine.params import params_command

    extra = {"memory": True} if args.memory else {}
    return int(params_command(spec, as_json=args.json, **extra) or 0)


def _cmd_export(args: argparse.Namespace) -> int:
    spec = _load(args)
    from unitrans.engine.export import export

    out = export(spec, args.checkpoint, args.out)
    print(f"exported the merged backbone to {out}/ (load it with the backbone's from_pretrained)")
    return EXIT_OK


def _cmd_score(args: argparse.Namespace) -> int:
    """Score a results file against annotations and print the metrics as JSON (no torch); warn on stderr when
    the results cover only part of the ground truth."""
    import json

    from unitrans.metrics.files import coverage_warning

    if args.task == "caption":
        if args.questions is not None or args.normalize:
            raise UserError("score caption: --questions and --normalize are for score vqa")
        from unitrans.metrics.caption import score_files

        metrics, items = score_files(args.results, args.annotations), "images"
    else:
        from unitrans.metrics.vqa import score_files

        metrics = score_files(args.results, args.annotations, args.questions, normalize=args.normalize)
        items = "annotated questions"
    print(json.dumps(metrics, indent=2))
    warning = coverage_warning(metrics, items)
    if warning:
        _err(warning)
    return EXIT_OK


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="the spec file (TOML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. --set train.lr=1e-4 --set adapters.0.rank=32 --set side_network.name=none "
        "(values parse as TOML, else as strings; repeatable)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """``run``'s options: the spec, the output folder and what to do with a run already in it, processes."""
    _add_spec_args(p)
    p.add_argument("--output-dir", type=Path, default=None, help="replaces the spec's output_dir")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from checkpoints/latest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (its outputs are removed; replaces train.overwrite)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: let KEY differ from the checkpoint's spec on purpose (train.lr, "
                   "train.weight_decay, train.grad_clip, train.epochs, train.max_steps; repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this machine (replaces train.nproc_per_node); >1 starts torchrun (DDP)")
    p.add_argument("--nnodes", default="1", help="torchrun: number of nodes (or MIN:MAX)")
    p.add_argument("--node-rank", type=int, default=0, help="torchrun: this node's rank")
    p.add_argument("--rdzv-endpoint", default=None, help="torchrun: HOST:PORT of the rendezvous (multi-node)")
    p.add_argument("--rdzv-backend", default="c10d", help="torchrun: rendezvous backend")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun: restarts of the worker group")


def _add_score_parser(sub) -> None:
    """The ``score`` subcommand's arguments."""
    p = sub.add_parser("score", help="score a results file: caption (BLEU-4, CIDEr) or vqa (VQA accuracy)")
    p.add_argument("task", choices=("caption", "vqa"), help="caption: captions_<split>.json against a COCO-format "
                   "ground truth; vqa: vqa_result_<split>.json against BLIP's VQA json (with answer lists) or the "
                   "official VQA annotation file")
    p.add_argument("--results", type=Path, required=True, help="the results JSON a run wrote")
    p.add_argument("--annotations", type=Path, required=True, help="the ground truth JSON")
    p.add_argument("--questions", type=Path, default=None,
                   help="vqa: the official questions file that goes with the annotation file (checked against it)")
    p.add_argument("--normalize", action="store_true",
                   help="vqa: normalise the human answers as the prediction (lenient; default: the official rules, "
                   "which process the human answers only where they disagree)")
    p.set_defaults(func=_cmd_score)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tools and tests)."""
    parser = argparse.ArgumentParser(
        prog="unitrans",
        description="Parameter-efficient fine-tuning of vision-language models: VCRA, QASN and MCAM (UniTrans).",
    )
    parser.add_argument("--version", action="version", version=f"unitrans {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list registered components with their summaries")
    p.add_argument("kind", nargs="?", help=f"one kind: {', '.join(registry.KINDS)} (default: all)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("validate", help="check a spec (all problems at once) and show its resolved components")
    p.set_defaults(func=_cmd_validate)
    _add_spec_args(p)
    p.add_argument("--resolved", action="store_true", help="print the whole resolved spec as TOML")
    p.add_argument("--deep", action="store_true", help="also open every image / video once and list every "
                   "unreadable file")

    p = sub.add_parser("run", help="train and evaluate as a spec says")
    _add_run_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sweep", help="run a spec's variants x seeds (ablations, grids); tabulate and plot them")
    _add_spec_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="cross the variants with these values, e.g. --grid adapters.0.rank=16,32,64 (repeatable; "
                   "replaces the same key of [sweep.grid])")
    p.add_argument("--seeds", default=None, metavar="S1,S2", help="seeds, e.g. 0,1,2 (replaces [sweep] seeds)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="the sweep's folder (default: the spec's output_dir); runs go to <dir>/<variant>/seed<k>")
    p.add_argument("--only", default=None, metavar="V1,V2",
                   help="run only these variants (a variant's name also selects its --grid points, "
                        "lora: lora+lr=0.001, ...)")
    p.add_argument("--no-plots", action="store_true", help="write the results tables only")
    p.add_argument("--dry-run", action="store_true", help="validate and list the variants; run nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("params", help="count total and trainable parameters, by component")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--memory", action="store_true", help="also estimate the peak memory per device of a training "
                   "step under DDP and FSDP (weights, trainable state, activations at the spec's batch)")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("export", help="merge trained adapters into the backbone and save_pretrained it")
    _add_spec_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder holding adapter.safetensors")
    p.add_argument("--out", type=Path, required=True, help="output directory (save_pretrained layout)")
    p.set_defaults(func=_cmd_export)

    _add_score_parser(sub)
    return parser


def _guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; a user's mistake becomes lines on stderr and exit status 2, never a traceback."""
    from unitrans.spec import SpecError  # light: pydantic only

    spec_path = getattr(args, "spec", None)
    try:
        return func(args)
    except SpecError as exc:
        n = len(exc.errors)
        where = f" {spec_path}" if spec_path is not None else ""
        _err(f"error: invalid spec{where} ({n} problem{'s' if n != 1 else ''}):")
        for line in exc.errors:
            _err(f"  {line}")
        return EXIT_USER
    except (UserError, registry.RegistryError) as exc:
        _err(f"error: {exc}")
        return EXIT_USER
    except ModuleNotFoundError as exc:  # an optional dependency (torch, open_clip, ...) is not installed
        if _is_third_party(exc):
            return _missing_dependency(exc)
        raise
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unitrans`` / ``python -m unitrans``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok, 1 failed, 2 a user's mistake (bad spec, unknown name, missing file).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed what to say
        return exc.code if isinstance(exc.code, int) else EXIT_USER
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what torchrun workers re-run
    try:
        return _guarded(args.func, args)
    except BrokenPipeError:  # `unitrans list | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 0
