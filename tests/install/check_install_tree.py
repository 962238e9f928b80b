#!/usr/bin/env python3
"""`meson install --destdir` lays out the expected tree.

Installs the build directory into a temporary DESTDIR and checks, against the table below,
that every expected file is there and nothing else; that the systemd unit starts the
installed binary with the installed configuration; that the installed binary reports the
project's version; that the installed example configuration passes `check` once the
example secrets are in place (what the README's installing steps do); and that installing
again keeps a configuration the operator edited.

Usage: check_install_tree.py --meson MESON --build-dir DIR --prefix P --sbindir D
       --sysconfdir D --datadir D --mandir D --unitdir D --sysusersdir D --man yes|no
       --version V
(directories as meson's options give them: absolute, or relative to the prefix)
"""
import argparse
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

parser = argparse.ArgumentParser()
for name in ("meson", "build-dir", "prefix", "sbindir", "sysconfdir", "datadir", "mandir",
             "unitdir", "sysusersdir", "man", "version"):
    parser.add_argument("--" + name, required=True)
args = parser.parse_args()


def under_prefix(directory):
    return os.path.normpath(os.path.join(args.prefix, directory))


sbindir = under_prefix(args.sbindir)
confdir = os.path.join(under_prefix(args.sysconfdir), "paas-milter")
docdir = os.path.join(under_prefix(args.datadir), "doc", "paas-milter")
mandir = under_prefix(args.mandir)
binary = os.path.join(sbindir, "paas-milter")
config = os.path.join(confdir, "paas-milter.toml")

TABLES = ["tables/cert-subjects.regexp", "tables/devices.cidr", "tables/graph-senders.cidr"]
POSTFIX = ["main.cf.snippet", "master.cf.snippet", "milter_header_checks.pcre",
           "sasl_passwd.example", "strip_route_header.pcre", "tls_policy.example",
           "exchange-online/master.cf.snippet", "exchange-online/milter_header_checks.pcre",
           "exchange-online/routes.toml"]

# path -> (mode, what): every file `meson install` must lay out, and nothing else.
EXPECTED = {binary: (0o755, "the daemon")}
EXPECTED[config] = (0o644, "example configuration")
for table in TABLES:
    EXPECTED[os.path.join(confdir, table)] = (0o644, "example table")
EXPECTED[os.path.join(under_prefix(args.unitdir), "paas-milter.service")] = (0o644, "unit")
EXPECTED[os.path.join(under_prefix(args.sysusersdir), "paas-milter.conf")] = (0o644, "sysusers")
EXPECTED[os.path.join(docdir, "README.md")] = (0o644, "documentation")
for example in ["paas-milter.toml", *TABLES, "secrets/acs-connection-string",
                "secrets/graph-client-secret", "sendmail/paas-milter.mc",
                *("postfix/" + snippet for snippet in POSTFIX)]:
    EXPECTED[os.path.join(docdir, "examples", example)] = (0o644, "example")
if args.man == "yes":
    EXPECTED[os.path.join(mandir, "man8", "paas-milter.8")] = (0o644, "man page")
    EXPECTED[os.path.join(mandir, "man5", "paas-milter.toml.5")] = (0o644, "man page")

failures = []


def fail(message):
    failures.append(message)
    print("FAIL: " + message)


def install(destdir):
    command = [args.meson, "install", "-C", args.build_dir, "--destdir", destdir,
               "--no-rebuild"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout, result.stderr)
        sys.exit("FAIL: " + shlex.join(command) + f" exited {result.returncode}")


def installed_files(destdir):
    found = set()
    for root, _dirs, files in os.walk(destdir):
        for name in files:
            found.add("/" + os.path.relpath(os.path.join(root, name), destdir))
    return found


def unit_lines(path, key):
    with open(path) as unit:
        return [line.split("=", 1)[1].strip() for line in unit if line.startswith(key + "=")]


with tempfile.TemporaryDirectory() as destdir:
    install(destdir)
    found = installed_files(destdir)
    print("installed:\n  " + "\n  ".join(sorted(found)))
    for path in sorted(set(EXPECTED) - found):
        fail(f"missing {path} ({EXPECTED[path][1]})")
    for path in sorted(found - set(EXPECTED)):
        fail(f"unexpected {path}: add it to EXPECTED in {os.path.basename(__file__)} if "
             "it belongs there")
    for path in sorted(set(EXPECTED) & found):
        mode = stat.S_IMODE(os.stat(destdir + path).st_mode)
        if mode != EXPECTED[path][0]:
            fail(f"{path} has mode {mode:04o}, expected {EXPECTED[path][0]:04o}")
    if os.path.exists(os.path.join(destdir + confdir, "secrets")):
        fail(f"{confdir}/secrets was installed: the example secrets are placeholders")

    # The unit runs the installed binary with the installed configuration.
    unit = destdir + os.path.join(under_prefix(args.unitdir), "paas-milter.service")
    if os.path.exists(unit):
        wanted = {"ExecStart": f"{binary} run -c {config}",
                  "ExecStartPre": f"{binary} check -c {config}"}
        for key, line in wanted.items():
            if unit_lines(unit, key) != [line]:
                fail(f"{key}= is {unit_lines(unit, key)}, expected [{line!r}]")
        if f"{binary} check -c {config}" not in unit_lines(unit, "ExecReload"):
            fail(f"ExecReload= does not check {config}: {unit_lines(unit, 'ExecReload')}")
        docs = " ".join(unit_lines(unit, "Documentation"))
        for doc in ("man:paas-milter(8)", f"file://{docdir}/README.md"):
            if doc not in docs.split():
                fail(f"Documentation= lacks {doc}: {docs}")

    if os.path.exists(destdir + binary):
        version = subprocess.run([destdir + binary, "--version"], capture_output=True,
                                 text=True)
        if version.stdout.strip() != f"paas-milter {args.version}":
            fail(f"installed binary: --version printed {version.stdout.strip()!r}")

        # README: put the secrets in place (mode 0600), then `paas-milter check`.
        secrets = destdir + os.path.join(confdir, "secrets")
        shutil.copytree(destdir + os.path.join(docdir, "examples", "secrets"), secrets)
        os.chmod(secrets, 0o700)
        for name in os.listdir(secrets):
            os.chmod(os.path.join(secrets, name), 0o600)
        check = subprocess.run([destdir + binary, "check", "-c", destdir + config],
                               capture_output=True, text=True)
        print(check.stdout + check.stderr, end="")
        if check.returncode != 0 or ": OK" not in check.stdout:
            fail(f"`paas-milter check` of the installed configuration: exit "
                 f"{check.returncode}")

    # Installing again keeps what the operator changed, and restores what is missing.
    if os.path.exists(destdir + config):
        with open(destdir + config, "a") as edited:
            edited.write("# edited by the operator\n")
        removed = destdir + os.path.join(confdir, TABLES[0])
        os.remove(removed)
        install(destdir)
        with open(destdir + config) as kept:
            if "# edited by the operator" not in kept.read():
                fail(f"a second install overwrote the edited {config}")
        if not os.path.exists(removed):
            fail(f"a second install did not restore the removed {TABLES[0]}")

if failures:
    sys.exit(f"{len(failures)} failure(s)")
print("OK")
