// The configuration: one TOML file (see etc/paas-milter.toml) plus the tables it names.
// Loaded whole into an immutable snapshot; the daemon swaps snapshots atomically on SIGHUP.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "paasmilter/acs_auth.hpp"
#include "paasmilter/http_client.hpp"
#include "paasmilter/loop_stamp.hpp"
#include "paasmilter/mime_convert.hpp"
#include "paasmilter/quota/quota.hpp"
#include "paasmilter/result.hpp"
#include "paasmilter/route_addresses.hpp"
#include "paasmilter/table.hpp"

namespace paasmilter {

enum class Mode { enforce, dry_run };
enum class Action { relay, pass, reject, tempfail, api };
// The MTA in front ([milter] mta): how a relay route reaches its next hop. Postfix: the
// routing header and milter_header_checks (external_only routes per recipient). Sendmail,
// which has no milter_header_checks: every relay route per recipient, through the route's
// pseudo-domain and a mailertable entry (`paas-milter sendmail-config`).
enum class Mta { postfix, sendmail };

const char* to_string(Mode mode);
const char* to_string(Mta mta);
const char* to_string(Action action);

// What to do with a message the API did not accept.
struct FailurePolicy {
    enum class Kind { tempfail, relay, hold, reject };
    Kind kind = Kind::tempfail;
    std::string relay_route;  // for Kind::relay: a route with action = "relay"
};
std::string to_string(const FailurePolicy& policy);

// What to do when the service may or may not have taken the message (a timeout, a reset or a
// 5xx after the request went out, and nothing could settle it).
enum class AmbiguityPolicy {
    tempfail,     // the client retries: a possible duplicate, never a loss (default)
    hold,         // Postfix's hold queue: the operator decides
    assume_sent,  // discard the local copy: never a duplicate, possibly a loss
};
const char* to_string(AmbiguityPolicy policy);

// When ACS is asked whether an earlier attempt of a message already got a request accepted
// (GET /emails/operations/{id}) before the request is posted: a service round trip per
// message, and what catches a client's retry of an accepted message.
enum class LookupBeforePost {
    automatic,     // `always` when [quota] declares a fleet, else `own_attempts` (default)
    always,        // before every first post: also catches a retry that went to another gateway
    own_attempts,  // only when this gateway's journal says it posted the request before
};
const char* to_string(LookupBeforePost lookup);

// Microsoft Graph (provider = "graph"): POST {endpoint}/v1.0/users/{mailbox}/sendMail with
// the message as the client sent it.
struct GraphSettings {
    std::string endpoint = "https://graph.microsoft.com";  // national clouds, tests
    std::string mailbox;  // UPN or object id of the mailbox that sends
    // Look for the message's Message-ID in the mailbox's Sent Items to settle an ambiguous
    // send (needs Mail.ReadBasic.All or Mail.Read).
    bool sent_items_check = false;
    // Graph allows 4 concurrent requests per app and mailbox.
    size_t mailbox_concurrency = 4;
    // Messages over one request's limit go as a draft with upload sessions (needs
    // Mail.ReadWrite besides Mail.Send); without, they take on_oversize.
    bool upload_sessions = false;
    // The largest message sent with upload_sessions: Exchange Online's default maximum
    // message size (35 MB; a tenant may raise it to 150 MB).
    size_t max_message_bytes = 35'000'000;
};

struct SenderMap;

// An `action = "api"` route: submit to Azure Communication Services Email or Microsoft Graph.
struct ApiSettings {
    enum class Provider { acs, graph };
    Provider provider = Provider::acs;
    GraphSettings graph;
    AmbiguityPolicy on_ambiguous = AmbiguityPolicy::tempfail;
    LookupBeforePost lookup_before_post = LookupBeforePost::always;  // the loader: automatic
    std::string endpoint;  // "https://contoso.europe.communication.azure.com"
    std::string api_version = "2023-03-31";
    bool inline_attachments = false;  // api-version >= 2025-09-01 has contentId
    // Exactly one of the two: an access key (HMAC) or Entra ID client credentials.
    std::string access_key;  // base64; never logged
    std::optional<EntraCredentials> entra_credentials;
    HttpClientOptions http_options;
    // Services built from the two above, only when the configuration was loaded with a
    // ServiceRegistry (the daemon); null for `check` and `query`.
    std::shared_ptr<EntraTokenProvider> entra;
    ConversionOptions conversion;
    std::vector<std::string> local_domains;  // recipients there stay with Postfix
    // Who sends: the sender address (ACS) or mailbox (Graph) per client; null: the route's.
    std::shared_ptr<const SenderMap> sender_map;
    FailurePolicy on_failure;  // transient: 429/5xx/timeouts/auth, after retries
    FailurePolicy on_permanent_failure{FailurePolicy::Kind::reject, {}};
    FailurePolicy on_oversize{FailurePolicy::Kind::reject, {}};
    // Quota buckets (quota_messages_per_minute, ..._per_hour, quota_recipients_per_day; none:
    // no quota), taken from before any request, and what to do when one is empty.
    std::vector<BucketSpec> quota;
    FailurePolicy on_quota;
    std::chrono::seconds time_budget{60};  // all attempts of one message, well under
                                           // Postfix's milter_content_timeout (300 s)
    std::chrono::seconds request_timeout{30};
    int max_attempts = 4;
    size_t max_request_bytes = 10 * 1024 * 1024;  // ACS: about 10 MB per request
    size_t max_recipients_per_request = 50;       // ACS limit
    size_t spool_threshold = 1024 * 1024;         // larger bodies go to a temporary file
    std::string spool_directory = "/var/tmp";
    std::shared_ptr<HttpClient> http;  // shared by all messages of this route
};
// "acs", "graph": the provider in logs and metric labels.
const char* to_string(ApiSettings::Provider provider);

struct Route {
    std::string name;
    Action action = Action::pass;
    bool dry_run = false;      // log only, whatever the global mode
    std::string header_value;  // relay: value of the routing header (default: the name)
    std::string transport;     // relay: "transport:nexthop" (postfix-config, sendmail-config)
    int reply_code = 0;        // reject / tempfail
    std::string reply_status;  // "5.7.1"
    std::string reply_text;
    std::shared_ptr<const ApiSettings> api;  // action = "api"
    std::string where;                       // "file:line" of the [routes.NAME] table
    // relay, external_only = true: only the recipients `internal` does not hold take the
    // route, each in the route's pseudo-domain (route_addresses.hpp); no routing header.
    bool external_only = false;
    std::shared_ptr<const InternalRecipients> internal;
    // relay and api: sender_rewrite / recipient_rewrite (relay: Postfix's smtp_generic_maps
    // from `paas-milter postfix-config`; api: applied in the conversion).
    AddressRewrite rewrite;
};

// The transaction facts a condition looks at.
enum class Field {
    client_addr,
    client_name,
    cert_subject,
    cert_issuer,
    cert_fingerprint,
    auth,
    sender,
    recipient,
    header,
};
const char* to_string(Field field);

enum class RecipientMatch { any, all };

struct Condition {
    Field field = Field::client_addr;
    // Inline entries and referenced tables in the order they were listed; the first that
    // yields a (non-DUNNO) match decides.
    std::vector<std::unique_ptr<Table>> sources;
    // True when every source is a table whose results all name routes (or DUNNO), so a
    // match always yields a route: this is what lets a rule omit `route`.
    bool always_names_route = false;
};

// Which sender address (ACS) or mailbox (Graph) a transaction uses, by who the client is:
// the first table that knows the client's certificate subject, SASL login, address or
// envelope sender, in that order (the strongest proof of identity first).
struct SenderMap {
    std::vector<Condition> conditions;  // in lookup order
    // A client no table knows: refused (an allow-list of who may send as whom), or sent as
    // the route's `sender` / `mailbox`.
    bool refuse_unmapped = false;
};

struct Rule {
    std::string name;
    std::string route;  // may be empty when a condition's table names the route
    RecipientMatch recipient_match = RecipientMatch::any;
    std::vector<Condition> conditions;  // all must hold; kept in cheap-first order
    std::string where;
};

struct Config {
    std::string path;
    std::string socket;
    std::string routing_header = "X-PaaS-Route";
    Mode mode = Mode::enforce;
    Mta mta = Mta::postfix;
    std::string default_route;  // empty: leave unmatched messages alone
    // Where the daemon keeps what must survive a restart (the journal of posted API
    // requests). Empty: $STATE_DIRECTORY (systemd's StateDirectory=), else
    // /var/lib/paas-milter; see state_directory_of().
    std::string state_directory;
    // [metrics] listen: "127.0.0.1:9940" or "[::1]:9940" where the daemon serves Prometheus
    // metrics on /metrics; empty: not served. Read at start only, like milter.socket.
    std::string metrics_listen;
    // [loop]: stamp routed messages and stop loops (loop_stamp.hpp); null: neither.
    std::shared_ptr<const LoopSettings> loop;
    // [milter] internal_domains / internal_table: internal recipients of external_only
    // routes that name none of their own; null when not set.
    std::shared_ptr<const InternalRecipients> internal_recipients;
    // [quota]: where the routes' quota buckets live; the store is built only with a
    // ServiceRegistry (the daemon) and only when a route has buckets.
    QuotaSettings quota;
    std::shared_ptr<QuotaStore> quota_store;
    std::map<std::string, Route, std::less<>> routes;
    std::vector<Rule> rules;
    // Valid but risky settings ("file:line: key: why"), for `check` and the daemon's log.
    std::vector<std::string> warnings;

    const Route* find_route(std::string_view name) const;
    bool has_api_routes() const;
};

// The state directory in force: the configured one, else the first of systemd's
// $STATE_DIRECTORY (`state_directory_env`, may be null), else /var/lib/paas-milter.
std::string state_directory_of(const Config& config, const char* state_directory_env);

class ServiceRegistry;

// Reads and validates the whole configuration, tables included. Every error names the
// file, the line and the key (or table entry) at fault. With `services`, API routes get
// their HTTP clients and token caches from it (reused across reloads); without, none.
Result<std::shared_ptr<const Config>> load_config(const std::string& path,
                                                  ServiceRegistry* services = nullptr);

// Lines for Postfix's milter_header_checks that send each relay route with a
// `transport` to it (what `paas-milter header-checks` prints).
std::string render_header_checks(const Config& config);

}  // namespace paasmilter
