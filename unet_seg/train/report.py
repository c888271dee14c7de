"""What the user reads: progress bars (or plain lines in logs) and metric tables written as
markdown and JSON (rank 0 writes, every rank gets the table)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from torch import Tensor
from tqdm.auto import tqdm

from ..files import atomic_path
from .distributed import is_main


PathLike = Union[str, os.PathLike]


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def progress(iterable: Any = None, **kwargs: Any) -> Union[tqdm, "LineProgress"]:
    """A tqdm bar on rank 0 when stderr is a terminal; where it is not (a log file, a pipe, a
    cluster job), a `LineProgress` that prints a plain line every `every` steps (default: a
    twentieth of `total`) or minute instead. Silent on other ranks. Keyword arguments go to tqdm
    (`total`, `initial`, `desc`, `unit`, `delay`: nothing shown for a phase shorter than that, ...)."""
    if not is_main() or kwargs.get("disable"):
        return tqdm(iterable, **{**kwargs, "disable": True})
    if not sys.stderr.isatty():
        return LineProgress(iterable, **kwargs)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


class LineProgress:
    """tqdm's `update`, `set_postfix`, `close` and iteration, written as plain lines for logs:

        DiffewS: step 100/300 | loss=0.0812 shots=1 | 2.41 steps/s | ETA 1:23
        evaluating hazy: image 40/100 | 3.1 images/s | ETA 0:19          (unit="image")

    A line is due every `every` updates (default total // 20), after `seconds` without one, and at
    the last; it is printed once that step's postfix is set (or at the next update/close), and
    none before `delay` seconds have passed since the start."""

    def __init__(self, iterable: Any = None, total: Optional[int] = None, initial: int = 0, desc: str = "",
                 every: Optional[int] = None, seconds: float = 60.0, file: Any = None, unit: str = "step", delay: float = 0.0,
                 **_: Any):  # fmt: skip
        self.iterable, self.desc, self.n, self.initial, self.unit, self.delay = iterable, desc, initial, initial, unit, delay
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.every = every or max(1, (self.total or 20) // 20)
        self.seconds, self.file = seconds, file
        self.postfix, self.due = "", False
        self.started = self.last_line = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()
            self._flush()
        self.close()

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        now = time.perf_counter()
        self.due = self.n % self.every == 0 or self.n == self.total or now - self.last_line >= self.seconds
        self.due = self.due and now - self.started >= self.delay  # a phase shorter than `delay` shows nothing

    def set_postfix(self, ordered_dict: Optional[dict] = None, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())
        self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.due:
            return
        self.due, self.last_line = False, time.perf_counter()
        done = self.n - self.initial
        rate = done / max(self.last_line - self.started, 1e-9)
        parts = [f"{self.desc + ': ' if self.desc else ''}{self.unit} {self.n}" + (f"/{self.total}" if self.total else "")]
        parts += [self.postfix] if self.postfix else []
        parts.append(f"{rate:.3g} {self.unit}s/s")
        if self.total and rate > 0:
            eta = int((self.total - self.n) / rate)
            parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}" if eta >= 3600 else f"ETA {eta // 60}:{eta % 60:02d}")
        print(" | ".join(parts), file=self.file or sys.stderr, flush=True)


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {where}: a tensor must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; an IoU of an absent class is NaN
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"metric {where}: expected a number, string, None or one-element tensor, got {type(value).__name__}"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_metrics(metrics: dict[str, Any], path: PathLike, title: Optional[str] = None) -> str:
    """Write `metrics` to `path`.json and `path`.md (rank 0 only; each file atomically) and
    return the markdown table (every rank), for printing.

    `metrics` is flat, {"mIoU": 51.2, "FB-IoU": 70.1}: a two-column table; or one level nested,
    {"ours": {"mIoU": 51.2}, "baseline": {"mIoU": 12.0}}: one row per key, one column per inner
    key. Values: numbers, strings, None, one-element tensors; NaN and inf become null / "–".
    """
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"metrics must be a non-empty dict, got {metrics!r}")
    nested = all(isinstance(v, dict) for v in metrics.values())
    if nested:
        table = {row: {col: _json_value(v, f"{row}/{col}") for col, v in cols.items()} for row, cols in metrics.items()}
        columns = list(dict.fromkeys(col for cols in table.values() for col in cols))
        lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {row} | " + " | ".join(_cell(cols.get(c)) for c in columns) + " |" for row, cols in table.items()]
    else:
        table = {name: _json_value(v, name) for name, v in metrics.items()}
        lines = ["| metric | value |", "|---|---|"] + [f"| {name} | {_cell(v)} |" for name, v in table.items()]
    markdown = (f"## {title}\n\n" if title else "") + "\n".join(lines) + "\n"
    if is_main():
        path = Path(path)
        _atomic_write_text(path.with_name(path.name + ".md"), markdown)
        _atomic_write_text(path.with_name(path.name + ".json"), json.dumps(table, indent=2) + "\n")
    return markdown
