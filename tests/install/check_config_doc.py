#!/usr/bin/env python3
"""paas-milter.toml(5) documents every configuration key, and its example is valid.

The keys are read from the configuration loader's sources: the lists of known keys it
checks tables against (`check_keys(TABLE, {...}, ...)`, `known = {...}`, the `k...Keys[]`
arrays of config_api.cpp and the rule conditions of `kFields[]`). Each must appear in the
man page source as `*key*`; each top-level table as a section heading (`# [milter]`,
`# [[rules]]`). The man page's EXAMPLE, with the example tables and secrets of etc/, must
pass `paas-milter check`.

Usage: check_config_doc.py SOURCE_ROOT MAN_SOURCE BINARY
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

source_root, man_source, binary = sys.argv[1:4]
LOADERS = ["lib/paasmilter/config.cpp", "lib/paasmilter/config_api.cpp"]
LITERAL = re.compile(r'"([a-z][a-z0-9_]*)"')
failures = []


def fail(message):
    failures.append(message)
    print("FAIL: " + message)


def brace_block(text, start):
    """The text of the {...} block opening at or after `start`."""
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at:i + 1]
    raise ValueError("unbalanced braces")


keys, tables = set(), set()
for loader in LOADERS:
    with open(os.path.join(source_root, loader)) as source:
        code = source.read()
    for match in re.finditer(r"check_keys\(\s*(\*?\w+)\s*,", code):
        block = set(LITERAL.findall(brace_block(code, match.end())))
        (tables if match.group(1) == "root" else keys).update(block)
    for pattern in (r"\bknown\s*=\s*", r"\bk\w*Keys\[\]\s*=\s*", r"\bkFields\[\]\s*=\s*"):
        for match in re.finditer(pattern, code):
            block = brace_block(code, match.end())
            if "kFields" in pattern:  # {"client_addr", Field::client_addr, ...}: the first
                block = "".join(re.findall(r'\{\s*("[a-z_]+")', block))
            keys.update(LITERAL.findall(block))
if len(keys) < 50 or not tables:
    sys.exit(f"FAIL: found only {len(keys)} keys and tables {tables} in {LOADERS}: has the "
             "loader changed shape? Update this test.")

with open(man_source) as source:
    man = source.read()
for key in sorted(keys):
    if not re.search(r"\*" + re.escape(key) + r"\*", man):
        fail(f"key '{key}' is not documented in {os.path.basename(man_source)} (as *{key}*)")
headings = re.findall(r"^#+ (.*)$", man, re.M)
for table in sorted(tables):
    if not any(re.match(r"\[\[?" + re.escape(table) + r"[\].]", h) for h in headings):
        fail(f"table [{table}] has no section in {os.path.basename(man_source)}")
print(f"{len(keys)} keys and tables {sorted(tables)} documented")

# The EXAMPLE section's configuration passes `check`, with etc/'s tables and secrets.
example = re.search(r"^# EXAMPLE\n(.*?)^# ", man, re.M | re.S)
block = re.search(r"^```\n(.*?)^```", example.group(1), re.M | re.S) if example else None
if not block:
    fail("no ``` block in the EXAMPLE section")
else:
    with tempfile.TemporaryDirectory() as work:
        for directory in ("tables", "secrets"):
            shutil.copytree(os.path.join(source_root, "etc", directory),
                            os.path.join(work, directory))
        for name in os.listdir(os.path.join(work, "secrets")):
            os.chmod(os.path.join(work, "secrets", name), 0o600)
        config = os.path.join(work, "paas-milter.toml")
        with open(config, "w") as out:
            out.write(re.sub(r"\\(.)", r"\1", block.group(1)))  # scdoc's \ escapes
        check = subprocess.run([binary, "check", "-c", config], capture_output=True, text=True)
        print(check.stdout + check.stderr, end="")
        if check.returncode != 0:
            fail(f"the EXAMPLE does not pass `paas-milter check` (exit {check.returncode})")

if failures:
    sys.exit(f"{len(failures)} failure(s)")
print("OK")
