"""The hang watchdog: when a rank makes no progress for train.hang_seconds, every rank says where it is.

A rank stuck in a collective otherwise waits for the process group's timeout (parallel.timeout_minutes, 30 by
default) and dies with no word of where it or its peers were. Here the loop marks its progress (`beat`) at each
phase of a step; a thread of each rank watches the time since the last mark. When it passes hang_seconds, the
rank writes its Python stacks, every thread's, to RUN_DIR/hang/rank-N.txt under a header saying its step and
phase. All ranks stop together (the stuck one, and the peers waiting for it in a collective, all stop
progressing at once), so every rank writes its file; rank 0 then reads the headers, names the rank least far
along, prints one line and exits HANG_EXIT_CODE, which torchrun and SLURM restart as any failure. The other
ranks wait until rank 0 has written its verdict to RUN_DIR/hang/verdict.txt (torchrun stops every rank once
one has exited), then exit with the same code.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from launcher.errors import HANG_EXIT_CODE

PHASES = ("start", "forward/backward/optimizer step", "logging", "evaluation", "saving")
REPORT_WAIT_SECONDS = 10  # rank 0 waits this long for the other ranks' files, and they as long for its verdict


class HangWatchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, hang_seconds: float):
        self.dir, self.rank, self.world_size, self.hang_seconds = Path(run_dir) / "hang", rank, world_size, hang_seconds
        self.step, self.phase, self.last_beat = 0, PHASES[0], time.monotonic()
        self.main_thread = threading.main_thread().ident
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="parallax-hang-watchdog", daemon=True)
        if hang_seconds:
            (self.dir / f"rank-{rank}.txt").unlink(missing_ok=True)  # an earlier round's, before a restart
            if rank == 0:
                (self.dir / "verdict.txt").unlink(missing_ok=True)
            self.thread.start()

    def beat(self, step: int, phase: str) -> None:
        """The loop has reached `phase` of `step`: three attribute writes, no lock."""
        self.step, self.phase, self.last_beat = step, phase, time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.hang_seconds / 4)):
            idle = time.monotonic() - self.last_beat
            if idle >= self.hang_seconds:
                self._write_stacks(idle)
                if self.rank == 0:
                    verdict = self._verdict()
                    (self.dir / "verdict.txt").write_text(verdict + "\n")
                    print(verdict, file=sys.stderr, flush=True)
                else:
                    deadline = time.monotonic() + 2 * REPORT_WAIT_SECONDS
                    while not (self.dir / "verdict.txt").exists() and time.monotonic() < deadline:
                        time.sleep(0.2)
                os._exit(HANG_EXIT_CODE)

    def _write_stacks(self, idle: float) -> None:
        frames = sys._current_frames()
        threads = {thread.ident: thread.name for thread in threading.enumerate()}
        header = {"rank": self.rank, "step": self.step, "phase": self.phase, "idle_seconds": round(idle, 1),
                  "where": _innermost(frames.get(self.main_thread)), "host": socket.gethostname(), "pid": os.getpid()}
        stacks = "".join(f"\nThread {threads.get(ident, ident)} ({ident}):\n{''.join(traceback.format_stack(frame))}"
                         for ident, frame in frames.items())
        self.dir.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{key}: {value}\n" for key, value in header.items()) + stacks
        partial = self.dir / f".rank-{self.rank}.txt.partial"
        partial.write_text(text)
        os.replace(partial, self.dir / f"rank-{self.rank}.txt")  # rank 0 never reads half a file

    def _verdict(self) -> str:
        """One line naming the rank least far along (its step, then its phase; then the longest idle)."""
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while len(headers := self._headers()) < self.world_size and time.monotonic() < deadline:
            time.sleep(0.2)
        slowest = min(headers, key=lambda h: (int(h["step"]), PHASES.index(h["phase"]), -float(h["idle_seconds"])))
        missing = self.world_size - len(headers)
        unheard = f"; {missing} rank(s) wrote none" if missing else ""
        return (f"parallax: error: hang: no progress for {self.hang_seconds:g} s (train.hang_seconds); rank "
                f"{slowest['rank']} is the slowest, at step {slowest['step']} ({slowest['phase']}) in "
                f"{slowest['where']}; every rank's stacks are in {self.dir}{unheard}")

    def _headers(self) -> list[dict]:
        headers = []
        for path in self.dir.glob("rank-*.txt"):
            lines = path.read_text().split("\n\n", 1)[0].splitlines()
            headers.append(dict(line.split(": ", 1) for line in lines))
        return headers


def _innermost(frame) -> str:
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
