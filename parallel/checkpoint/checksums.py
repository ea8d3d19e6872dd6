"""Checksums of a shard's fragments, block by block, and of its index: a load verifies just what it reads.

The manifest's crc32 of a whole shard file is checked only by reading the whole file, and at another
layout a rank reads only parts of shards: its TP slice, its ZeRO partition. Checking whole files there
made a rank read up to whole shards it needs a part of (at DP=2 -> DP=4, two ranks each read half the
checkpoint to check it, twice the quarter they load). So the save's background thread also checksums
each fragment in the cells of a grid laid on its piece's TP-local tensor, and a load checks every cell it
copies from, reading that cell's part of the fragment whole: a rank reads about one block more than it
needs at each end of each range it reads, and every byte it loads has been checked.

Offsets and checksums come from the shard's pickled index, so the index has a checksum of its own in
the manifest: a reader trusts them only once it matches.
"""
from __future__ import annotations

import math
import zlib

import torch

from parallel.checkpoint.deepspeed_adapter import KEYS, MASTER


class Grid:
    """The cells a piece's fragments are checksummed in, laid on its TP-local tensor of `shape`, split along `dim`.

    Seen as rows x row_len (rows: the product of the dims before `dim`), what a rank at another TP size
    reads of the tensor is the same band of columns in a run of rows: all of each row when it has fewer
    TP ranks, 1/2, 1/4 or 1/8 of it when it has 2, 4 or 8 times as many; its ZeRO partition cuts the run
    at its ends. So each row is cut where 8, 4 or 2 TP ranks would cut it (the most that divide
    shape[dim]) and into chunks of at most `block` elements, and rows are grouped into blocks of about
    `block` elements: a band is then whole cells but for the row blocks at its two ends. When rows == 1 (a
    tensor split along its first dim, or not split) a read is a flat range, and the cells are blocks."""

    def __init__(self, shape: list[int], dim: int, block: int):
        self.rows = math.prod(shape[:dim])
        self.row_len = math.prod(shape) // self.rows
        tp_cuts = next(n for n in (8, 4, 2, 1) if shape[dim] % n == 0)
        self.columns = tp_cuts * -(-self.row_len // (tp_cuts * block))
        self.rows_per_block = max(1, block // self.row_len)

    def reached(self, lo: int, hi: int) -> range:
        """The cells of every row block the flat range [lo, hi) reaches, in order: a fragment has checksums of these."""
        return range(self._row_block(lo) * self.columns, (self._row_block(hi - 1) + 1) * self.columns)

    def touched(self, lo: int, hi: int, first_column: int, end_column: int) -> list[int]:
        """The cells that hold an element of columns [first_column, end_column) of a row within flat [lo, hi)."""
        cells = []
        for row_block in range(self._row_block(lo), self._row_block(hi - 1) + 1):
            for column in range(self.columns):
                start, end = self._column_range(column)
                if self._runs(row_block, max(start, first_column), min(end, end_column), lo, hi):
                    cells.append(row_block * self.columns + column)
        return cells

    def checksum(self, fragment: torch.Tensor, start: int, cell: int) -> tuple[int, int]:
        """The crc32 of the elements of `cell` that lie in `fragment` (flat index `start` of the tensor on), in
        flat order, and how many they are: a strided run of the rows it holds whole, and the rows cut short."""
        row_block, column = divmod(cell, self.columns)
        crc, count = 0, 0
        end = start + fragment.numel()
        for first, rows, width in self._runs(row_block, *self._column_range(column), start, end):
            run = fragment.as_strided((rows, width), (self.row_len, 1), fragment.storage_offset() + first - start)
            crc = zlib.crc32(run.contiguous().numpy(), crc)
            count += rows * width
        return crc, count

    def _row_block(self, flat: int) -> int:
        return flat // self.row_len // self.rows_per_block

    def _column_range(self, column: int) -> tuple[int, int]:
        return self.row_len * column // self.columns, self.row_len * (column + 1) // self.columns

    def _runs(self, row_block: int, first_column: int, end_column: int, lo: int,
              hi: int) -> list[tuple[int, int, int]]:
        """Columns [first_column, end_column) of the rows of `row_block`, within flat [lo, hi), in flat order, as
        runs (first element's flat index, rows, columns): rows that lo or hi cut short one by one, whole rows as one."""
        if first_column >= end_column:
            return []
        top = row_block * self.rows_per_block
        bottom = min(top + self.rows_per_block, self.rows)
        first = max(top, (lo - end_column) // self.row_len + 1)  # the first row whose columns end past lo
        end = min(bottom, -(-(hi - first_column) // self.row_len))  # past the last one whose columns start before hi
        whole_first = max(first, -(-(lo - first_column) // self.row_len))
        whole_end = min(end, (hi - end_column) // self.row_len + 1)
        if whole_first >= whole_end:
            whole_first = whole_end = end

        def cut(row: int) -> tuple[int, int, int]:
            begin = max(lo, row * self.row_len + first_column)
            return begin, 1, min(hi, row * self.row_len + end_column) - begin
        runs = [cut(row) for row in range(first, whole_first)]
        if whole_first < whole_end:
            runs.append((whole_first * self.row_len + first_column, whole_end - whole_first, end_column - first_column))
        return runs + [cut(row) for row in range(whole_end, end)]


def _grid(piece: dict) -> Grid:
    return Grid(piece["shape"], piece["dim"], piece["checksum_block_bytes"] // piece[MASTER].element_size())


def add_block_checksums(pieces: dict, block_bytes: int) -> None:
    """Give each piece the checksums of its fragments (master and moments alike): one per cell of every row
    block the fragment reaches, of the cell's elements in the fragment (0 for none)."""
    for piece in pieces.values():
        piece["checksum_block_bytes"] = block_bytes
        grid, start = _grid(piece), piece["start"]
        cells = grid.reached(start, start + piece[MASTER].numel())
        piece["block_crc32"] = {key: torch.tensor([grid.checksum(piece[key], start, cell)[0] for cell in cells],
                                                  dtype=torch.int64) for key in KEYS}


def verify_read(piece: dict, key: str, lo: int, hi: int, first_column: int, end_column: int) -> tuple[int, bool]:
    """Check the cells of `piece`'s `key` fragment that a read of columns [first_column, end_column) of its rows
    within flat [lo, hi) took values from, each read whole: the bytes that read, and whether every cell matched."""
    grid, fragment, start = _grid(piece), piece[key], piece["start"]
    first_cell = grid.reached(start, start + fragment.numel()).start
    read, intact = 0, True
    for cell in grid.touched(lo, hi, first_column, end_column):
        crc, count = grid.checksum(fragment, start, cell)
        read += count * fragment.element_size()
        intact = intact and crc == int(piece["block_crc32"][key][cell - first_cell])
    return read, intact


def index_checksum(shard: dict) -> int:
    """The crc32 of everything in `shard` but its fragments' values (of which only dtype and length count), in a
    canonical form: names, shapes, offsets, block checksums and the generators' state."""
    crc = 0

    def add(value) -> None:
        nonlocal crc
        if isinstance(value, dict):
            for name in sorted(value, key=str):
                add(str(name))
                add(value[name])
        elif isinstance(value, (list, tuple)):
            add(f"[{len(value)}")
            for item in value:
                add(item)
        elif isinstance(value, torch.Tensor):
            add(f"tensor {value.dtype} {list(value.shape)}")
            crc = zlib.crc32(value.contiguous().flatten().view(torch.uint8).numpy(), crc)
        else:
            crc = zlib.crc32(f"{type(value).__name__} {value!r};".encode(), crc)

    add({**shard, "pieces": {name: {field: (str(value.dtype), value.numel()) if field in KEYS else value
                                    for field, value in piece.items()}
                             for name, piece in shard["pieces"].items()}})
    return crc
