"""How the command line speaks: "did you mean" for a mistyped option, Python argument names in error messages
replaced by the flags that set them, and failures as one line (the traceback only with `--debug`)."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys

# Python argument names (as the library's errors spell them) -> the flag that sets them.
PYTHON_FLAGS = {
    "erase_scale": "--erase-scale", "preserve_scale": "--preserve-scale", "token_mode": "--token-mode",
    "technique": "--technique", "lamb": "--lamb", "method": "--method", "method_options": "--method-option",
    "harden": "--harden", "harden_options": "--harden-reg", "held_out": "--held-out", "expand_prompts":
    "--expand-prompts", "moderate": "--moderate", "num_inference_steps": "--steps", "batch_size": "--batch-size",
    "guidance_scale": "--guidance", "clip_model": "--clip-model", "nudenet_threshold": "--nudenet-threshold",
    "max_iterations": "--max-iterations", "tolerance": "--tolerance", "ratios": "--ratios", "rank": "--rank",
    "limit": "--limit", "metrics": "--metrics", "allow_safety_checker": "--keep-safety-checker",
}
_NAMES = "|".join(sorted(map(re.escape, PYTHON_FLAGS), key=len, reverse=True))
_ASSIGNED = re.compile(rf"(?<![\w.-])({_NAMES})=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)")
_INDEXED = re.compile(r"(?<![\w-])(method_options|harden_options)\[['\"](\w+)['\"]\]")
_BARE = re.compile(rf"(?<![\w-])({'|'.join(n for n in PYTHON_FLAGS if '_' in n or n in ('harden', 'lamb'))})(?![\w(])")


def flag_names(message: str) -> str:
    """`message` with the Python argument names it mentions replaced by their flags: `technique='replace'` becomes
    `--technique replace`, `method_options['threshold']` becomes `--method-option threshold`, `edit_keys=False`
    becomes `--no-edit-keys`."""
    message = message.replace("edit_keys=False", "--no-edit-keys")
    message = message.replace("allow_safety_checker=True", "--keep-safety-checker")
    message = _INDEXED.sub(lambda m: "--harden-reg" if m[1] == "harden_options" else f"--method-option {m[2]}",
                           message)
    message = _ASSIGNED.sub(lambda m: f"{PYTHON_FLAGS[m[1]]} {m[2].strip(chr(39) + chr(34))}", message)
    return _BARE.sub(lambda m: PYTHON_FLAGS[m[1]], message)


def unknown_options(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """The usage error for the arguments `parser` did not recognise, with the closest option of each mistyped flag
    ("did you mean --erase?")."""
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    parts = []
    for token in extra:
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag.startswith("-") else []
        parts.append(f"{token} (did you mean {close[0]}?)" if close else token)
    return "unrecognized arguments: " + " ".join(parts)


class ErrorLines(logging.Handler):
    """While a command runs, prints the library's log records on stderr as Python's default handler does, except its
    ERROR lines, which it keeps: a failure is then reported once, as one line."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.lines.append(record.getMessage())
        else:
            print(record.getMessage(), file=sys.stderr, flush=True)

    def __enter__(self) -> "ErrorLines":
        self.logger = logging.getLogger("diffusers_uce")
        self.propagate, self.logger.propagate = self.logger.propagate, False
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate
