"""Command lines: every script's flags come from one dataclass, each field's help from `arg`.

    @dataclass
    class TrainConfig:
        steps: int = arg(1000, "optimizer steps", group="optimization")

gives `--steps` (default 1000) under the heading "optimization" in `--help`; bools become
`--x/--no-x`, and a list field takes the positional arguments.
"""

import argparse
import errno
import os
import signal
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
    parser = argparse.ArgumentParser(description=doc, formatter_class=formatter, epilog=DEBUG_HELP)
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


# -----------------------------------------------------------------------------
# errors: bad input and a faulty environment in one line; a bug in the library with its traceback

DEBUG = "CLT_FORGE_DEBUG"
DEBUG_HELP = f"--debug (or {DEBUG}=1): show the traceback of any error"
FULL = "free space (or raise the limit) and rerun: the files written whole are kept"
ENVIRONMENT = {  # errno -> what it means for a user, and the fix
    errno.ENOSPC: ("the disk is full", FULL),
    errno.EDQUOT: ("the disk quota is used up", FULL),
    errno.EFBIG: ("the file size limit is reached (ulimit -f)", FULL),
    errno.EACCES: ("permission denied", "fix its permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose another path"),
    errno.EROFS: ("the file system is read-only", "choose a writable path"),
    errno.ELOOP: ("a loop of symbolic links", "fix the link or choose another path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("it is a folder, not a file", "give the file's path"),
    errno.EEXIST: ("it exists already and is in the way", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("an input/output error of the device", "check the disk, then rerun"),
}


def one_line(e):
    """The one line that ends a run on exception e, or None: a bug, shown with its traceback."""
    if isinstance(e, (ValueError, FileNotFoundError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in ENVIRONMENT:
        what, fix = ENVIRONMENT[e.errno]
        where = f" at {e.filename}" if e.filename else ""
        return f"{what}{where} ({errno.errorcode[e.errno]}): {fix}"
    return None


def run_main(main):
    """Run a script's main() and return what it returns. Bad input (ValueError, FileNotFoundError)
    and a faulty environment (a full disk, a permission, a path: ENVIRONMENT) end it with one line
    and exit status 1 instead of a traceback; any other exception is a bug and keeps its
    traceback, as every error does with --debug or CLT_FORGE_DEBUG=1. Tests call main(argv) and
    see the exception."""
    # a file grown past `ulimit -f` raises SIGXFSZ, which kills the process unless ignored: then
    # the write fails with OSError(EFBIG) like any other full disk (inherited by worker processes)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    debug = "--debug" in sys.argv or os.environ.get(DEBUG, "") not in ("", "0")
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        return main()
    except Exception as e:
        message = None if debug else one_line(e)
        if message is None:
            raise
        sys.exit(f"error: {message}")
