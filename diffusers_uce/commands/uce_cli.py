"""The `diffusers-uce` command line: `diffusers-uce edit ...`, `diffusers-uce eval ...`, `diffusers-uce push DIR REPO`.

Each subcommand is a module of this package (`edit`, `eval`, `push`) with the same small interface, registered in
`COMMANDS`:

- `HELP` (`str`): its one-line help, shown in `diffusers-uce --help`;
- `EPILOG` (`str`): examples and notes, shown at the end of `diffusers-uce COMMAND --help`;
- `add_arguments(parser)`: adds its arguments to its parser;
- `run(args) -> int`: runs it and returns the exit code.

The command line prints progress on stderr and results (the report, the summary table, a URL) on stdout.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from types import ModuleType

from ..utils.versions import __version__
from . import edit as edit_command
from . import eval as eval_command
from . import push as push_command
from .common import hide_backend_notices
from .messages import ErrorLines, flag_names, unknown_options

PROG = "diffusers-uce"

# Subcommands by name, in the order `diffusers-uce --help` lists them.
COMMANDS: dict[str, ModuleType] = {"edit": edit_command, "push": push_command, "eval": eval_command}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks; appends "(default: X)" to options whose default is a real value; never breaks a
    line inside a hyphenated name (`--no-edit-keys`, `demo-flux`)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line (with a pointer to --help) instead of the full usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-uce` argument parser, with one subparser per entry of `COMMANDS`.

    Returns:
        `argparse.ArgumentParser`: the parser; a parsed command line's `run` is the subcommand's `run`.
    """
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter, epilog=edit_command.EPILOG.split("\n\n")[0] + "\n\nRun "
        "'diffusers-uce COMMAND --help' for a command's options.",
        description="Unified Concept Editing (Gandikota et al., WACV 2024) for diffusers pipelines (Stable Diffusion "
                    "1.x/2.x,\nSDXL, FLUX): erase, moderate and debias concepts in closed form.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    parser.subcommands = {}
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.HELP, description=command.HELP[0].upper() + command.HELP[1:]
                                    + ".", epilog=command.EPILOG, formatter_class=_Formatter)
        command.add_arguments(sub)
        sub.add_argument("--debug", action="store_true", help="on failure, print the full traceback too")
        sub.set_defaults(run=command.run)
        parser.subcommands[name] = sub
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `diffusers-uce` command line.

    Args:
        argv (`list[str]`, *optional*): the arguments, without the program name; `sys.argv[1:]` by default.

    Returns:
        `int`: the exit code: 0 on success, 2 for bad arguments or a failure to load, edit, save or push (with a
        one-line reason on stderr; `--debug` prints the traceback too), 130 if interrupted.
    """
    hide_backend_notices()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.subcommands[args.command].error(unknown_options(parser.subcommands[args.command], extra))
    except SystemExit as exit_:  # --help/--version (0) and argparse's usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    with ErrorLines() as logged:
        try:
            return args.run(args)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - every failure is one line; --debug adds the traceback
            if args.debug:
                traceback.print_exc()
            print(f"{PROG}: error: {_one_line(error, logged.lines)}", file=sys.stderr)
            return 2


def _one_line(error: Exception, logged: list[str]) -> str:
    """The message of a failure: what the library logged about it (which says more: what was left as it was), else
    the error itself, with its flags named as the command line spells them."""
    message = logged[-1] if logged else str(error)
    if not isinstance(error, (ValueError, TypeError, OSError, ImportError)):  # unexpected: say what it was
        message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
    return flag_names(" ".join(message.split()) or type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
