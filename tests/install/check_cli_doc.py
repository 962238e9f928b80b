#!/usr/bin/env python3
"""`paas-milter --help` and paas-milter(8) agree, and `--version` prints meson's version.

From the usage text: each command (a line `paas-milter COMMAND ...`, continued on more
indented lines) with its options. From the man page source: each SYNOPSIS paragraph
(`*paas-milter* *COMMAND* ...`) with its options, the commands described under COMMANDS
and the options described under OPTIONS. The same commands, each with the same options,
must appear on both sides; every option must be described under OPTIONS and every command
under COMMANDS.

Usage: check_cli_doc.py BINARY MAN_SOURCE VERSION
"""
import re
import subprocess
import sys

binary, man_source, version = sys.argv[1:4]
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][A-Za-z0-9-]*")
failures = []


def fail(message):
    failures.append(message)
    print("FAIL: " + message)


def help_text():
    result = subprocess.run([binary, "--help"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAIL: {binary} --help exited {result.returncode}")
    return result.stdout


def help_synopsis(text):
    """{command: set of options} from the usage text's block of `paas-milter ...` lines."""
    commands = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^(\s+)paas-milter\s+(\S+)(.*)$", line)
        if match:
            current = match.group(2)
            indent = len(match.group(1))
            commands[current] = set(OPTION.findall(match.group(3)))
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            commands[current] |= set(OPTION.findall(line))
        else:
            current = None
    return commands


def man_sections():
    sections = {}
    name = None
    with open(man_source) as source:
        for line in source:
            if line.startswith("; "):
                continue  # scdoc comment
            if line.startswith("# "):
                name = line[2:].strip()
                sections[name] = []
            elif name:
                sections[name].append(line.rstrip("\n"))
    return sections


def plain(text):
    """scdoc markup off: *bold*, _underline_, \\ escapes."""
    return re.sub(r"\\(.)", r"\1", text).replace("*", "").replace("_", " ")


sections = man_sections()
for needed in ("SYNOPSIS", "COMMANDS", "OPTIONS"):
    if needed not in sections:
        sys.exit(f"FAIL: {man_source} has no # {needed} section")

man_commands = {}
paragraph = []
for line in sections["SYNOPSIS"] + [""]:
    if line.strip():
        paragraph.append(plain(line))
        continue
    if paragraph:
        text = " ".join(paragraph)
        match = re.match(r"^paas-milter\s+(\S+)(.*)$", text)
        if not match:
            fail(f"SYNOPSIS paragraph does not start with 'paas-milter COMMAND': {text!r}")
        else:
            man_commands[match.group(1)] = set(OPTION.findall(match.group(2)))
    paragraph = []

described_commands = {m.group(1) for line in sections["COMMANDS"]
                      if (m := re.match(r"^\*([a-z][a-z-]*)\*$", line))}
described_options = set()
for line in sections["OPTIONS"]:
    if line.startswith("*"):  # a term line: "*-c* _FILE_, *--config* _FILE_"
        described_options |= set(OPTION.findall(plain(line)))

usage = help_text()
help_commands = help_synopsis(usage)
print("--help:", {c: sorted(o) for c, o in help_commands.items()})
print("man:   ", {c: sorted(o) for c, o in man_commands.items()})

for command in sorted(set(help_commands) - set(man_commands)):
    fail(f"command '{command}' is in --help but not in the man page's SYNOPSIS")
for command in sorted(set(man_commands) - set(help_commands)):
    fail(f"command '{command}' is in the man page's SYNOPSIS but not in --help")
for command in sorted(set(help_commands) & set(man_commands)):
    for option in sorted(help_commands[command] - man_commands[command]):
        fail(f"'{command} {option}' is in --help but not in the man page's SYNOPSIS")
    for option in sorted(man_commands[command] - help_commands[command]):
        fail(f"'{command} {option}' is in the man page's SYNOPSIS but not in --help")
for command in sorted(set(help_commands) ^ described_commands):
    fail(f"command '{command}': in --help {command in help_commands}, described under "
         f"COMMANDS {command in described_commands}")
# Options in the synopsis, and those the rest of the usage text names (--config).
help_options = set().union(*help_commands.values()) | set(OPTION.findall(usage))
for option in sorted(help_options - described_options):
    fail(f"option {option} of --help is not described under OPTIONS")
for option in sorted({o for o in described_options if o.startswith("--")} - help_options):
    fail(f"option {option} is described under OPTIONS but not in --help")

for flag in ("--version", "-V", "version"):
    result = subprocess.run([binary, flag], capture_output=True, text=True)
    if result.returncode != 0 or result.stdout != f"paas-milter {version}\n":
        fail(f"paas-milter {flag}: exit {result.returncode}, printed {result.stdout!r}, "
             f"expected 'paas-milter {version}'")
for flag in ("--help", "-h", "help"):
    result = subprocess.run([binary, flag], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.startswith("usage:"):
        fail(f"paas-milter {flag}: exit {result.returncode}, no usage text")

if failures:
    sys.exit(f"{len(failures)} failure(s)")
print("OK")
