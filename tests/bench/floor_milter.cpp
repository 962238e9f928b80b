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

#include <sys/stat.h>

#include <cstdio>

#include "negotiation.hpp"  // milter/: the same steps, macros and TCP_NODELAY as paas-milter

using paasmilter::kNoReplySteps;
using paasmilter::request_macros;

namespace {

char* header_name = nullptr;
char* header_value = nullptr;

sfsistat on_negotiate(SMFICTX* ctx, unsigned long offered_actions, unsigned long offered_steps,
                      unsigned long, unsigned long, unsigned long* actions, unsigned long* steps,
                      unsigned long*, unsigned long*) {
    *actions = SMFIF_ADDHDRS | SMFIF_CHGHDRS | (offered_actions & SMFIF_SETSYMLIST);
    *steps = offered_steps & (SMFIP_NOUNKNOWN | SMFIP_SKIP | kNoReplySteps);
    if (offered_actions & SMFIF_SETSYMLIST) request_macros(ctx);
    return SMFIS_CONTINUE;
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
    paasmilter::disable_nagle_on_listener();
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
