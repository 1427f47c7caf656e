"""Tools a model calls during a rollout, and the one safe way to call them.

A tool is user code: any callable. The classic form (TRL 0.7's TextEnvironment) takes one string and returns
one string; the chat-template form is a Python function with typed, documented arguments, called with the
keyword arguments the model wrote as JSON. Either way a rollout must survive it: `call_tool` turns whatever
the tool does into a `ToolResult` whose text goes back to the model.

    raises        -> the text "ExceptionType: message", training goes on
    hangs         -> the call is abandoned after `timeout` seconds ("timeout after Xs")
    floods        -> the text is cut to `max_chars`, ending with a visible marker

An in-process Python callable cannot be killed: on timeout its worker thread (a daemon) is left running, and
only stops when the call returns or the process exits. Code that may never return must therefore run in a
process of its own, which can be killed: that is why the shipped `PythonInterpreter` runs the model's code
in a subprocess with wall-time, CPU-time, memory and output limits, never in the training process.

Shipped tools: `Calculator` (arithmetic parsed with `ast`, nothing evaluated but numbers and + - * / **),
`SimpleCalculatorTool` (the same, answering in the float format of the hub tool TRL's calculator example
loads) and `PythonInterpreter`.
"""

from __future__ import annotations

import ast
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TRUNCATION_MARKER = "...[truncated]"


@dataclass
class ToolResult:
    """What one tool call gave back.

    text: what goes back to the model (the output, or the error text), already truncated to max_chars;
    error: "ExceptionType: message" when the tool raised, "timeout after Xs" when it timed out, else None;
    timed_out: the call was abandoned at the timeout; truncated: text was cut to max_chars.
    """

    text: str
    error: str | None
    timed_out: bool
    truncated: bool


