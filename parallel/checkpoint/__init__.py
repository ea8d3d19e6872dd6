"""Sharded checkpoints that resume at any layout, committed atomically.

A run's checkpoint directory:

    step-00000020/  shard-00000.pt shard-00001.pt ...  data-00000.pt ...  client.pt  config.yaml  manifest.json
    latest          "step-00000020"

Five modules, each one concern (docs/checkpoints.md has the design):

    deepspeed_adapter  the only code that reads and writes DeepSpeed's private optimizer state
    layout_free        the format: pieces of full tensors, assembled again at any TP/DP/EP layout
    checksums          block checksums of the fragments and of each shard's index: a load checks what it reads
    storage            checksummed fsynced files, the manifest, verification, atomic commit, pruning
    manager            the Checkpointer the training loop calls: resume() and save()

Callers import from here; the modules are the package's own business.
"""
from parallel.checkpoint.layout_free import (consolidate, fragment_bytes, load_full_state, load_shards, read_tensors,
                                             read_weights, tp_slice)
from parallel.checkpoint.manager import Checkpointer, Resumed, checkpoint_root
from parallel.checkpoint.storage import (CLIENT, LATEST, MANIFEST, CheckpointError, checkpoints_newest_first,
                                         find_checkpoint, read_manifest, step_dir_name, verify)

__all__ = ["CLIENT", "LATEST", "MANIFEST", "CheckpointError", "Checkpointer", "Resumed", "checkpoint_root",
           "checkpoints_newest_first", "consolidate", "find_checkpoint", "fragment_bytes", "load_full_state", "load_shards",
           "read_manifest", "read_tensors", "read_weights", "step_dir_name", "tp_slice", "verify"]
