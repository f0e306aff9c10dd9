"""The house's size rules, checked on the source: no package file (dgfast/, kernels/) over 700 lines, and
no function over 80 lines unless its body opens with a docstring or comment starting "Long on purpose"
that says why (e.g. bench/gpu_e2e.py's main). ruff.toml holds the other rules, which ruff checks.
"""
import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80
REASON = "Long on purpose"


def python_files(*folders):
    for folder in folders:
        for dirpath, _, names in os.walk(ROOT / folder):  # links not followed: dgfast/kernels may be one
            yield from (Path(dirpath) / n for n in sorted(names) if n.endswith(".py"))


def says_why(fn: ast.AST, lines: list) -> bool:
    """The function's body opens with a docstring, or a comment, that starts with REASON."""
    doc = ast.get_docstring(fn)
    if doc is not None:
        return doc.startswith(REASON)
    comments = [s.strip() for s in lines[fn.lineno:fn.body[0].lineno - 1]]  # between the def line and the body
    return any(s.startswith(f"# {REASON}") for s in comments)


def long_functions(path: Path) -> list:
    """'line name (n lines)' for each function in `path` over the limit that does not say why."""
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not says_why(node, lines):
                out.append(f"{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_package_file_over_700_lines():
    too_long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in python_files("dgfast", "kernels")
                if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not too_long, f"split these files (at most {MAX_FILE_LINES} lines each): {too_long}"


@pytest.mark.parametrize("folder", ["dgfast", "kernels", "bench", "tests"])
def test_no_function_over_80_lines_without_a_reason(folder):
    found = [f"{p.relative_to(ROOT)}:{f}" for p in python_files(folder) for f in long_functions(p)]
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines: split them, or start the body with a "
                       f"'{REASON}: ...' comment or docstring that says why: {found}")


def test_the_checks_can_fail(tmp_path):
    """A long function without a reason is found; with one (comment or docstring) it is not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    cases = {"bare": (f"def f():\n{body}\n", 1), "comment": (f"def f():\n    # {REASON}: a reason\n{body}\n", 0),
             "docstring": (f'def f():\n    """{REASON}: a reason."""\n{body}\n', 0),
             "other docstring": (f'def f():\n    """Does f."""\n{body}\n', 1)}
    for name, (src, want) in cases.items():
        (tmp_path / "m.py").write_text(src)
        assert len(long_functions(tmp_path / "m.py")) == want, name
