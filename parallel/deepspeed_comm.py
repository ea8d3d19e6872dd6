"""DeepSpeed's communication backend, started without the shared-memory kernel Parallax never calls.

On a CPU accelerator, DeepSpeed's torch backend compiles a C++ kernel (`deepspeed_shm_comm`) the first
time a machine starts it, for `inference_all_reduce`, the all-reduce of its inference engine (`module_inject`).
Parallax calls no such thing: its collectives are torch.distributed's, on the groups parallel/topology.py
makes. The build cost 34 s of a 2-core machine's first run (and of every `make test` on a fresh machine),
needed a C++ compiler, and printed a line on every rank of every run. So the backend starts with
`build_shm_op` answering None, which is what DeepSpeed does itself where the kernel is unsupported.

`build_shm_op` is a module function of `deepspeed.comm.torch`, not a documented API: it is replaced only
in the release setup.cfg pins. Any other release is left as it is, kernel and all: a training run refuses
it in one line anyway, as its checkpoints read DeepSpeed's internals (parallel/checkpoint/deepspeed_adapter.py),
and `parallax plan` need not refuse it.
"""
from __future__ import annotations

import importlib
from datetime import timedelta
from typing import Optional


def init_deepspeed_distributed(backend: str, timeout: Optional[timedelta] = None) -> None:
    """`deepspeed.init_distributed`, its shared-memory kernel neither built nor loaded."""
    import deepspeed

    from parallel.checkpoint.deepspeed_adapter import TESTED_DEEPSPEED

    if deepspeed.__version__ == TESTED_DEEPSPEED:
        torch_backend = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm's attribute `torch` is torch
        torch_backend.build_shm_op = lambda: None
    kwargs = {} if timeout is None else {"timeout": timeout}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
