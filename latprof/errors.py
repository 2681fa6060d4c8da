"""Error types. Every error a user can cause is a LatprofError whose message names the problem and the fix;
the CLI catches LatprofError once, prints one line and exits with its exit code."""

from __future__ import annotations


class LatprofError(Exception):
    """Base class: `message` says what is wrong, `fix` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message} ({fix})" if fix else message)

    def one_line(self) -> str:
        text = f"error: {self.message}"
        if self.fix:
            text += f" -- fix: {self.fix}"
        return " ".join(text.split())


class UsageError(LatprofError):
    """Bad command-line input: unknown model, bad token counts, impossible budget."""


class ConfigError(LatprofError):
    """A device config that is missing, malformed, or names an unknown field."""


class DependencyError(LatprofError):
    """An optional dependency is not installed."""


class ExportError(LatprofError):
    """A unit could not be exported, or ONNX/onnxruntime disagrees with torch."""


class CompileError(LatprofError):
    """TVM could not import, tune or compile a graph."""


class DeviceError(LatprofError, ConnectionError):
    """The device could not be reached, or dropped during a run."""


class HostKeyError(DeviceError):
    """An SSH host key is unknown or has changed."""


class LutError(LatprofError, ValueError):
    """A lookup table that is malformed, of another schema, or asked outside its range."""


class InfeasibleError(UsageError):
    """A latency budget no token schedule can meet."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a DependencyError that names the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"missing dependency '{module}' ({exc})", f"pip install 'latprof[{extra}]'"
        ) from None


def run_script(main) -> int:
    """A benchmark script's `main()` with the CLI's contract: a LatprofError is one line on stderr and
    its exit code, never a traceback (the script's own runs measured so far stay in its workdir)."""
    import sys

    try:
        return main() or 0
    except LatprofError as exc:
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
