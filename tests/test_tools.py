"""Safe tool calls (rollout.tools): a tool that raises, hangs or floods is contained; the shipped calculator
evaluates arithmetic only; the shipped Python interpreter runs code in another process under limits."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tether.rollout.tools import (
    TRUNCATION_MARKER,
    Calculator,
    PythonInterpreter,
    SimpleCalculatorTool,
    ToolResult,
    calculate,
    call_tool,
    truncate_text,
)


# ---- call_tool ----------------------------------------------------------------------------------------------
def test_string_arguments_call_the_classic_form():
    assert call_tool(lambda text: text.upper(), "abc") == ToolResult("ABC", None, False, False)


def test_dict_arguments_are_keywords():
    def add(a: int, b: int) -> int:
        return a + b

    assert call_tool(add, {"a": 2, "b": 40}) == ToolResult("42", None, False, False)


def test_none_becomes_empty_text_and_objects_their_str():
    assert call_tool(lambda _: None, "x").text == ""
    assert call_tool(lambda _: [1, 2], "x").text == "[1, 2]"


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["in-thread", "worker-thread"])
def test_a_tool_that_raises_gives_the_error_text(timeout):
    def broken(text):
        raise KeyError("no such entry")

    result = call_tool(broken, "x", timeout=timeout)
    assert result == ToolResult("KeyError: 'no such entry'", "KeyError: 'no such entry'", False, False)


def test_wrong_keyword_is_an_error_for_the_model():
    result = call_tool(lambda a: a, {"b": 1})
    assert result.error.startswith("TypeError: ") and "'b'" in result.error


def test_a_tool_that_hangs_is_abandoned_at_the_timeout():
    release = threading.Event()
    started = time.monotonic()
    result = call_tool(lambda _: release.wait(30), "x", timeout=0.3)
    elapsed = time.monotonic() - started
    release.set()  # let the abandoned worker thread end
    assert result == ToolResult("timeout after 0.3s", "timeout after 0.3s", True, False)
    assert 0.3 <= elapsed < 1.5


def test_a_tool_that_floods_is_truncated_with_a_marker():
    result = call_tool(lambda _: "x" * 10**7, "go", max_chars=50)
    assert result.truncated and result.error is None
    assert len(result.text) == 50
    assert result.text == "x" * (50 - len(TRUNCATION_MARKER)) + TRUNCATION_MARKER


def test_an_error_text_is_truncated_too():
    def broken(_):
        raise ValueError("y" * 500)

    result = call_tool(broken, "x", max_chars=20)
    assert result.truncated and len(result.text) == 20 and result.error == "ValueError: " + "y" * 500


def test_truncate_text_limits():
    assert truncate_text("abc", None) == ("abc", False)
    assert truncate_text("abc", 3) == ("abc", False)
    assert truncate_text("abcdef", 4) == ("abcd", True)  # shorter than the marker: a plain cut


def test_bad_calls_are_the_callers_bug():
    with pytest.raises(TypeError, match="tool must be callable"):
        call_tool("not a tool", "x")
    with pytest.raises(TypeError, match="arguments must be a str"):
        call_tool(str, ["x"])
    with pytest.raises(ValueError, match="timeout must be > 0"):
        call_tool(str, "x", timeout=0)


# ---- the calculator -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("expression, value", [
    ("13-3", 10), ("4*3", 12), ("1/2", 0.5), ("2**10", 1024), ("-(3+4)*2", -14), ("+5 - -5", 10),
    ("12.5 * 2", 25.0), ("123456789 * 987654321", 121932631112635269), (" (1+2) ", 3),
])
def test_calculator_arithmetic(expression, value):
    result = calculate(expression)
    assert result == value and type(result) is type(value)


def test_calculator_tool_formats():
    assert Calculator()("7*6") == "42"
    assert SimpleCalculatorTool()("13-3") == "10.0"  # the hub tool's format, as in TRL's example prompt


@pytest.mark.parametrize("expression", [
    "__import__('os')", "os.system('true')", "abs(-1)", "x", "[1, 2]", "1 if 1 else 2", "True + 1", "'a' * 3",
    "3 // 2", "5 % 2", "1 < 2", "lambda: 1",
])
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ValueError, match="not arithmetic|cannot parse"):
        calculate(expression)


def test_calculator_errors_through_call_tool():
    assert call_tool(Calculator(), "1/0").error == "ZeroDivisionError: division by zero"
    assert call_tool(Calculator(), "__import__('os')").error.startswith("ValueError: not arithmetic")
    started = time.monotonic()
    assert call_tool(Calculator(), "9**9**9").error.startswith("ValueError: ")  # refused, not computed
    assert time.monotonic() - started < 1.0


# ---- the Python interpreter ---------------------------------------------------------------------------------
def test_interpreter_returns_what_the_code_prints():
    code = "def solution():\n    return 23 - 5 * 3\nprint(solution())\n"
    assert PythonInterpreter()(code) == "8\n"


def test_interpreter_runs_in_another_process():
    pid = int(PythonInterpreter()("import os\nprint(os.getpid())"))
    assert pid != os.getpid()


def test_interpreter_reports_the_error_after_the_output():
    assert PythonInterpreter()("print('before')\n1/0\n") == "before\nZeroDivisionError: division by zero"
    assert PythonInterpreter()("def f(:\n").startswith("SyntaxError: ")


def test_interpreter_kills_an_infinite_loop_at_the_time_limit():
    started = time.monotonic()
    answer = PythonInterpreter(timeout=1.0)("print('start', flush=True)\nwhile True:\n    pass\n")
    elapsed = time.monotonic() - started
    assert answer.startswith("start\n")
    assert "TimeoutError" in answer or "SIGXCPU" in answer
    assert elapsed < 4.0


def test_interpreter_stops_a_memory_bomb_at_the_memory_limit():
    started = time.monotonic()
    answer = PythonInterpreter(memory_mb=200)("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert answer == "MemoryError"
    assert time.monotonic() - started < 5.0


def test_interpreter_caps_output():
    answer = PythonInterpreter(max_output_bytes=1000)("import sys\nsys.stdout.write('z' * 10**6)\n")
    assert answer.startswith("z" * 1000) and len(answer) < 1200


def test_interpreter_through_call_tool_with_truncation():
    result = call_tool(PythonInterpreter(), "print('a' * 5000)", max_chars=100)
    assert result.truncated and result.text.startswith("a" * 80) and len(result.text) == 100


def test_interpreter_rejects_bad_limits():
    with pytest.raises(ValueError, match="memory_mb"):
        PythonInterpreter(memory_mb=0)
