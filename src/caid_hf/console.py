"""What a user sees on the console: one style for every ``caid-hf`` command.

- :class:`RunConsole`: a header line, a progress bar with messages printed *above* it
  (``tqdm.write``), and a closing summary. When stderr is not a terminal (a log file, a
  Slurm job) there is no bar: the loop's log lines are printed instead, so a log holds
  plain lines without carriage returns or cursor-movement escape codes.
- :func:`quiet_progress_bars`: silences transformers' own bars (``Writing model shards``)
  while a run saves, so they neither break the layout nor leave escape codes in logs.
- :class:`UserError` and :func:`run_command`: mistakes a user can make (a bad value, a
  missing file, a used output folder, a mistyped flag) end with exit status 2 and one
  message naming the field or file, without a traceback; ``CAID_HF_DEBUG=1`` shows it.
  Programming errors keep their traceback.
- :class:`ArgumentParser`: argparse with snake_case and kebab-case spellings of every flag,
  "did you mean" for mistyped ones, and the argument dataclasses' range checks for options
  of the same name, every mistake reported at once.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

DEBUG_VARIABLE = "CAID_HF_DEBUG"
USER_ERROR_EXIT_CODE = 2
_PACKAGE_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A mistake in what the user asked for (configuration, data, output folder): the
    message says what is wrong and what to do; the command exits with status 2."""


class ConfigurationError(UserError, ValueError):
    """A bad argument or configuration value (named in the message)."""


