"""The validation set: a fixed list of windows that every evaluation reads, at any layout.

Its sources are `data.validation`, or else the documents of the training sources that
`data.validation_fraction` holds out (by a hash of each document's identity, data_pipeline/work.py),
which the training stream skips. One lane reads them once, in the order the first epoch of the
training stream would, with no shuffle: the windows, and so the evaluated set, do not depend on the
DP size, the worker count or the step. Evaluation takes the first `batches` global batches of these
windows (each of micro_batch x grad_accum x dp windows) and deals each rank the rows the training
loop would deal it; an incomplete last window is never evaluated.
"""
from dataclasses import replace
import numpy
import torch
from tokenizers import Tokenizer

from .config import DataConfig
from .errors import DataError
from .lane import Lane, Plan
from .loader import open_sources, training_plan
from .masked_lm import EVALUATION_EPOCH
from .work import new_cursor


def validation_plan(cfg: DataConfig, seed: int) -> Plan:
    """The held-out documents (data.validation, else the training sources' held-out share), read once."""
    plan = training_plan(cfg, seed)
    if cfg.validation is not None:
        tokenizer = Tokenizer.from_str(plan.tokenizer_json)
        plan = replace(plan, sources=open_sources(cfg.validation, "data.validation", cfg, tokenizer))
    elif not plan.holdout:
        raise DataError("evaluation needs held-out data: set data.validation, or data.validation_fraction above 0")
    return replace(plan, validation=True, epochs=1, shuffle_buffer=1)


def in_order(plan: Plan) -> Lane:
    """One lane reading `plan`'s sources from their start, the order the first epoch of training would."""
    return Lane(plan, {"sources": [new_cursor(plan.seed, s, 0, 1, 0) for s in range(len(plan.sources))],
                       "emitted": [0] * len(plan.sources)})


def validation_batches(cfg: DataConfig, *, batches: int, micro_batch_size: int, grad_accum: int, dp_rank: int,
                       dp_size: int, seed: int) -> list:
    """This rank's micro-batches of the first `batches` global batches of the validation windows (fewer
    if the set is smaller), in the training batches' format: LongTensor[micro_batch, seq_len + 1], or
    dicts of input_ids, decoder_input_ids and labels under span corruption, of input_ids and labels under
    masked language modelling, whose mask is fixed per window (EVALUATION_EPOCH, data_pipeline/masked_lm.py)."""
    plan = validation_plan(cfg, seed)
    lane = in_order(plan)
    global_batch = micro_batch_size * grad_accum * dp_size
    wanted = batches * global_batch
    windows = []
    while len(windows) <= wanted and (read := lane.next_window()) is not None:
        windows.append(read[0])  # not its epoch: every evaluation scores a window alike
    if len(windows) <= wanted:
        windows = windows[:-1]  # the stream ended: its last window may be padded
    usable = len(windows) // global_batch * global_batch
    if usable == 0:
        where = "data.validation" if cfg.validation is not None else \
            f"the {cfg.validation_fraction} of the training documents held out (data.validation_fraction)"
        raise DataError(f"{where} makes {len(windows)} whole window(s) of {plan.window} tokens, fewer than one batch "
                        f"of {micro_batch_size} x {grad_accum} for each of the {dp_size} DP rank(s); add validation "
                        "data or raise data.validation_fraction")
    mine = []
    for start in range(0, usable, global_batch):
        for accum in range(grad_accum):
            first = start + (accum * dp_size + dp_rank) * micro_batch_size
            rows = windows[first:first + micro_batch_size]
            if plan.span_corruption:
                mine.append({name: torch.from_numpy(array)
                             for name, array in plan.span_corruption.batch(rows, len(rows)).items()})
            elif plan.masked_lm:
                epochs = [EVALUATION_EPOCH] * len(rows)
                mine.append({name: torch.from_numpy(array)
                             for name, array in plan.masked_lm.batch(rows, epochs, len(rows)).items()})
            else:
                mine.append(torch.from_numpy(numpy.stack(rows).astype(numpy.int64)))
    return mine