def truncate_text(text: str, max_chars: int | None) -> tuple[str, bool]:
    """(text cut to at most `max_chars` characters ending with TRUNCATION_MARKER, whether it was cut).
    None: no limit. A limit shorter than the marker cuts without it."""
    if max_chars is None or len(text) <= max_chars:
        return text, False
    if max_chars <= len(TRUNCATION_MARKER):
        return text[:max_chars], True
    return text[: max_chars - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER, True


# TRL 0.7's call syntax: <request><ToolName>query<call>answer<response> (<submit> ends an episode).
REQUEST, CALL, RESPONSE, SUBMIT = "<request>", "<call>", "<response>", "<submit>"


def parse_classic_call(text: str, request: str = REQUEST, call: str = CALL) -> tuple[str | None, str | None]:
    """(tool name, query) of the first `<request><name>query<call>` in text, or (None, None). Anything between
    <request> and the name is skipped; the query is everything after the name's `>`."""
    found = re.search(re.escape(request) + "(.*?)" + re.escape(call), text, re.DOTALL)
    if found is None:
        return None, None
    name = re.search(r"<(.*?)>", found.group(1))
    if name is None:
        return None, None
    return name.group(1), found.group(1).split(">", 1)[1]


def tool_name(tool: Callable[..., Any]) -> str:
    """The name a model calls a tool by: a function's __name__, else the class name of a tool object (as TRL
    0.7's TextEnvironment named the tools of a list, which its example prompts rely on)."""
    return getattr(tool, "__name__", None) or type(tool).__name__


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _invoke(tool: Callable[..., Any], arguments: str | dict[str, Any]) -> str:
    """The tool's answer as text: tool(arguments) for a string, tool(**arguments) for a dict; None -> ""."""
    value = tool(**arguments) if isinstance(arguments, dict) else tool(arguments)
    return "" if value is None else str(value)


def _run_in_thread(call: Callable[[], str], timeout: float, name: str) -> dict[str, Any]:
    """{"value": ...} or {"error": exception} from call() in a daemon thread, or {} if it is still running
    after `timeout` seconds (then it is abandoned: a thread cannot be killed)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except (Exception, SystemExit) as error:  # the tool's failure is the model's feedback
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"tool:{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    return dict(outcome)  # a copy: the abandoned thread may still write into `outcome` later


def call_tool(tool: Callable[..., Any], arguments: str | dict[str, Any], *, timeout: float | None = 10.0,
              max_chars: int | None = 1000) -> ToolResult:
    """Call user code `tool` with `arguments` and contain whatever it does (see the module docstring).

    arguments: a string -> tool(arguments) (the classic str -> str tool); a dict -> tool(**arguments) (a
    JSON-schema'd function). The return value becomes text with str() (None -> ""). timeout: seconds before
    the call is abandoned (None: wait as long as it takes, in this thread). max_chars: the longest text
    returned (None: no limit). A non-callable tool or arguments of another type are the caller's bug, and
    raise TypeError rather than going back to the model.
    """
    if not callable(tool):
        raise TypeError(f"tool must be callable (a function, or an object with __call__), got {type(tool).__name__}.")
    if not isinstance(arguments, (str, dict)):
        raise TypeError(f"arguments must be a str (tool(arguments)) or a dict (tool(**arguments)), got "
                        f"{type(arguments).__name__}.")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds or None (no limit), got {timeout}.")
    if timeout is None:
        try:
            outcome: dict[str, Any] = {"value": _invoke(tool, arguments)}
        except (Exception, SystemExit) as error:
            outcome = {"error": error}
    else:
        outcome = _run_in_thread(lambda: _invoke(tool, arguments), timeout, tool_name(tool))
    if "value" in outcome:
        text, truncated = truncate_text(outcome["value"], max_chars)
        return ToolResult(text, None, False, truncated)
    error = _describe(outcome["error"]) if "error" in outcome else f"timeout after {timeout:g}s"
    text, truncated = truncate_text(error, max_chars)
    return ToolResult(text, error, "error" not in outcome, truncated)


# ----- the calculator ------------------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# 9**9**9 would take minutes and gigabytes: a power whose result would pass this many bits is refused.
_MAX_POWER_BITS = 4096


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if max(abs(base), 2).bit_length() * exponent > _MAX_POWER_BITS:
            raise ValueError(f"{base} ** {exponent} is too large to compute")
    elif abs(exponent) > _MAX_POWER_BITS:
        raise ValueError(f"exponent {exponent} is too large")
    return base ** exponent


def _evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic syntax tree; any other node (a name, a call, an attribute...) is refused."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is an int subclass: excluded
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _power(left, right) if isinstance(node.op, ast.Pow) else _BINARY[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r} (only numbers, + - * / **, unary minus and "
                     "parentheses)")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / **, unary + and -, parentheses. Parsed with
    `ast` and walked here, never evaluated by Python: `__import__('os')` is a ValueError, 1/0 a
    ZeroDivisionError."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"cannot parse {expression!r} as arithmetic: {error.msg}") from None
    return _evaluate(tree)


class Calculator:
    """A calculator tool: str -> str, e.g. "12*(3+4)" -> "84". Integer arithmetic stays exact; / gives a
    float. See `calculate` for what it accepts."""

    def __call__(self, expression: str) -> str:
        return str(calculate(expression))


class SimpleCalculatorTool(Calculator):
    """The calculator answering as the hub tool "ybelkada/simple-calculator" that TRL's calculator example
    loads: always a float, "13-3" -> "10.0". Its class name is the tool name TextEnvironment infers."""

    def __call__(self, expression: str) -> str:
        return str(float(calculate(expression)))


# ----- the Python interpreter ----------------------------------------------------------------------------------
# Runs in the child: the limits are set there, before the user's code, rather than in Popen's preexec_fn,
# which Python documents as unsafe when the parent has threads (a training process always does).
# argv: memory bytes, CPU seconds, output bytes. The code comes on stdin.
_CHILD = """\
import resource, sys
memory, cpu, output = (int(a) for a in sys.argv[1:4])
code = sys.stdin.read()
for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, output)):
    resource.setrlimit(kind, (value, value))
del resource, memory, cpu, output, kind, value
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


