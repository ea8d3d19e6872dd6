"""The per-rank entry point: `python -m launcher.entry CONFIG [overrides]`.

Whatever starts the ranks (torchrun locally, srun on SLURM) sets torch's env:// variables; this
module reads the config and runs the training loop on this rank.
"""
import logging
import os
import sys
import warnings

from launcher.config import load_config
from launcher.errors import USER_ERRORS, exit_with


def _quiet_third_party_logs() -> None:
    """Megatron and DeepSpeed announce optional kernels they did not find; on CPU that is noise."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_third_party_logs()
    from launcher.train import train

    try:
        cfg = load_config(argv[0], argv[1:])
        cfg.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
        train(cfg)
    except USER_ERRORS as e:
        rank = os.environ.get("RANK", "0")
        exit_with(e, prefix=f"parallax: error (rank {rank}): ")


if __name__ == "__main__":
    main()
