"""Helpers shared by the tests that drive ``slotlab`` commands in-process."""

from __future__ import annotations

from slotlab.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``slotlab ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    """``err`` is exactly one ``error: ...`` line, no traceback, and names every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def strip_progress(err: str) -> str:
    """``err`` without tqdm's progress-bar output (a bar redraws itself with carriage returns)."""
    lines = []
    for line in err.splitlines():
        line = line.split("\r")[-1]
        if "%|" not in line:
            lines.append(line)
    return "\n".join(lines)
