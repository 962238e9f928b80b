#!/usr/bin/env python3
"""paas-milter demo: the example configuration (etc/paas-milter.toml and its tables) in front
of a private Postfix on loopback, with one smtp-sink per downstream: the default relayhost,
the ACS SMTP relay and the Exchange Online connector. One sample message per route, then the
decision the milter logged and where the message actually arrived.

Usage: demo.py PATH/TO/paas-milter     (contrib/scripts/demo.sh builds it and calls this)
Nothing outside a temporary directory is touched; everything stops at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402
from mock_graph import MockGraph  # noqa: E402


def section(title: str) -> None:
    print(f"\n=== {title}")


def main() -> int:
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                             os.path.join(REPO, "build", "milter", "paas-milter"))
    harness.require_root()
    work = tempfile.mkdtemp(prefix="paas-demo-")
    os.chmod(work, 0o755)
    started: list = []
    try:
        return run(binary, work, started)
    finally:
        for obj in reversed(started):
            try:
                obj.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"demo: stopping {obj!r}: {exc}", file=sys.stderr)
        if os.environ.get("PAAS_DEMO_KEEP"):
            print(f"\n(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(binary: str, work: str, started: list) -> int:
    # The example configuration as shipped, listening on a free loopback port.
    etc = os.path.join(work, "etc")
    shutil.copytree(os.path.join(REPO, "etc"), etc)
    config_path = os.path.join(etc, "paas-milter.toml")
    milter_port = harness.free_port()
    # The ACS Email API is out of reach here: a loopback double of it (tests/integration/
    # mock_acs.py, HMAC-verifying) stands in, with its connection string and CA.
    mock = MockAcs(verified_domains=("contoso.com", "contoso.azurecomm.net"))
    started.append(mock)
    mock.start()
    with open(os.path.join(etc, "secrets", "acs-connection-string"), "w") as f:
        f.write(mock.connection_string + "\n")
    # Microsoft Graph and Entra ID likewise (tests/integration/mock_graph.py): the example's
    # app registration, with the route's mailbox and the one its sender_map names.
    text = open(config_path).read()
    tenant = re.search(r'(?m)^tenant_id = "(.*)"$', text).group(1)
    client = re.search(r'(?m)^client_id = "(.*)"$', text).group(1)
    graph = MockGraph(mailboxes=["noreply@contoso.com", "scanner-2@contoso.com"],
                      tenant_id=tenant, client_id=client)
    started.append(graph)
    graph.start()
    with open(os.path.join(etc, "secrets", "graph-client-secret"), "w") as f:
        f.write(graph.client_secret + "\n")
    text = re.sub(r'(?m)^socket = ".*"$', f'socket = "inet:{milter_port}@127.0.0.1"', text, 1)
    text = text.replace('action = "api"\n',
                        f'action = "api"\nca_file = "{mock.ca_file}"\nspool_directory = "{work}"\n',
                        1)
    text = text.replace('provider = "graph"\n',
                        f'provider = "graph"\nca_file = "{graph.ca_file}"\n'
                        f'spool_directory = "{work}"\nauthority = "{graph.endpoint}"\n'
                        f'graph_endpoint = "{graph.endpoint}"\n'
                        f'token_scope = "https://graph.microsoft.com/.default"\n', 1)
    with open(config_path, "w") as f:
        f.write(text)

    section("paas-milter check")
    check = subprocess.run([binary, "check", "-c", config_path], capture_output=True, text=True)
    print(check.stdout.strip() or check.stderr.strip())
    if check.returncode != 0:
        return 1

    sinks = {}
    for name in ("relayhost", "acs-relay", "exo-relay"):
        sinks[name] = harness.Sink(work, name)
        started.append(sinks[name])
        sinks[name].start()

    # The device CA the example's "scanners-with-certificates" rule trusts.
    harness.TestCA.CN = "Contoso Device CA"
    ca = harness.make_test_ca(os.path.join(work, "ca"))
    scanner = ca.make_client_cert("scanner-1.contoso.test", org="Contoso")

    milter = harness.Milter(config_path, milter_port, binary=binary,
                            log_path=os.path.join(work, "paas-milter.log"))
    started.append(milter)
    milter.start()
    postfix = harness.PrivatePostfix(
        work, default_sink_port=sinks["relayhost"].port, milter_port=milter_port, tls_ca=ca,
        routes={"acs-smtp": ("acs-relay", sinks["acs-relay"].port),
                "exchange-online": ("exo-relay", sinks["exo-relay"].port)},
        # XCLIENT lets the demo speak as the example's device networks
        main_cf={"mynetworks": "127.0.0.0/8 [::1]/128 192.0.2.0/24 198.51.100.0/24"})
    started.append(postfix)
    postfix.start()
    print(f"\nPostfix smtpd 127.0.0.1:{postfix.smtpd_port} (STARTTLS with client certificates: "
          f"{postfix.tls_port}), paas-milter inet:{milter_port}@127.0.0.1\n"
          f"milter_header_checks:\n  " + "\n  ".join(postfix.header_checks_lines()))

    samples = [
        ("a multifunction printer in 192.0.2.128/25: submitted to the ACS Email API",
         dict(xclient={"ADDR": "192.0.2.200"}, from_="mfp-3@contoso.com",
              to=["customer@example.net", "desk@contoso.test"],
              headers=["Subject: Invoice 4711", "To: Customer <customer@example.net>"])),
        ("the same while the API answers 503: falls back to the acs-smtp relay route",
         dict(xclient={"ADDR": "192.0.2.201"}, from_="mfp-4@contoso.com",
              to=["customer@example.net"], headers=["Subject: Invoice 4712"])),
        ("a scanner in 198.51.100.128/25: sent through Microsoft Graph as its own mailbox "
         "(sender_map)",
         dict(xclient={"ADDR": "198.51.100.130"}, from_="scanner-2@contoso.com",
              to=["customer@example.net", "archive@example.org"],
              headers=["Subject: Scan 0815", "To: Customer <customer@example.net>"])),
        ("a printer in 192.0.2.0/24 (cidr:tables/devices.cidr)",
         dict(xclient={"ADDR": "192.0.2.7"}, from_="printer-7@contoso.com",
              to=["customer@example.net"], headers=["Subject: Scan to mail"])),
        ("a scanner with a client certificate from the Contoso Device CA",
         dict(port=postfix.tls_port, tls=True, tls_cert=scanner, from_="scanner-1@contoso.com",
              to=["customer@example.net"], headers=["Subject: Scanned document"])),
        ("a monitoring alert from the gateway itself",
         dict(local_interface="127.0.0.1", from_="monitor@contoso.com",
              to=["oncall@example.net"], headers=["Subject: db1 [ALERT] disk 95% full"])),
        ("mail only for internal mailboxes",
         dict(local_interface="127.0.0.1", from_="hr@contoso.com",
              to=["staff@contoso.test"], headers=["Subject: Canteen menu"])),
        ("a device with known-broken firmware",
         dict(local_interface="127.0.0.1", from_="scanner-9@contoso.com",
              to=["customer@example.net"], headers=["X-Mailer: OldScan Firmware 1.4"])),
        ("a client that tries to pick its own route with a forged header",
         dict(local_interface="127.0.0.5", from_="someone@contoso.com",
              to=["customer@example.net"], headers=["X-PaaS-Route: acs-smtp"])),
        ("anything else",
         dict(local_interface="127.0.0.5", from_="someone@contoso.com",
              to=["customer@example.net"], headers=["Subject: hello"])),
    ]
    for title, args in samples:
        port = args.pop("port", postfix.smtpd_port)
        section(title)
        mock.clear_faults()
        if "503" in title:
            mock.always(503)
        accepted_before = len(mock.accepted_messages())
        sent_before = len(graph.sent())
        mark = milter.log_mark()
        result = harness.swaks(port, **args)
        reply = result.data_reply if result.data_code else \
            " ".join(map(str, result.first_error or ("no reply",)))
        print(f"SMTP:     {reply}")
        if result.queue_id:
            line = milter.wait_for_log(rf"{result.queue_id}: (.*)", since=mark).group(0)
        else:
            line = milter.wait_for_log(r"NOQUEUE: .*|[0-9A-Za-z]+: (dry-run, )?rule=.*",
                                       since=mark).group(0)
        print(f"decision: {line}")
        accepted = mock.accepted_messages()[accepted_before:]
        for message in accepted:
            rcpts = [r["address"] for k in ("to", "cc", "bcc")
                     for r in message.message["recipients"].get(k, [])]
            print(f"ACS API:  202 Accepted, Operation-Id {message.operation_id}, "
                  f"from {message.message['senderAddress']} to {', '.join(rcpts)}")
        for sent in graph.sent()[sent_before:]:
            print(f"Graph:    202 Accepted, sent as {sent.mailbox} to "
                  f"{', '.join(sent.recipients)} (MIME as the client sent it, Bcc added)")
        if not result.queue_id:
            print("arrived:  nowhere (refused during SMTP)")
            continue
        if "local_copy=discarded" in line:
            service = "Microsoft Graph" if "route=graph" in line else "the ACS API"
            print(f"arrived:  only at {service} (Postfix discarded its copy)")
            continue
        postfix.wait_for_status(result.queue_id, "sent")
        where = arrival(sinks, result.queue_id)
        print(f"arrived:  {where}")

    section("paas-milter query: what an ERP batch job with SASL login would do")
    query = subprocess.run([binary, "query", "-c", config_path, "--client-addr", "10.20.30.40",
                            "--auth", "erp-batch", "--from", "invoices@erp.contoso.com",
                            "--rcpt", "customer@example.net"], capture_output=True, text=True)
    print(query.stdout.rstrip())
    return 0


def arrival(sinks: dict, queue_id: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for name, sink in sinks.items():
            for message in sink.messages():
                if any(queue_id in r for r in message.get_all("Received")):
                    route = message.get_all(harness.ROUTING_HEADER)
                    return (f"{name} sink (127.0.0.1:{sink.port}), "
                            f"{harness.ROUTING_HEADER}: {', '.join(route) if route else '(none)'}")
        time.sleep(0.1)
    return "not delivered within 10 s"


if __name__ == "__main__":
    sys.exit(main())
