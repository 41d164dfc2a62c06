"""Command lines: every script's flags come from one dataclass, each field's help from `arg`.

    @dataclass
    class TrainConfig:
        steps: int = arg(1000, "optimizer steps", group="optimization")

gives `--steps` (default 1000) under the heading "optimization" in `--help`; bools become
`--x/--no-x`, and a list field takes the positional arguments.
"""

import argparse
import sys
from dataclasses import MISSING, field, fields


def arg(default, help, group=None):
    """A dataclass field with its command-line help (and the heading its group starts, if any)."""
    metadata = {"help": help, "group": group}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


def add_config_args(parser, cls):
    """One --flag per field of dataclass `cls` (--batch-size for batch_size), grouped by heading."""
    target = parser
    for f in fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with arg(default, help)")
        if f.metadata["group"] is not None:
            target = parser.add_argument_group(f.metadata["group"])
        default = f.default_factory() if f.default is MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        shown = f"{text} (default: %(default)s)"
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction
            target.add_argument(flag, action=action, default=default, help=shown)
        elif isinstance(default, list):  # a list takes the positional arguments (e.g. input files)
            target.add_argument(f.name, nargs="*", default=default, help=text)
        else:
            target.add_argument(flag, type=type(default), default=default, help=shown)


def parse_config(doc, configs, argv=None, default=None):
    """Parse the command line into a config dataclass.

    configs: one dataclass -> returns an instance of it; or {command: dataclass} for subcommands ->
    returns (command, instance); `default` names the command run when none is given.
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=doc, formatter_class=formatter)
    if isinstance(configs, type):
        add_config_args(parser, configs)
        return configs(**vars(parser.parse_args(argv)))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in configs.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        add_config_args(sub.add_parser(name, help=summary, description=cls.__doc__), cls)
    argv = sys.argv[1:] if argv is None else list(argv)
    if default is not None and (not argv or argv[0] not in (*configs, "-h", "--help")):
        argv = [default, *argv]
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    return command, configs[command](**args)


def run_main(main):
    """Run a script's main() and return what it returns; bad input (ValueError, FileNotFoundError)
    ends it with its one-line message and exit status 1 instead of a traceback. Tests call
    main(argv) and see the exception."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
