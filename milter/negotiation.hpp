// What paas-milter asks of the MTA when a connection starts, shared with the relay route's
// floor in tests/bench/floor_milter.cpp so that the benchmark compares like with like.
#pragma once

#include <libmilter/mfapi.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

namespace paasmilter {

// The steps whose answer is always "continue": the MTA need not wait for it (see
// on_negotiate in callbacks.cpp for why RCPT, DATA and the body stay answered).
inline constexpr unsigned long kNoReplySteps =
    SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_HDR | SMFIP_NR_EOH;

// The macros we classify on, per stage (Postfix's defaults lack some of them).
struct MacroRequest {
    int stage;
    const char* names;
};
inline constexpr MacroRequest kMacroRequests[] = {
    // v: the MTA's version ("Postfix 3.7.11", Sendmail's "8.17.1"), to warn about a wrong
    // milter.mta.
    {SMFIM_CONNECT, "j v {client_addr} {client_name}"},
    {SMFIM_HELO, "{tls_version} {cipher} {cert_subject} {cert_issuer} {verify} {cert_fp}"},
    {SMFIM_ENVFROM, "i {auth_type} {auth_authen} {cert_subject} {cert_issuer} {verify} {cert_fp}"},
    {SMFIM_EOM, "i"},
};

inline void request_macros(SMFICTX* ctx) {
    for (const MacroRequest& request : kMacroRequests) {
        smfi_setsymlist(ctx, request.stage, const_cast<char*>(request.names));
    }
}

// libmilter writes a reply in several small packets and gives us no handle on its sockets:
// with Nagle's algorithm and the MTA's delayed ACKs that stalls every message ~40 ms over
// TCP. Linux copies TCP_NODELAY from a listening socket to the sockets it accepts, so set
// it on the listener libmilter opened (the only listening TCP socket of this process).
// Returns false when a listener refused it.
inline bool disable_nagle_on_listener() {
    bool ok = true;
    for (int fd = 0; fd < 1024; ++fd) {
        int listening = 0;
        socklen_t length = sizeof listening;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) != 0 || !listening) {
            continue;
        }
        sockaddr_storage address{};
        socklen_t address_length = sizeof address;
        if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &address_length) != 0) continue;
        if (address.ss_family != AF_INET && address.ss_family != AF_INET6) continue;
        int on = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) != 0) ok = false;
    }
    return ok;
}

}  // namespace paasmilter
