"""The package's size budget, counted as tinygrad's sz.py counts it (STYLE.md): lines that hold code, not
blank lines, comments or docstrings. A change that grows ddp/ past it should first look for the place that
already does what it needs. Every file also stays within 500 lines of text (one concept per file)."""
import glob
import os
import token
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_LINES = 5200
FILE_LINES = 500
KEPT = {token.OP, token.NAME, token.NUMBER, token.STRING}


def code_lines(path: str) -> int:
    """Lines that a token of code touches; a docstring (a string token opening its line with triple quotes)
    is not code."""
    with tokenize.open(path) as f:
        toks = [t for t in tokenize.generate_tokens(f.readline) if t.type in KEPT and not
                (t.type == token.STRING and t.string.startswith('"""') and t.line.strip().startswith('"""'))]
    return len({line for t in toks for line in range(t.start[0], t.end[0] + 1)})


def package_files():
    files = sorted(glob.glob(os.path.join(ROOT, "ddp", "*.py")))
    assert len(files) > 20, files
    return files


def test_code_lines_within_budget():
    sizes = {os.path.basename(p): code_lines(p) for p in package_files()}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert total <= CODE_LINES, f"ddp/ has {total} lines of code, over {CODE_LINES}; largest: {largest}"


def test_no_file_over_500_lines():
    long = {os.path.basename(p): n for p in package_files() if (n := len(open(p).readlines())) > FILE_LINES}
    assert not long, f"files over {FILE_LINES} lines: {long}"


def test_code_lines_counts_code_only(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""A docstring\nover two lines."""\n\n# a comment\nx = 1\n\n\ndef f(a,\n      b):\n'
                   '    """One line."""\n    return """not a docstring"""\n')
    assert code_lines(str(src)) == 4          # x = 1; def f(a, / b):; return ...
