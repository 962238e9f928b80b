#!/usr/bin/env bash
# Quick start demo (Debian 12, as root): installs the dependencies, builds paas-milter, and
# runs it on the example configuration in front of a private Postfix on loopback, sending a
# sample message through every route and printing the decisions and where mail arrived.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash contrib/scripts/build.sh milter/paas-milter
# The example secret must be readable by its owner only (paas-milter check warns otherwise);
# git keeps no such mode, and demo.py copies etc/ with its modes.
chmod 0600 etc/secrets/acs-connection-string etc/secrets/graph-client-secret
exec python3 contrib/scripts/demo.py build/milter/paas-milter
