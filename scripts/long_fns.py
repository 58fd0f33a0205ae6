#!/usr/bin/env python3
"""List functions longer than a limit (default 100 lines) in crates/*/src, tests excluded.

Usage: scripts/long_fns.py [LIMIT]. A function counts from its `fn` line to its closing brace;
code inside `#[cfg(test)]` modules and files under tests/ is skipped. Braces in strings,
chars and comments are ignored (a light lexer, enough for rustfmt'd code).
"""
import pathlib
import re
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 100
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def strip(line, state):
    """The line without strings, chars and comments; state carries block comments/raw strings."""
    out, i = [], 0
    while i < len(line):
        if state["block"]:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"], i = False, j + 2
            continue
        if state["str"]:
            if line[i] == "\\":
                i += 2
                continue
            if line[i] == '"' and line.startswith("#" * state["hashes"], i + 1):
                state["str"], i = False, i + 1 + state["hashes"]
                continue
            i += 1
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"], i = True, i + 2
            continue
        m = re.match(r'b?r(#*)"', line[i:])
        if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == "_")):
            state["str"], state["hashes"], i = True, len(m.group(1)), i + len(m.group(0))
            continue
        if c == '"':
            state["str"], state["hashes"], i = True, 0, i + 1
            continue
        m = re.match(r"'(\\.|[^\\'])'", line[i:]) or re.match(r"'\\u\{[0-9a-fA-F]+\}'", line[i:])
        if m:
            i += len(m.group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def scan(path):
    lines = path.read_text().splitlines()
    state = {"block": False, "str": False, "hashes": 0}
    depth, stack, test_depth, pending_test = 0, [], None, False
    for n, raw in enumerate(lines, 1):
        code = strip(raw, state)
        if "#[cfg(test)]" in code:
            pending_test = True
        m = FN.match(code)
        if m and test_depth is None:
            stack.append([m.group(7), n, depth, False])
        for ch in code:
            if ch == "{":
                if pending_test and test_depth is None:
                    test_depth, pending_test = depth, False
                if stack and stack[-1][2] == depth:
                    stack[-1][3] = True  # the body starts
                depth += 1
            elif ch == ";" and stack and stack[-1][2] == depth and not stack[-1][3]:
                stack.pop()  # a declaration without a body (trait item)
            elif ch == "}":
                depth -= 1
                if test_depth is not None and depth == test_depth:
                    test_depth = None
                while stack and stack[-1][2] == depth and ch == "}":
                    name, start, _, _ = stack.pop()
                    if n - start + 1 > LIMIT:
                        yield n - start + 1, f"{path}:{start}", name
                    break
        if pending_test and code.strip().endswith(";"):
            pending_test = False


def main():
    rows = []
    for p in sorted(pathlib.Path("crates").glob("*/src/**/*.rs")):
        rows.extend(scan(p))
    for length, where, name in sorted(rows, reverse=True):
        print(f"{length:4} {where} {name}")
    return 1 if rows else 0


if __name__ == "__main__":
    sys.exit(main())