def _raised_by_caid_hf(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a user's mistake rather than a bug.

    User errors: :class:`UserError`; a missing, existing or unreadable path
    (``FileNotFoundError``, ``FileExistsError``, ``NotADirectoryError``,
    ``IsADirectoryError``, ``PermissionError``); and the ``ValueError`` / ``RuntimeError`` /
    ``FloatingPointError`` that caid-hf raises itself after checking an argument, a file or
    a run (their messages name the field or file). The same exceptions raised inside torch,
    numpy or another library are treated as bugs and keep their traceback.
    """
    if isinstance(error, UserError):
        return True
    if isinstance(error, (FileNotFoundError, FileExistsError, NotADirectoryError,
                          IsADirectoryError, PermissionError)):
        return True
    return isinstance(error, (ValueError, RuntimeError, FloatingPointError)) \
        and _raised_by_caid_hf(error)


def run_command(prog: str, function: Callable[[], object]) -> object:
    """Run a command's ``function``; a user error prints ``prog: error: message`` on stderr
    and exits with status 2 (a user's mistake has no traceback worth reading; with
    ``CAID_HF_DEBUG=1`` it is raised as it is, for developers)."""
    try:
        return function()
    except Exception as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0") or not is_user_error(error):
            raise
        message = str(error).strip() or type(error).__name__
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message = f"{message}: {error.filename}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


def suggest_flag(flag: str, known: list[str]) -> str:
    """``"; did you mean '--learning_rate'?"`` for a mistyped ``--flag`` (or ``""``)."""
    normal = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    candidates = sorted({option.lstrip("-").replace("-", "_") for option in known
                         if option.startswith("--")})
    close = difflib.get_close_matches(normal, candidates, n=1, cutoff=0.6)
    return f"; did you mean '--{close[0]}'?" if close else ""


def joined_mistakes(mistakes: list[str]) -> str:
    """One mistake as it is; several numbered on their own lines."""
    if len(mistakes) == 1:
        return mistakes[0]
    return f"{len(mistakes)} mistakes:\n" + "\n".join(
        f"  {k}. {m}" for k, m in enumerate(mistakes, 1))


def unknown_flags_message(extras: list[str], known: list[str]) -> str:
    """The message for arguments no option took, each flag with its suggestion."""
    flags = [e for e in extras if e.startswith("-")]
    if not flags:
        return f"unrecognized arguments: {' '.join(extras)}"
    parts = [f"unknown flag {flag.split('=', 1)[0]!r}{suggest_flag(flag, known)}"
             for flag in flags]
    return "; ".join(parts)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the hand-written subcommands: every ``--kebab-case`` flag is also
    accepted as ``--snake_case`` (the spelling ``pretrain`` and ``finetune`` use, after
    transformers), a mistyped flag gets "did you mean", and every option named like an
    argument-class field is range-checked by that field's rule, all mistakes at once."""

    def add_argument(self, *names, **kwargs):
        spellings = list(names)
        for name in names:
            if name.startswith("--"):
                for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if other not in spellings:
                        spellings.append(other)
        if spellings != list(names) and "dest" not in kwargs and names[0].startswith("--"):
            kwargs["dest"] = names[0][2:].replace("-", "_")
        return super().add_argument(*spellings, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unknown_flags_message(extras, option_strings(self)))
        mistakes = self.value_mistakes(namespace)
        if mistakes:
            self.error(joined_mistakes(mistakes))
        return namespace

    def value_mistakes(self, namespace: argparse.Namespace) -> list[str]:
        """Every option out of its range, by the rules the argument dataclasses use for the
        field of the same name (:data:`caid_hf.config_parsing.VALUE_RULES`), each message
        starting with the flag."""
        from .config_parsing import value_mistake  # standard library and PyYAML

        mistakes = []
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            flag = action.option_strings[0] if action.option_strings else action.dest
            values = value if isinstance(value, list) else [value]
            mistakes += [m for v in values if (m := value_mistake(action.dest, v, flag))]
        return mistakes

    def error(self, message: str):
        """A short usage line (positionals, then ``[options]``) above ``prog: error: …``:
        the full usage of a dozen options would bury the message."""
        positionals = [action.metavar or action.dest for action in self._actions
                       if not action.option_strings]
        self.exit(2, f"usage: {' '.join([self.prog, *positionals])} [options] "
                     f"(--help lists them)\n{self.prog}: error: {message}\n")

    def format_help(self) -> str:  # show one spelling per flag: the first given
        with _first_spelling_only(self):
            return super().format_help()

    def format_usage(self) -> str:
        with _first_spelling_only(self):
            return super().format_usage()


@contextlib.contextmanager
def _first_spelling_only(parser: argparse.ArgumentParser) -> Iterator[None]:
    saved = [(action, action.option_strings) for action in parser._actions]
    for action, options in saved:
        long = [o for o in options if o.startswith("--")]
        if len(long) > 1:
            action.option_strings = [o for o in options if not o.startswith("--")] + long[:1]
    try:
        yield
    finally:
        for action, options in saved:
            action.option_strings = options


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars (e.g. ``Writing model shards`` in
    ``save_pretrained``) inside the block; restore the previous setting after it."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """``from_pretrained`` without transformers' ``Loading weights`` bar and load report
    (the caller reports what matters, e.g. that a new head was initialised)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with quiet_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 04 s"``, ``"1 h 02 min"``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def describe_hardware(accelerator) -> str:
    """The hardware of a run, e.g. ``1 × NVIDIA H100 80GB HBM3``, ``CPU (2 cores)`` or
    ``2 processes sharing one CPU (2 cores)`` (CPU processes of one machine share its
    cores, so they are not counted as CPUs)."""
    import torch

    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} × {torch.cuda.get_device_name(accelerator.device)}"
    cores = os.cpu_count() or 1
    if n == 1:
        return f"CPU ({cores} cores)"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    machines = max(1, n // max(1, local))
    if machines == 1:
        return f"{n} processes sharing one CPU ({cores} cores)"
    return f"{n} processes on {machines} machines' CPUs ({cores} cores each)"


class RunConsole:
    """Console output of a training-like command on the (local) main process.

    ``header`` prints what runs where; ``bar`` shows progress on a terminal; ``say`` prints
    a line above the bar; ``log`` prints a line only where there is no bar (a log file
    gets the loop's logged numbers instead of a bar); ``summary`` closes the bar and
    prints the closing lines.
    """

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._bar = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def header(self, *lines: str) -> None:
        for line in lines:
            self.say(line)

    def bar(self, total: int, initial: int = 0, desc: str = "") -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                         file=self.stream, disable=not (self.enabled and self.interactive))

    def update(self, steps: int = 1, **postfix: str) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def log(self, line: str) -> None:
        if self._bar is None or self._bar.disable:
            self.say(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, *lines: str) -> None:
        self.close()
        for line in lines:
            self.say(line)
