"""Multi-process launch: ``run`` with ``nproc_per_node > 1`` starts torchrun in-process on the same command.

Each worker re-runs the same ``python -m unitrans run ...`` command line; torchrun's environment (``LOCAL_RANK``,
``WORLD_SIZE``) tells it that it is a worker, so it joins the process group instead of launching again. One
command therefore works on a laptop and on a node; multi-node options pass through to torchrun.
"""

from __future__ import annotations

import sys
from typing import Sequence


def launch(command: Sequence[str], nproc_per_node: int, nnodes: str = "1", node_rank: int = 0,
           rdzv_endpoint: str | None = None, rdzv_backend: str = "c10d", rdzv_id: str = "unitrans",
           max_restarts: int = 0) -> int:
    """Run ``python -m unitrans <command>`` in ``nproc_per_node`` workers under torchrun. Returns the exit code.

    A worker that fails (an exception, a kill) makes torchrun stop the others; the failure is reported as one
    message naming the rank and its exit code, never as a hang.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = [f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}", f"--max_restarts={max_restarts}"]
    if str(nnodes) == "1" and not rdzv_endpoint:
        args.append("--standalone")
    else:
        if not rdzv_endpoint:
            from unitrans.errors import UserError

            raise UserError("multi-node runs need --rdzv-endpoint HOST:PORT (the same on every node)")
        args += [f"--node_rank={node_rank}", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_backend={rdzv_backend}",
                 f"--rdzv_id={rdzv_id}"]
    args += ["--module", "unitrans", *command]
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as exc:
        failures = exc.failures
        lines = []
        for global_rank, f in sorted(failures.items()):
            why = f"exit code {f.exitcode}" if f.exitcode is None or f.exitcode >= 0 else f"signal {-f.exitcode}"
            why += " (it stopped with the error printed above)" if f.exitcode == 2 else ""
            lines.append(f"rank {global_rank} (local {f.local_rank}) failed with {why}")
        print("error: the distributed run stopped: " + "; ".join(lines) +
              ". The other workers were stopped; see the failing rank's output above.", file=sys.stderr)
        return 1
    return 0
