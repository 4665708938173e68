"""Third-party chatter to a log file, so a stage's console shows its progress bars and summary.

Training and export pull in libraries that talk a lot: gptqmodel progress, torch `_pytree`
deprecation warnings, bitsandbytes backend probes, onnxruntime's "skip to quantize" lines.
While a stage runs, `route_logs` sends Python logging (every logger, including those libraries
gave console handlers of their own) and `warnings` to the stage's log file; on the console
stay toolkit's own warnings, or everything with `--verbose`. Records that arrive before the
stage's folder exists are kept and written once it is attached. A library that installs its
console handler after the stage started (torch and transformers do on import) is caught at the
next record that reaches the file after new loggers appeared, and when the file is attached.

Bytes a library writes straight to stdout/stderr (gptqmodel's per-layer progress bars: ~10,000
lines per export) are not logging: a step known to print them runs inside `terminal_to_log`,
which points file descriptors 1 and 2 at the log file for that block. Children toolkit starts
capture their output and log it (the ONNX exporter, see `toolkit.export.onnx`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: lines kept while no file is attached (a process that never attaches one: a non-main rank)
PENDING_LINES = 10_000


class RoutedLogs(logging.Handler):
    """The log file of one stage run; records wait in memory until `attach` names the file.

    Attributes:
        console: the handler that shows toolkit's warnings (everything when verbose).
        path: the log file, once attached.
    """

    def __init__(self, verbose: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.verbose = verbose
        self.console = logging.StreamHandler(sys.stderr)
        self.console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.console.addFilter(_console_filter(verbose))
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.path: Path | None = None
        self._stream: IO[str] | None = None
        self._pending: deque[str] = deque(maxlen=PENDING_LINES)
        self._muted: list[tuple[logging.Logger, logging.Handler, bool]] = []
        self._loggers_seen = 0

    def mute_console_handlers(self, include_root: bool = True) -> None:
        """Detach the terminal handlers of every logger; their records reach the file
        through the root instead (`unmute` puts them back).

        Args:
            include_root: False while the root is dispatching a record (its handler list
                must not change under it).
        """
        root = logging.getLogger()
        self._loggers_seen = len(logging.Logger.manager.loggerDict)
        for logger, handler in _console_handlers():
            if handler is self.console or (logger is root and not include_root):
                continue
            self._muted.append((logger, handler, logger.propagate))
            logger.removeHandler(handler)
            if logger is not logging.getLogger():
                logger.propagate = True

    def unmute(self) -> None:
        """Give the loggers their handlers and propagation back."""
        for logger, handler, propagate in reversed(self._muted):
            logger.addHandler(handler)
            logger.propagate = propagate
        self._muted.clear()

    def attach(self, path: Path) -> None:
        """Write to `path` (appending: a resumed run keeps its earlier log) from now on."""
        self.mute_console_handlers()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock or contextlib.nullcontext():
            self._stream = path.open("a", encoding="utf-8")
            self.path = path
            for line in self._pending:
                self._stream.write(line + "\n")
            self._pending.clear()
            self._stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if len(logging.Logger.manager.loggerDict) != self._loggers_seen:
                self.mute_console_handlers(include_root=False)  # a library was imported
            line = self.format(record)
            if self._stream is None:
                self._pending.append(line)
            else:
                self._stream.write(line + "\n")
                self._stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the stage (stdlib pattern)
            self.handleError(record)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


def _console_filter(verbose: bool) -> logging.Filter:
    """Toolkit's own warnings (everything with --verbose) go to the console."""
    ours = logging.Filter("toolkit")

    class _Console(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return verbose or (record.levelno >= logging.WARNING and bool(ours.filter(record)))

    return _Console()


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """Handlers that write to the terminal, on the root and on any library logger.

    A handler writing elsewhere (a file, pytest's capture buffer) is left alone.
    """
    terminals = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    return [(logger, handler) for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and id(getattr(handler, "stream", None)) in terminals]


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, file: Any = None, line: str | None = None) -> None:
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning("%s", text)


@contextlib.contextmanager
def route_logs(path: Path | None = None, *, verbose: bool = False) -> Iterator[RoutedLogs]:
    """Route logging and warnings to a stage's log file while the block runs.

    Args:
        path: the log file, when its folder may be created now; else call `attach` once
            the stage has made its folder.
        verbose: also show every record on the console (stderr).

    Yields:
        The file handler (`attach`, `path`).
    """
    root = logging.getLogger()
    sink = RoutedLogs(verbose)
    sink.mute_console_handlers()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(sink)
    root.addHandler(sink.console)
    if path is not None:
        sink.attach(path)
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters afterwards
            warnings.showwarning = _warning_to_log
            yield sink
    finally:
        root.removeHandler(sink.console)
        root.removeHandler(sink)
        sink.close()
        root.setLevel(level)
        sink.unmute()


@contextlib.contextmanager
def terminal_to_log() -> Iterator[None]:
    """Send what is written to file descriptors 1 and 2 to the stage's log while the block runs.

    For library code that prints its own progress (bypassing logging and `sys.stdout`
    replacements alike). A no-op outside `route_logs`, before its file is attached, and with
    `--verbose`: the user then sees everything, as asked.
    """
    sink = next((h for h in logging.getLogger().handlers if isinstance(h, RoutedLogs)), None)
    if sink is None or sink.verbose or sink.path is None:
        yield
        return
    streams = (sys.stdout, sys.stderr)
    for stream in streams:
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with sink.path.open("ab") as target:
            os.dup2(target.fileno(), 1)
            os.dup2(target.fileno(), 2)
            try:
                yield
            finally:
                for stream in streams:
                    stream.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
