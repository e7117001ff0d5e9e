"""``mars-trainer``: the command line of the headless engine.

Every command turns bad input into one clear message and a non-zero exit, never a
traceback: errors for people name the file, what was expected and what was found.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import EXIT_BAD_INPUT, CliError
from .dataset import DatasetError

COMMAND_MODULES = ("cli_data", "cli_train", "cli_evaluate", "cli_predict", "cli_review", "cli_model")
"""Each module has ``register(subparsers)`` that adds its commands; adding a command is
adding it to one of them (or a new module here)."""


class ShortUsageParser(argparse.ArgumentParser):
    """A usage error says the one thing that is wrong under a one-line usage (what is
    required, then ``[options]``), not the whole list of options (``train`` has forty)."""

    def short_usage(self) -> str:
        parts = []
        for action in self._actions:
            if not action.option_strings:
                if isinstance(action, argparse._SubParsersAction):
                    parts.append("COMMAND")
                else:
                    parts.append(
                        (action.metavar or action.dest.upper()) + (" ..." if action.nargs == "+" else "")
                    )
            elif action.required:
                parts.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
        return f"usage: {self.prog} {' '.join(parts)} [options]"

    def error(self, message: str):  # type: ignore[override]
        self.exit(
            2,
            f"{self.short_usage()}\n{self.prog}: error: {message}\n({self.prog} --help lists every option)\n",
        )


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = ShortUsageParser(
        prog="mars-trainer",
        description="Headless Mars terrain segmentation: datasets, statistics and training.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=ShortUsageParser
    )
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .allocator import keep_freed_memory
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .corrections import CorrectionsError
    from .device import DeviceError
    from .outputs import OutputError
    from .runs import RunDirError

    keep_freed_memory()
    _say_warnings_plainly()
    completed = False
    try:
        code = int(args.func(args) or 0)
        completed = True
        return code
    except (
        DatasetError,
        CliError,
        ConfigError,
        CheckpointError,
        DeviceError,
        RunDirError,
        CorrectionsError,
        OutputError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1
    finally:
        from .device import shutdown_distributed

        shutdown_distributed(wait_for_peers=completed)


def _say_warnings_plainly() -> None:
    """Warnings about the person's files (a lossy mask, an empty store) read as one
    line, not as a source location."""
    import warnings

    from .dataset import FileWarning

    shown = warnings.showwarning
    if getattr(shown, "marsviewer", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FileWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.marsviewer = True  # type: ignore[attr-defined]
    warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
