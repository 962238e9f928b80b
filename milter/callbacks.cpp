#include "callbacks.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>

#include "api_action.hpp"
#include "config_snapshot.hpp"
#include "message_state.hpp"
#include "mta_actions.hpp"
#include "negotiation.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/metrics.hpp"
#include "paasmilter/route_addresses.hpp"
#include "paasmilter/sendmail_config.hpp"
#include "paasmilter/text.hpp"
#include "paasmilter/verdict.hpp"
#include "paasmilter/xtext.hpp"

namespace paasmilter {

ConfigSnapshot& config_snapshot() {
    static ConfigSnapshot snapshot;
    return snapshot;
}

namespace {

// Bounds on what we keep of a message's header for classification; Postfix itself limits
// a header to header_size_limit (100 KB). Past these, headers are still counted (so forged
// routing headers are always removed) but no longer stored.
constexpr size_t kMaxStoredHeaderBytes = 1024 * 1024;
constexpr size_t kMaxStoredHeaders = 2000;

std::atomic<int> g_messages_in_flight{0};
std::atomic<uint64_t> g_sessions{0};  // numbers the SMTP sessions for --verbose

ConnectionState* new_connection_state() {
    auto* state = new (std::nothrow) ConnectionState();
    if (state) state->session = ++g_sessions;
    return state;
}

ConnectionState* state_of(SMFICTX* ctx) {
    auto* state = static_cast<ConnectionState*>(smfi_getpriv(ctx));
    if (state) return state;
    // negotiate normally creates it; an MTA that skips negotiation gets one here.
    state = new_connection_state();
    if (state && smfi_setpriv(ctx, state) != MI_SUCCESS) {
        delete state;
        return nullptr;
    }
    return state;
}

std::string macro(SMFICTX* ctx, const char* name) {
    const char* value = smfi_getsymval(ctx, const_cast<char*>(name));
    return value ? std::string(value) : std::string();
}

std::string queue_id(SMFICTX* ctx) {
    std::string id = macro(ctx, "i");
    return id.empty() ? std::string("NOQUEUE") : id;
}

std::string address_to_string(const sockaddr* address) {
    if (!address) return {};
    char text[INET6_ADDRSTRLEN] = {};
    if (address->sa_family == AF_INET) {
        auto* in = reinterpret_cast<const sockaddr_in*>(address);
        if (inet_ntop(AF_INET, &in->sin_addr, text, sizeof text)) return text;
    } else if (address->sa_family == AF_INET6) {
        auto* in6 = reinterpret_cast<const sockaddr_in6*>(address);
        if (inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text)) return text;
    }
    return {};
}

// --verbose: one line per milter stage, "stage=rcpt session=12 to=<a@example.net>", with the
// queue id once Postfix has one (from MAIL FROM on). Names and addresses only: never a
// header value, never the body.
// `facts` are name=value pairs; empty values are left out.
void log_stage(SMFICTX* ctx, const ConnectionState* conn, const char* stage,
               std::initializer_list<std::pair<const char*, std::string>> facts = {}) {
    if (!log_verbose_enabled()) return;
    const std::string session = conn ? std::to_string(conn->session) : std::string("?");
    std::string line = fmt::format("stage={} session={}", stage, session);
    for (const auto& [name, value] : facts) {
        if (!value.empty()) line += fmt::format(" {}={}", name, value);
    }
    log_for(LogLevel::info, queue_id(ctx), line, {{"stage", stage}, {"session", session}});
}

// TLS client-certificate facts. Postfix sends {cert_subject}/{cert_issuer} (CommonNames)
// only for a verified certificate; Sendmail sends DNs for any certificate plus {verify},
// so with Sendmail they only count when {verify} is OK (tests/sendmail/).
void capture_certificate(SMFICTX* ctx, ConnectionState& conn) {
    std::string subject = macro(ctx, "{cert_subject}");
    std::string issuer = macro(ctx, "{cert_issuer}");
    std::string fingerprint = macro(ctx, "{cert_fp}");
    if (subject.empty() && issuer.empty() && fingerprint.empty()) return;
    std::string verify = macro(ctx, "{verify}");
    if (!verify.empty() && verify != "OK") {
        log_debug("client certificate not verified ({{verify}}={}): ignored",
                  sanitize_for_log(verify));
        conn.cert_subject.clear();
        conn.cert_issuer.clear();
        conn.cert_fingerprint.clear();
        return;
    }
    // Only Sendmail sends {verify}, and it sends the DNs xtext-encoded
    // ("/O=Contoso+20Ltd/CN=printer-42"): rules are written against the DN itself.
    const bool sendmail = !verify.empty();
    conn.cert_subject = sendmail ? decode_xtext(subject) : subject;
    conn.cert_issuer = sendmail ? decode_xtext(issuer) : issuer;
    conn.cert_fingerprint = fingerprint;
}

// Loop protection: keeps what the stamps are judged on at end of message, whatever the
// limits on stored headers (every stamp field is counted, so a forged one is always removed).
void note_loop_header(MessageState& message, const char* name, const char* value) {
    const std::string_view text = value ? value : "";
    if (strcasecmp(name, "Message-ID") == 0 && !message.message_id) {
        message.message_id = std::string(text.substr(0, kMaxLoopFieldBytes));
    } else if (strcasecmp(name, std::string(kLoopHeader).c_str()) == 0) {
        const bool keep =
            message.loop_fields.size() < kMaxLoopFields && text.size() <= kMaxLoopFieldBytes;
        message.loop_fields.push_back(keep ? std::optional<std::string>(text) : std::nullopt);
    }
}

// Every callback body runs inside this: an exception never crosses into libmilter, and
// the message is tempfailed rather than passed or lost.
template <class Body>
sfsistat guarded(SMFICTX* ctx, const char* stage, Body&& body) {
    try {
        return body();
    } catch (const std::exception& e) {
        log_error("{}: {}: internal error: {}; tempfail", queue_id(ctx), stage, e.what());
    } catch (...) {
        log_error("{}: {}: internal error; tempfail", queue_id(ctx), stage);
    }
    smfi_setreply(ctx, const_cast<char*>("451"), const_cast<char*>("4.3.0"),
                  const_cast<char*>("Temporary failure in mail filter, try again later"));
    return SMFIS_TEMPFAIL;
}

// The answer to a step the MTA was told not to wait for (SMFIP_NR_*): SMFIS_NOREPLY whatever
// happened. libmilter would force that anyway, and after a failure its state machine would
// drop the transaction's next commands unanswered; so a failure is remembered and answered at
// the next step the MTA waits for (RCPT, end of message).
sfsistat answer(SMFICTX* ctx, unsigned long no_reply_step, sfsistat status) {
    auto* conn = static_cast<ConnectionState*>(smfi_getpriv(ctx));
    if (!conn || (conn->no_reply_steps & no_reply_step) == 0) return status;
    if (status != SMFIS_CONTINUE) {
        if (conn->message) {
            conn->message->failed = true;
        } else {
            conn->failed = true;
        }
    }
    return SMFIS_NOREPLY;
}

sfsistat on_negotiate(SMFICTX* ctx, unsigned long offered_actions, unsigned long offered_steps,
                      unsigned long, unsigned long, unsigned long* actions, unsigned long* steps,
                      unsigned long*, unsigned long*) {
    return guarded(ctx, "negotiate", [&]() -> sfsistat {
        constexpr unsigned long needed = SMFIF_ADDHDRS | SMFIF_CHGHDRS;
        if ((offered_actions & needed) != needed) {
            log_error("the MTA does not allow adding and changing headers; cannot filter");
            return SMFIS_REJECT;
        }
        // Deleting recipients (API-accepted ones when others stay local) and quarantine
        // (the "hold" policy) are only used by API routes; adding recipients with ESMTP
        // arguments (ORCPT) by external_only routes.
        *actions = needed | (offered_actions & (SMFIF_SETSYMLIST | SMFIF_DELRCPT |
                                                SMFIF_QUARANTINE | SMFIF_ADDRCPT_PAR));
        // Skip what we never look at, and let the MTA not wait for an answer wherever ours is
        // always "continue": connect, HELO, MAIL, each header and the end of headers. Postfix
        // keeps those events in its buffer and sends them with the next one it waits for, so
        // a message costs five round trips (RCPT, DATA, the first body chunk, end of message)
        // instead of eight. RCPT is answered (a route's pseudo-domain is refused there), and
        // so are DATA and the body:
        // - DATA: smtpd hands the milter connection to cleanup after it, flushing what it
        //   buffered; unanswered, that small write leaves cleanup's header write waiting
        //   for our ACK (Nagle against delayed ACKs over TCP): 44 ms per message, measured.
        // - the body: SMFIS_SKIP spares every message that is not for an API route the rest
        //   of its body.
        constexpr unsigned long no_reply = kNoReplySteps;
        constexpr unsigned long wanted = SMFIP_NOUNKNOWN | SMFIP_SKIP | no_reply;
        *steps = offered_steps & wanted;

        auto* state = new_connection_state();
        if (!state) return SMFIS_TEMPFAIL;
        state->no_reply_steps = *steps & no_reply;
        state->body_skip = (*steps & SMFIP_SKIP) != 0;
        if (smfi_setpriv(ctx, state) != MI_SUCCESS) {
            delete state;
            return SMFIS_TEMPFAIL;
        }
        if (offered_actions & SMFIF_SETSYMLIST) request_macros(ctx);
        log_stage(
            ctx, state, "negotiate",
            {{"actions", fmt::format("{:#x}", *actions)}, {"steps", fmt::format("{:#x}", *steps)}});
        return SMFIS_CONTINUE;
    });
}

// milter.mta decides how relay routes reach their next hop; the wrong one sends their mail
// the normal way (Sendmail ignores the routing header; Postfix has no mailertable entries
// for the pseudo-domains). The MTA says what it is in macro v: warned once per process.
void warn_if_other_mta(const std::string& version) {
    static std::atomic<bool> warned{false};
    if (version.empty() || warned.load(std::memory_order_relaxed)) return;
    auto config = config_snapshot().get();
    if (!config) return;
    // Sendmail's v is its bare version ("8.17.1"); Postfix's is milter_macro_v, by default
    // "$mail_name $mail_version", which a site may change: only a leading digit says Sendmail.
    const bool sendmail = std::isdigit(static_cast<unsigned char>(version.front())) != 0;
    const bool postfix = version.starts_with("Postfix");
    if (!sendmail && !postfix) return;
    if (postfix == (config->mta == Mta::postfix)) return;
    if (warned.exchange(true)) return;
    log_warning(
        "the MTA says it is {}{}, but milter.mta = \"{}\": relay routes will not reach their "
        "next hop (set mta = \"{}\" and see `paas-milter {}-config`)",
        postfix ? "" : "Sendmail ", sanitize_for_log(version, 60), to_string(config->mta),
        postfix ? "postfix" : "sendmail", postfix ? "postfix" : "sendmail");
}

sfsistat on_connect(SMFICTX* ctx, char* hostname, _SOCK_ADDR* address) {
    return answer(
        ctx, SMFIP_NR_CONN, guarded(ctx, "connect", [&]() -> sfsistat {
            ConnectionState* conn = state_of(ctx);
            if (!conn) return SMFIS_TEMPFAIL;
            conn->client_addr = address_to_string(address);
            if (conn->client_addr.empty()) conn->client_addr = macro(ctx, "{client_addr}");
            // Postfix passes "unknown" or "[addr]" when the client has no verified name.
            conn->client_name = hostname && hostname[0] != '[' ? hostname : "unknown";
            warn_if_other_mta(macro(ctx, "v"));
            log_stage(ctx, conn, "connect",
                      {{"client", fmt::format("{}[{}]", sanitize_for_log(conn->client_name, 120),
                                              conn->client_addr)}});
            return SMFIS_CONTINUE;
        }));
}

sfsistat on_helo(SMFICTX* ctx, char* helo) {
    return answer(ctx, SMFIP_NR_HELO, guarded(ctx, "helo", [&]() -> sfsistat {
                      ConnectionState* conn = state_of(ctx);
                      if (!conn) return SMFIS_TEMPFAIL;
                      capture_certificate(ctx, *conn);
                      log_stage(ctx, conn, "helo",
                                {{"helo", sanitize_for_log(helo ? helo : "", 120)},
                                 {"tls", sanitize_for_log(macro(ctx, "{tls_version}"), 40)},
                                 {"cert_subject", sanitize_for_log(conn->cert_subject, 200)},
                                 {"cert_issuer", sanitize_for_log(conn->cert_issuer, 200)}});
                      return SMFIS_CONTINUE;
                  }));
}

sfsistat on_envfrom(SMFICTX* ctx, char** argv) {
    return answer(ctx, SMFIP_NR_MAIL, guarded(ctx, "mail", [&]() -> sfsistat {
                      ConnectionState* conn = state_of(ctx);
                      if (!conn) return SMFIS_TEMPFAIL;
                      conn->message.reset();
                      // First, so that a failure from here on is the message's (answered at RCPT).
                      MessageState& message = conn->message.emplace();
                      message.failed = conn->failed;  // connect or HELO failed: every message does
                      capture_certificate(ctx, *conn);
                      message.config = config_snapshot().get();
                      Transaction& tx = message.tx;
                      tx.client_addr = conn->client_addr;
                      tx.client_name = conn->client_name;
                      tx.cert_subject = conn->cert_subject;
                      tx.cert_issuer = conn->cert_issuer;
                      tx.cert_fingerprint = conn->cert_fingerprint;
                      tx.auth_user = macro(ctx, "{auth_authen}");
                      tx.sender = argv && argv[0] ? strip_angle_brackets(argv[0]) : std::string();
                      log_stage(ctx, conn, "mail",
                                {{"from", fmt::format("<{}>", sanitize_for_log(tx.sender, 200))},
                                 {"auth", sanitize_for_log(tx.auth_user, 120)}});
                      return SMFIS_CONTINUE;
                  }));
}

// Whether a client's RCPT would reach a route's next hop unclassified: its address, or the
// MTA's own reading of it ({rcpt_addr}, both MTAs send it at RCPT by default), in a route's
// pseudo-domain; with Sendmail also a recipient its rulesets resolved to a route's mailer
// ({rcpt_mailer}, "paas_ROUTE" from sendmail-config), however the address was disguised.
bool names_a_route(SMFICTX* ctx, const char* rcpt, const MessageState& message) {
    if (is_route_pseudo_address(rcpt) || is_route_pseudo_address(macro(ctx, "{rcpt_addr}"))) {
        return true;
    }
    if (!message.config || message.config->mta != Mta::sendmail) return false;
    return istarts_with(macro(ctx, "{rcpt_mailer}"), kSendmailRouteMailerPrefix);
}

sfsistat on_envrcpt(SMFICTX* ctx, char** argv) {
    return guarded(ctx, "rcpt", [&]() -> sfsistat {
        ConnectionState* conn = state_of(ctx);
        if (!conn || !conn->message) return SMFIS_TEMPFAIL;
        if (conn->message->failed) {
            log_error("{}: an earlier stage failed; RCPT tempfailed", queue_id(ctx));
            return SMFIS_TEMPFAIL;
        }
        if (argv && argv[0]) {
            if (names_a_route(ctx, argv[0], *conn->message)) {
                // Only the milter may put a recipient there (external_only routes): one named
                // by a client would reach a route's transport without being classified.
                log_warning("{}: RCPT {} refused: a route's pseudo-domain ({})", queue_id(ctx),
                            sanitize_for_log(argv[0], 200), kRoutePseudoDomain);
                smfi_setreply(ctx, const_cast<char*>("550"), const_cast<char*>("5.1.1"),
                              const_cast<char*>("Recipient address reserved for routing"));
                return SMFIS_REJECT;
            }
            conn->message->tx.recipients.push_back(strip_angle_brackets(argv[0]));
            conn->message->recipient_args.emplace_back(argv[0]);
            std::string esmtp;  // NOTIFY=, ORCPT=: kept if the recipient is rerouted
            for (int i = 1; argv[i]; ++i) {
                if (!esmtp.empty()) esmtp += ' ';
                esmtp += argv[i];
            }
            conn->message->recipient_esmtp_args.push_back(std::move(esmtp));
            log_stage(ctx, conn, "rcpt", {{"to", sanitize_for_log(argv[0], 200)}});
        }
        return SMFIS_CONTINUE;
    });
}

sfsistat on_header(SMFICTX* ctx, char* name, char* value) {
    ConnectionState* conn = static_cast<ConnectionState*>(smfi_getpriv(ctx));
    sfsistat status = guarded(ctx, "header", [&]() -> sfsistat {
        if (!conn || !conn->message || !name) return SMFIS_TEMPFAIL;
        MessageState& message = *conn->message;
        if (strcasecmp(name, message.config->routing_header.c_str()) == 0) {
            ++message.forged_routing_headers;
        }
        if (message.config->loop) note_loop_header(message, name, value);
        log_stage(ctx, conn, "header", {{"name", sanitize_for_log(name, 80)}});
        size_t size = std::strlen(name) + (value ? std::strlen(value) : 0);
        if (message.tx.headers.size() >= kMaxStoredHeaders ||
            message.stored_header_bytes + size > kMaxStoredHeaderBytes) {
            message.headers_truncated = true;
            return SMFIS_CONTINUE;
        }
        message.stored_header_bytes += size;
        message.tx.headers.push_back({name, value ? value : ""});
        return SMFIS_CONTINUE;
    });
    return answer(ctx, SMFIP_NR_HDR, status);
}

// Answered: DATA is never negotiated no-reply (see on_negotiate). Only --verbose needs it.
sfsistat on_data(SMFICTX* ctx) {
    return guarded(ctx, "data", [&]() -> sfsistat {
        log_stage(ctx, static_cast<ConnectionState*>(smfi_getpriv(ctx)), "data");
        return SMFIS_CONTINUE;
    });
}

// Classifies once the header is complete: the decision needs nothing from the body, and
// only an API route needs the body at all.
sfsistat on_eoh(SMFICTX* ctx) {
    return answer(
        ctx, SMFIP_NR_EOH, guarded(ctx, "eoh", [&]() -> sfsistat {
            ConnectionState* conn = state_of(ctx);
            if (!conn || !conn->message) return SMFIS_TEMPFAIL;
            MessageState& message = *conn->message;
            if (message.headers_truncated) {
                log_warning(
                    "{}: header too large: only the first {} headers / {} bytes were "
                    "classified",
                    queue_id(ctx), message.tx.headers.size(), message.stored_header_bytes);
            }
            message.decision = classify(*message.config, message.tx);
            log_stage(ctx, conn, "eoh",
                      {{"headers", std::to_string(message.tx.headers.size())},
                       {"rule", message.decision->rule ? message.decision->rule->name : ""},
                       {"route", message.decision->route ? message.decision->route->name : ""}});
            std::string id = macro(ctx, "i");
            if (auto r = start_api_spool(message, id); !r) {
                log_error("{}: {}; tempfail", queue_id(ctx), r.error().message);
                return SMFIS_TEMPFAIL;
            }
            return SMFIS_CONTINUE;
        }));
}

sfsistat on_body(SMFICTX* ctx, unsigned char* data, size_t length) {
    return guarded(ctx, "body", [&]() -> sfsistat {
        ConnectionState* conn = state_of(ctx);
        if (!conn || !conn->message) return SMFIS_TEMPFAIL;
        MessageState& message = *conn->message;
        log_stage(ctx, conn, "body",
                  {{"bytes", std::to_string(length)},
                   {"rest", message.spool ? "" : (conn->body_skip ? "skipped" : "ignored")}});
        if (!message.spool) return conn->body_skip ? SMFIS_SKIP : SMFIS_CONTINUE;
        auto appended =
            append_api_body(message, std::string_view(reinterpret_cast<const char*>(data), length));
        if (!appended) {
            log_error("{}: {}; tempfail", queue_id(ctx), appended.error().message);
            return SMFIS_TEMPFAIL;
        }
        return SMFIS_CONTINUE;
    });
}

sfsistat act(SMFICTX* ctx, const std::string& id, MessageState& message) {
    // The API route's time budget covers everything from here on.
    auto started = std::chrono::steady_clock::now();
    const Config& config = *message.config;
    if (!message.decision) message.decision = classify(config, message.tx);
    const Decision& decision = *message.decision;
    Verdict verdict = decide_verdict(config, decision, message.forged_routing_headers);
    if (config.loop) {
        LoopCheck arrived =
            check_loop_stamps(*config.loop, message.loop_fields, message.message_id.value_or(""));
        if (auto r = apply_loop_protection(*config.loop, decision, arrived, verdict); !r) {
            log_error("{}: loop stamp: {}; tempfail", id, r.error().message);
            return SMFIS_TEMPFAIL;
        }
    }
    if (verdict.submit_to_api && !verdict.dry_run) {
        return act_api(ctx, id, message, verdict, started + decision.route->api->time_budget);
    }
    std::string line = format_decision_log(message.tx, decision, verdict);
    MtaPlan plan = plan_for_verdict(
        verdict, decision.route,
        {message.tx.recipients, message.recipient_args, &message.recipient_esmtp_args});
    line += plan.log;
    sfsistat status = replay(ctx, config.routing_header, plan, line);
    log_decision(id, line, decision, message.tx,
                 count_transaction(decision, verdict, plan, status, nullptr));
    return status;
}

sfsistat on_eom(SMFICTX* ctx) {
    return guarded(ctx, "eom", [&]() -> sfsistat {
        ConnectionState* conn = state_of(ctx);
        if (!conn || !conn->message) return SMFIS_TEMPFAIL;
        std::string id = queue_id(ctx);
        log_stage(ctx, conn, "eom",
                  {{"recipients", std::to_string(conn->message->tx.recipients.size())}});
        if (conn->message->failed) {
            conn->message.reset();
            log_error("{}: an earlier stage failed; tempfail", id);
            return SMFIS_TEMPFAIL;
        }
        // Whatever act() does, the message is over: free it (and its in-flight count).
        struct Finish {
            ConnectionState* conn;
            ~Finish() { conn->message.reset(); }
        } finish{conn};
        return act(ctx, id, *conn->message);
    });
}

sfsistat on_abort(SMFICTX* ctx) {
    return guarded(ctx, "abort", [&]() -> sfsistat {
        auto* conn = static_cast<ConnectionState*>(smfi_getpriv(ctx));
        log_stage(ctx, conn, "abort", {{"message", conn && conn->message ? "open" : "none"}});
        if (conn) conn->message.reset();
        return SMFIS_CONTINUE;
    });
}

sfsistat on_close(SMFICTX* ctx) {
    // Take ownership back from libmilter so the state is freed however we leave.
    std::unique_ptr<ConnectionState> conn(static_cast<ConnectionState*>(smfi_getpriv(ctx)));
    smfi_setpriv(ctx, nullptr);
    try {
        log_stage(ctx, conn.get(), "close");
    } catch (...) {  // nothing may cross into libmilter; a lost debug line is harmless
    }
    return SMFIS_CONTINUE;
}

}  // namespace

InFlight::InFlight() {
    ++g_messages_in_flight;
    metrics().message_started();
}
InFlight::~InFlight() {
    --g_messages_in_flight;
    metrics().message_finished();
}

int messages_in_flight() {
    return g_messages_in_flight.load();
}

smfiDesc milter_description() {
    smfiDesc description{};
    description.xxfi_name = const_cast<char*>("paas-milter");
    description.xxfi_version = SMFI_VERSION;
    description.xxfi_flags = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_SETSYMLIST | SMFIF_DELRCPT |
                             SMFIF_QUARANTINE | SMFIF_ADDRCPT_PAR;
    description.xxfi_connect = on_connect;
    description.xxfi_helo = on_helo;
    description.xxfi_envfrom = on_envfrom;
    description.xxfi_envrcpt = on_envrcpt;
    description.xxfi_header = on_header;
    description.xxfi_data = on_data;
    description.xxfi_eoh = on_eoh;
    description.xxfi_body = on_body;
    description.xxfi_eom = on_eom;
    description.xxfi_abort = on_abort;
    description.xxfi_close = on_close;
    description.xxfi_negotiate = on_negotiate;
    return description;
}

}  // namespace paasmilter