class PythonInterpreter:
    """A tool that runs Python code and answers with what it printed: str -> str.

    The code (the model's, i.e. untrusted) runs in a fresh `python -I` subprocess in an empty temporary
    folder, never in the training process, under limits: `timeout` seconds of wall time (then the process
    group is killed), as many seconds of CPU time, `memory_mb` MiB of address space (an allocation past it
    is a MemoryError) and `max_output_bytes` of stdout/stderr each (written to files, so a flood never
    reaches this process's memory). The answer is the printed output (stdout); if the code failed, the last
    line of its traceback ("ZeroDivisionError: division by zero") follows. A value is only shown if the code
    prints it, as in a script (the TRL example's prompt ends with print(solution())).

    These limits contain mistakes and runaway code; they are not a security sandbox (the code can read
    files and open sockets as this user). Run untrusted models' code in a container for that.
    """

    # 5 s, under call_tool's default 10 s timeout: the process is killed by its own limit, and no thread is
    # left waiting on it.
    def __init__(self, timeout: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1_000_000) -> None:
        if timeout <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
            raise ValueError(f"PythonInterpreter: timeout, memory_mb and max_output_bytes must be > 0, got "
                             f"{timeout}, {memory_mb}, {max_output_bytes}.")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_output_bytes = max_output_bytes

    def __call__(self, code: str) -> str:
        with tempfile.TemporaryDirectory(prefix="tether-python-tool-") as folder:
            stdout_path, stderr_path = os.path.join(folder, ".stdout"), os.path.join(folder, ".stderr")
            with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
                returncode = self._run(code, folder, stdout, stderr)
            output = _read_text(stdout_path, self.max_output_bytes)
            errors = _read_text(stderr_path, self.max_output_bytes)
        if returncode is None:
            return _join(output, f"TimeoutError: the code ran longer than {self.timeout:g}s and was stopped")
        if returncode < 0:
            return _join(output, f"Killed: {_signal_name(-returncode)} (a CPU, memory or output limit)")
        if returncode:
            lines = [line for line in errors.strip().splitlines() if line.strip()]
            return _join(output, lines[-1] if lines else f"exit status {returncode}")
        return output

    def _run(self, code: str, folder: str, stdout: Any, stderr: Any) -> int | None:
        """Run the code; its exit status (negative: killed by that signal), or None after the timeout."""
        limits = [str(self.memory_mb * 2**20), str(max(1, int(self.timeout + 1))), str(self.max_output_bytes)]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8", "HOME": folder}
        process = subprocess.Popen([sys.executable, "-I", "-c", _CHILD, *limits], stdin=subprocess.PIPE,
                                   stdout=stdout, stderr=stderr, cwd=folder, env=env, start_new_session=True)
        try:
            process.communicate(code.encode("utf-8", "replace"), timeout=self.timeout)
            return process.returncode
        except subprocess.TimeoutExpired:
            return None
        finally:
            if process.poll() is None:  # its own session: the group holds anything it started too
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _read_text(path: str, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", "replace")


def _join(output: str, error: str) -> str:
    return f"{output}{'' if not output or output.endswith(chr(10)) else chr(10)}{error}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ----- tools by name (transformers 5 has no load_tool) --------------------------------------------------------
# The shipped tools, by tether's names and by the hub ids of the tools TRL 0.7's examples load with
# `transformers.load_tool` (which transformers 5 removed): tether's own implementations of what those
# hub tools do, so those scripts run offline.
SHIPPED_TOOLS: dict[str, Callable[[], Callable[[str], str]]] = {
    "calculator": Calculator,
    "python_interpreter": PythonInterpreter,
    "ybelkada/simple-calculator": SimpleCalculatorTool,
    "lvwerra/python-interpreter": PythonInterpreter,
}


def load_tool(name: str, **kwargs: Any) -> Callable[[str], str]:
    """A new instance of the shipped tool `name` (see SHIPPED_TOOLS), `kwargs` going to its constructor.
    Nothing is downloaded: any other name is a ValueError that says what to pass instead."""
    if name not in SHIPPED_TOOLS:
        raise ValueError(
            f"load_tool({name!r}): tether ships only {sorted(SHIPPED_TOOLS)}. transformers 5 removed load_tool and "
            "its hub tools; a tool is any callable str -> str, so pass your own function or object (e.g. "
            "TextEnvironment(tools={'Name': my_function}))."
        )
    return SHIPPED_TOOLS[name](**kwargs)
