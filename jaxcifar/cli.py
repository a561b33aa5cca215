"""The command lines' plumbing: the training command line (absl flags with ml_collections' config file, every
mistake in it one line and exit code 2, no traceback, before any data is read or anything compiled), and every
command's one-line answer to Ctrl-C."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxcifar import errors


def interrupt_exits_quietly() -> None:
    """Ctrl-C from now on: one line and exit code 130 at once, without the interpreter's teardown. For a command's
    start, before its heavy imports (jax, tfds, torch: seconds), where a KeyboardInterrupt would be a traceback.

    Acted on at once by a thread (signal_watch: the main thread may sit in one compiled call for many seconds);
    the Python-level handler stays for the moments the main thread is free, or where no pipe can be made."""
    import signal
    import threading

    from jaxcifar.run.signal_watch import WakeupWatcher

    exiting = threading.Lock()

    def exit_quietly(*_):
        if not exiting.acquire(blocking=False):
            return  # the other route is printing and exiting
        print("\njaxcifar: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, exit_quietly)
    try:
        WakeupWatcher([signal.SIGINT], exit_quietly, "interrupt")  # lives as long as the process
    except OSError:  # no pipe to be had (out of file descriptors): the Python-level handler alone
        pass


def run_command(main) -> None:
    """Runs a command's `main()` and exits with its code. Ctrl-C outside training (whose own handler saves first) is
    one line and exit code 130, never a traceback; the process then ends without the interpreter's teardown, which
    crashed with XLA threads mid-compile (reported: `evaluate` interrupted while compiling, SIGSEGV in 2 of 3 tries)."""
    try:
        code = main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr, flush=True)  # a command's refusal, SystemExit("error: ..."): a usage error
        code = 2
    except Exception as e:  # noqa: BLE001 - one line each, by failure()
        code, line = failure(e)
        print(line, file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:
        print(f"\n{failure(e)[1]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    sys.exit(code)


def failure(e: BaseException, workdir: Path | None = None) -> tuple[int, str]:
    """(exit code, the one line that says it) of an exception no command handled; every command's, training's too.
    A problem with the user's input or files is exit code 2; a bug is 1, its traceback kept in `workdir`'s log.txt
    or a file of its own, named in the line."""
    if isinstance(e, errors.JaxcifarError):
        return 2, f"error: {e}"
    if isinstance(e, MemoryError):
        return 2, f"error: {errors.OUT_OF_MEMORY}"
    if isinstance(e, KeyboardInterrupt):
        return 130, "jaxcifar: interrupted (Ctrl-C)"
    from jaxcifar.run import runlog

    return 1, f"error: unexpected {type(e).__name__}: {errors.first_line(e)} ({runlog.keep_traceback(workdir)})"


def define_flags() -> None:
    """--config (a file with get_config(), fields overridden by --config.key=value) and --workdir."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/vgg.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for logs, checkpoints and the report.")
    flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake in the command line as one line and exit code 2."""
    from absl import flags

    if any(a in ("--help", "-h", "-?", "--helpshort") for a in argv[1:]):
        from absl import app

        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
    config_file = _flag_value(argv, "--config")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    if config_file is None and overrides:
        _usage_error(f"{overrides[0]} is given without --config; name the config file it overrides first, e.g. "
                     f"--config configs/vgg.py {overrides[0]}=...")
    if config_file is not None and not Path(config_file.split(":")[0]).is_file():
        _usage_error(f"--config {config_file}: no such file; give a config file such as configs/vgg.py")
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # ml_collections warns of a None config before we say it
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a bad value or a missing flag
        text = str(e).strip().splitlines()
        missing = next((f for f in ("--config", "--workdir") if f"{f}=None" in text[0]), None)
        if missing == "--config" and config_file is not None:
            _usage_error(f"--config {config_file}: get_config() returned None; it must return the recipe's "
                         "ml_collections.ConfigDict, as configs/vgg.py does")
        _usage_error(f"{missing} is required" if missing else text[0] + (f" ({text[-1].strip()})" if len(text) > 1 else ""))
    except Exception as e:  # absl loaded the config file (running its code), then applied the overrides
        _usage_error(_config_error(config_file, overrides, e))


def _config_error(config_file: str, overrides: list[str], e: Exception) -> str:
    """The one line for what failed in loading the config file or applying the overrides: the file's own code
    first (whatever it raised), then an override naming no field (ml_collections: an AttributeError, or a KeyError
    inside a group that does not exist)."""
    if isinstance(e, AttributeError) and "get_config" in str(e):
        return (f"--config {config_file}: the file defines no get_config(); a config file returns its "
                "ml_collections.ConfigDict from get_config(), as configs/vgg.py does")
    try:
        unknown = _unknown_field(config_file, overrides)  # loads the file again, without the overrides
    except Exception as own:  # the file's code raised: the error is there, not in the overrides
        return _cannot_load(config_file, own)
    if unknown:
        return unknown
    if isinstance(e, AttributeError):
        return f"{errors.first_line(e)}; check the --config.* overrides against {config_file}"
    return _cannot_load(config_file, e)


def _cannot_load(config_file: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"--config {config_file}: cannot be loaded ({type(e).__name__}: {first}); fix the file or give another"


def _unknown_field(config_file: str, overrides: list[str]) -> str | None:
    """'--config.num_epoch: configs/tiny.py has no field num_epoch; did you mean num_epochs?' for the first override
    that names no field (ml_collections' own message is escaped twice over)."""
    import difflib

    from jaxcifar import config as config_lib

    config = config_lib.load_config_file(config_file.split(":")[0])
    for flag in overrides:
        node, path = config, flag[len("--config."):].split(".")
        for depth, key in enumerate(path):
            if not hasattr(node, "keys"):
                group = ".".join(path[:depth])
                return (f"{flag}: {group} in {config_file} is a single value, not a group of fields; "
                        f"give --config.{group}=VALUE")
            fields = list(node.keys())
            if key not in fields:
                where = ".".join(path[:depth]) + "." if depth else ""
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean --config.{where}{close[0]}?" if close else (
                    f"its fields are documented in {config_file} and jaxcifar/config.py")
                return f"{flag}: {config_file} has no field {where}{key}; {hint}"
            node = node[key]
    return None


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
