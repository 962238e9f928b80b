// The floor of the relay route, for tests/bench/throughput.py: a libmilter filter that does
// nothing but what the relay route makes Postfix and libmilter do. It negotiates the same
// steps as paas-milter (no reply for connect, HELO, MAIL, headers and end of headers; SMFIP_SKIP
// for the body), asks for the same macros, and adds the same routing header at the end of
// every message, which Postfix's milter_header_checks turns into the same FILTER. What the
// relay route costs beyond this filter is paas-milter's own work: classification, logging,
// metrics, state.
//
//   bench-floor-milter SOCKET HEADER-NAME HEADER-VALUE
//
// SOCKET in libmilter syntax (inet:PORT@127.0.0.1, unix:/path). Not a test: it asserts nothing.
#include <libmilter/mfapi.h>

#include <cstdio>
#include <cstring>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>

namespace {

char* header_name = nullptr;
char* header_value = nullptr;

constexpr unsigned long no_reply =
    SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_HDR | SMFIP_NR_EOH;

sfsistat on_negotiate(SMFICTX* ctx, unsigned long offered_actions, unsigned long offered_steps,
                      unsigned long, unsigned long, unsigned long* actions, unsigned long* steps,
                      unsigned long*, unsigned long*) {
    *actions = SMFIF_ADDHDRS | SMFIF_CHGHDRS | (offered_actions & SMFIF_SETSYMLIST);
    *steps = offered_steps & (SMFIP_NOUNKNOWN | SMFIP_SKIP | no_reply);
    if (offered_actions & SMFIF_SETSYMLIST) {
        // The same lists as milter/callbacks.cpp, so that Postfix sends the same macros.
        smfi_setsymlist(ctx, SMFIM_CONNECT, const_cast<char*>("j {client_addr} {client_name}"));
        smfi_setsymlist(ctx, SMFIM_HELO,
                        const_cast<char*>("{tls_version} {cipher} {cert_subject} "
                                          "{cert_issuer} {verify} {cert_fp}"));
        smfi_setsymlist(ctx, SMFIM_ENVFROM,
                        const_cast<char*>("i {auth_type} {auth_authen} {cert_subject} "
                                          "{cert_issuer} {verify} {cert_fp}"));
        smfi_setsymlist(ctx, SMFIM_EOM, const_cast<char*>("i"));
    }
    return SMFIS_CONTINUE;
}

// As milter/daemon.cpp does (Linux copies TCP_NODELAY from the listener to the sockets it
// accepts): without it each message waits ~40 ms for a delayed ACK over TCP.
void disable_nagle_on_listener() {
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
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
}

sfsistat no_reply_step(SMFICTX*) {
    return SMFIS_NOREPLY;
}
sfsistat on_connect(SMFICTX*, char*, _SOCK_ADDR*) {
    return SMFIS_NOREPLY;
}
sfsistat on_helo(SMFICTX*, char*) {
    return SMFIS_NOREPLY;
}
sfsistat on_envfrom(SMFICTX*, char**) {
    return SMFIS_NOREPLY;
}
sfsistat on_envrcpt(SMFICTX*, char**) {
    return SMFIS_CONTINUE;
}
sfsistat on_header(SMFICTX*, char*, char*) {
    return SMFIS_NOREPLY;
}
sfsistat on_data(SMFICTX*) {
    return SMFIS_CONTINUE;
}
sfsistat on_body(SMFICTX*, unsigned char*, size_t) {
    return SMFIS_SKIP;
}

sfsistat on_eom(SMFICTX* ctx) {
    return smfi_addheader(ctx, header_name, header_value) == MI_SUCCESS ? SMFIS_CONTINUE
                                                                        : SMFIS_TEMPFAIL;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s SOCKET HEADER-NAME HEADER-VALUE\n", argv[0]);
        return 2;
    }
    header_name = argv[2];
    header_value = argv[3];
    smfiDesc description{};
    description.xxfi_name = const_cast<char*>("bench-floor-milter");
    description.xxfi_version = SMFI_VERSION;
    description.xxfi_flags = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_SETSYMLIST;
    description.xxfi_connect = on_connect;
    description.xxfi_helo = on_helo;
    description.xxfi_envfrom = on_envfrom;
    description.xxfi_envrcpt = on_envrcpt;
    description.xxfi_header = on_header;
    description.xxfi_eoh = no_reply_step;
    description.xxfi_body = on_body;
    description.xxfi_eom = on_eom;
    description.xxfi_data = on_data;
    description.xxfi_negotiate = on_negotiate;
    if (smfi_setconn(argv[1]) != MI_SUCCESS || smfi_register(description) != MI_SUCCESS) {
        std::fprintf(stderr, "%s: cannot set up %s\n", argv[0], argv[1]);
        return 1;
    }
    // Owner and group may connect (Postfix's group through the socket directory).
    umask(007);
    if (smfi_opensocket(1) != MI_SUCCESS) {
        std::fprintf(stderr, "%s: cannot listen on %s\n", argv[0], argv[1]);
        return 1;
    }
    disable_nagle_on_listener();
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
