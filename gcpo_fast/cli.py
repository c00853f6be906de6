"""The command lines of the gcpo_fast commands besides the trainer's: the trainer's options under the trainer's
names, and errors as one line on stderr, exit status 2 for a usage error (a bad argument) and 1 for a failure
while running.

    from gcpo_fast.cli import ArgumentParser, add_options, components

    ap = ArgumentParser(prog="python -m gcpo_fast.eval", description=...)
    add_options(ap, RolloutConfig, "max_completion_length", "temperature")   # --temperature as the trainer has it
    args = ap.parse_args(argv)        # a malformed flag: "python -m gcpo_fast.eval: error: ... (see --help)", exit 2
    (rollout,) = components(ap, args, RolloutConfig)   # its own checks; a refused value exits 2
    ap.fail("--batch_size must be >= 1")               # exit 2
    ap.fail("cannot load the weights: ...", status=1)
"""

import argparse
import dataclasses
import types
import typing

from gcpo_fast.errors import ConfigError


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help already says where the default comes from."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        shown = (
            "none" if default in (None, []) else " ".join(map(str, default)) if isinstance(default, list) else default
        )
        return f"{text} (default: {shown})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and each option's default in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str):
        # argparse prints its usage block (several lines) before the error; --help has it
        self.fail(f"{message} (see --help)")

    def fail(self, message: str, status: int = 2):
        self.exit(status, f"{self.prog}: error: {message}\n")


def add_options(parser: argparse.ArgumentParser, component, *names: str) -> None:
    """Add the options `names` of a component's options dataclass (gcpo_fast/options.py) to a command's parser
    as the trainer's command line has them: the same flag, type, default and --help, so one option has one name
    in every command. Build the component from the parsed values with `components` (its own checks run)."""
    group = parser.add_argument_group(getattr(component, "_argument_group_name", None))
    hints = typing.get_type_hints(component)
    fields = {f.name: f for f in dataclasses.fields(component)}
    for name in names:
        field = fields[name]
        kind = hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: the option's own type
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        kwargs = dict(field.metadata, default=default, type=kind)
        if typing.get_origin(kind) is list:
            kwargs.update(type=typing.get_args(kind)[0], nargs="+")
        elif kind is bool:
            kwargs.update(type=_boolean, nargs="?", const=True)  # `--trust_remote_code` alone means true
        group.add_argument(f"--{name}", **kwargs)


def components(parser: "ArgumentParser", args: argparse.Namespace, *classes):
    """Each component built from the parsed values of its options that the command has (the rest take their
    defaults); a value its own checks refuse is one line and exit status 2."""
    built = []
    for cls in classes:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        try:
            built.append(cls(**values))
        except ConfigError as e:
            parser.fail(str(e))
    return built


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
