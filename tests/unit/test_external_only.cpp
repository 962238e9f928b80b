// External-only routing and the per-route rewrite maps: the pseudo-domain encoding, which
// recipients are internal, the end-of-message plan, the configuration keys, and the rewrite
// in the ACS and Graph conversions.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "config_fixture.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/delivery/eom_plan.hpp"
#include "paasmilter/mime_convert.hpp"
#include "paasmilter/providers/graph_mime.hpp"
#include "paasmilter/route_addresses.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::has;
using paasmilter::testing::TempDir;

namespace {

std::string load_error(const std::string& text) {
    TempDir dir;
    dir.write("relay_domains", "contoso.test OK\n");
    auto config = load_config(dir.write("paas-milter.toml", text));
    return config ? std::string() : config.error().to_string();
}

const std::string kHead = R"(
[milter]
socket = "inet:10025@127.0.0.1"
)";

std::shared_ptr<const InternalRecipients> internal(std::vector<std::string> domains) {
    auto set = std::make_shared<InternalRecipients>();
    set->domains = std::move(domains);
    return set;
}

std::string crlf(std::string_view text) {
    std::string out;
    for (char c : text) {
        if (c == '\n') out += '\r';
        out += c;
    }
    return out;
}

}  // namespace

TEST_CASE("pseudo-domain: each recipient in the route's pseudo-domain, reversible by a regex") {
    CHECK(route_pseudo_domain("ACS-smtp") == "acs-smtp.paas-route.invalid");
    CHECK(encode_route_address("bob@example.net", "acs-smtp") ==
          "bob@example.net.acs-smtp.paas-route.invalid");
    CHECK(encode_route_address("<Dave@Example.COM>", "acs-smtp") ==
          "Dave@Example.COM.acs-smtp.paas-route.invalid");
    CHECK(encode_route_address("\"john doe\"@example.org", "r") ==
          "\"john doe\"@example.org.r.paas-route.invalid");
    CHECK(encode_route_address("\"odd@x y\"@example.net", "r") ==
          "\"odd@x y\"@example.net.r.paas-route.invalid");
    // Postfix calls "[192.0.2.9].r.paas-route.invalid" bad address syntax: quoted instead.
    CHECK(encode_route_address("carol@[192.0.2.9]", "r") ==
          "\"carol@[192.0.2.9]\"@r.paas-route.invalid");
    CHECK(encode_route_address("v6@[IPv6:2001:db8::1]", "r") ==
          "\"v6@[IPv6:2001:db8::1]\"@r.paas-route.invalid");
    // Not carried: no domain, trailing dot, a quoted local part at an address literal,
    // control characters, a domain too long with the suffix.
    CHECK_FALSE(encode_route_address("postmaster", "r"));
    // Postfix drops a trailing dot and delivers to the domain: so does the route.
    CHECK(encode_route_address("a@example.net.", "r") == "a@example.net.r.paas-route.invalid");
    CHECK_FALSE(encode_route_address("a@example.net..", "r"));
    CHECK_FALSE(encode_route_address("\"a b\"@[192.0.2.9]", "r"));
    CHECK_FALSE(encode_route_address("a\r@example.net", "r"));
    CHECK_FALSE(encode_route_address("a@" + std::string(240, 'x') + ".net", "r"));

    CHECK(valid_route_label("acs-smtp"));
    CHECK_FALSE(valid_route_label("b.a"));
    CHECK_FALSE(valid_route_label("acs_smtp"));
    CHECK_FALSE(valid_route_label("-x"));
    CHECK_FALSE(valid_route_label(std::string(64, 'a')));

    CHECK(is_route_pseudo_address("<bob@example.net.acs-smtp.paas-route.invalid>"));
    CHECK(is_route_pseudo_address("\"c@[192.0.2.9]\"@R.Paas-Route.Invalid."));
    CHECK_FALSE(is_route_pseudo_address("bob@example.net"));
    // The percent hack and bang paths make other parts the domain: refused anywhere.
    CHECK(is_route_pseudo_address("user%example.net.r.paas-route.invalid@localhost"));
    CHECK(is_route_pseudo_address("example.net.r.paas-route.invalid!user"));
    // Disguised as the MTA's parser undoes it (review finding: Sendmail routed these to the
    // route's mailer): comments, white space, quotes and backslashes.
    CHECK(is_route_pseudo_address("<bob@example.net.acs-smtp.paas-route.(x)invalid>"));
    CHECK(is_route_pseudo_address("<bob@example.net.acs-smtp.paas-route. invalid>"));
    CHECK(is_route_pseudo_address("<bob@example.net.acs-smtp.paas-route\\.invalid>"));
    CHECK(is_route_pseudo_address("<bob@example.net.acs-smtp.paas-(a(b)c)route.inv\"\"alid>"));
    CHECK(is_route_pseudo_address("<bob@example.net.acs-smtp.paas\\-route.\tinvalid>"));
    // A '(' in a quoted local part is text, not the start of a comment (review finding).
    CHECK(is_route_pseudo_address("<\"(x\"@paas-route(y).invalid>"));
    CHECK_FALSE(is_route_pseudo_address("<\"john(work)\"@example.net>"));
    // Harmless in a comment, but refused all the same: never a doubt.
    CHECK(is_route_pseudo_address("<bob(paas-route.invalid)@example.net>"));
}

TEST_CASE("ORCPT: xtext of the original, or the client's own ORCPT and NOTIFY kept") {
    CHECK(xtext_encode("john doe+x=y@example.org") == "john+20doe+2Bx+3Dy@example.org");
    CHECK(reroute_esmtp_args("bob@example.net", "") == "ORCPT=rfc822;bob@example.net");
    CHECK(reroute_esmtp_args("\"john doe\"@example.org", "") ==
          "ORCPT=rfc822;\"john+20doe\"@example.org");
    CHECK(reroute_esmtp_args("frank@example.net",
                             "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;frank@orig.example") ==
          "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;frank@orig.example");
    CHECK(reroute_esmtp_args("gina@example.net", "notify=NEVER RRVS=2030-01-01T00:00:00Z") ==
          "notify=NEVER ORCPT=rfc822;gina@example.net");
}

TEST_CASE("internal recipients: domains, subdomains, and the operator's Postfix tables") {
    TempDir dir;
    InternalRecipients set;
    set.domains = {"contoso.test", ".corp.contoso.test"};
    CHECK(set.contains("alice@contoso.test"));
    CHECK(set.contains("<Alice@CONTOSO.TEST>"));
    CHECK(set.contains("postmaster"));  // unqualified: local
    // ... unless Postfix turns it into a remote address (bang path, percent hack)
    CHECK_FALSE(set.contains("example.net!victim"));
    CHECK_FALSE(set.contains("victim%example.net"));
    CHECK(set.contains("a@eu.corp.contoso.test"));
    CHECK_FALSE(set.contains("a@corp.contoso.test"));
    CHECK_FALSE(set.contains("a@sub.contoso.test"));
    CHECK_FALSE(set.contains("bob@example.net"));

    // texthash: like relay_domains (a domain matches its subdomains, parent_domain_matches_
    // subdomains), and a virtual map's addresses; DUNNO carves an exception.
    InternalRecipients hashed;
    hashed.table = std::shared_ptr<const Table>(
        open_table("texthash:" + dir.write("relay_domains",
                                           "fabrikam.test OK\nuser@example.org x\n"
                                           "guest.fabrikam.test DUNNO\n"),
                   KeyKind::address)
            .value());
    CHECK(hashed.contains("a@fabrikam.test"));
    CHECK(hashed.contains("a@eu.fabrikam.test"));
    CHECK(hashed.contains("user@example.org"));
    CHECK_FALSE(hashed.contains("other@example.org"));
    CHECK_FALSE(hashed.contains("a@guest.fabrikam.test"));

    // pcre: keyed by domain as Postfix's relay_domains tables are, or by address.
    InternalRecipients regex;
    regex.table = std::shared_ptr<const Table>(
        open_table("pcre:" + dir.write("internal.pcre", "/^contoso\\.test$/ OK\n/^ops@/ OK\n"),
                   KeyKind::address)
            .value());
    CHECK(regex.contains("a@contoso.test"));
    CHECK(regex.contains("ops@example.net"));
    CHECK_FALSE(regex.contains("a@example.net"));

    // cidr: address-literal recipients by their address.
    InternalRecipients cidr;
    cidr.table_is_cidr = true;
    cidr.table = std::shared_ptr<const Table>(
        open_table("cidr:" + dir.write("internal.cidr", "192.0.2.0/24 OK\n2001:db8::/32 OK\n"),
                   KeyKind::ip)
            .value());
    CHECK(cidr.contains("a@[192.0.2.9]"));
    CHECK(cidr.contains("a@[IPv6:2001:db8::1]"));
    CHECK_FALSE(cidr.contains("a@[198.51.100.1]"));
    CHECK_FALSE(cidr.contains("a@example.net"));
}

TEST_CASE("domain rewrite maps and the recipients the service reports, as the MTA knows them") {
    DomainMap map;
    map.entries = {{"contoso.local", "contoso.com"}};
    CHECK(map.rewrite("Bob@Contoso.Local") == "Bob@contoso.com");
    CHECK(map.rewrite("<\"j d\"@contoso.local>") == "<\"j d\"@contoso.com>");
    CHECK_FALSE(map.rewrite("bob@sub.contoso.local"));
    CHECK(map.apply("bob@example.net") == "bob@example.net");

    const std::vector<std::string> originals = {"a@contoso.local", "b@example.net",
                                                "c@contoso.local"};
    CHECK(original_recipients({"A@contoso.com", "b@example.net"}, originals, map) ==
          std::vector<std::string>{"a@contoso.local", "b@example.net"});
    CHECK(original_recipients({}, originals, map).empty());
}

TEST_CASE("plan: an external_only relay route reroutes only the external recipients") {
    Route route;
    route.name = "acs-smtp";
    route.action = Action::relay;
    route.header_value = "acs-smtp";
    route.transport = "acs-relay:[127.0.0.1]:2525";
    route.external_only = true;
    route.internal = internal({"contoso.test"});
    Config config;
    Verdict verdict;
    verdict.routing_header = "X-PaaS-Route";
    verdict.routing_value = "acs-smtp";
    verdict.add_routing_header = false;  // decide_verdict, for an external_only route
    verdict.forged_headers_to_delete = 1;
    const std::vector<std::string> rcpts = {"alice@contoso.test", "bob@example.net",
                                            "carol@[192.0.2.9]", "bob@example.net",
                                            "\"x y\"@[192.0.2.9]"};
    std::vector<std::string> args, esmtp = {"", "NOTIFY=NEVER", "", "", ""};
    for (const auto& r : rcpts) args.push_back("<" + r + ">");

    MtaPlan plan = plan_for_verdict(verdict, &route, {rcpts, args, &esmtp});
    CHECK(plan.delete_routing_headers == 1);
    CHECK(plan.add_headers.empty());
    // A recipient the pseudo-domain cannot carry never takes Postfix's normal path (that
    // would dodge the route): the whole message is held, nothing rerouted.
    CHECK(plan.delete_recipients.empty());
    CHECK(plan.add_recipients.empty());
    CHECK(has(plan.log, "not_routable=<\"x y\"@[192.0.2.9]> (held)"));
    REQUIRE(plan.quarantine_reason);
    CHECK(has(*plan.quarantine_reason, "cannot carry"));
    plan = plan_for_verdict(verdict, &route,
                            {std::vector<std::string>(rcpts.begin(), rcpts.end() - 1),
                             std::vector<std::string>(args.begin(), args.end() - 1), &esmtp});
    // bob twice: deleted once, added once
    CHECK(plan.delete_recipients ==
          std::vector<std::string>{"<bob@example.net>", "<carol@[192.0.2.9]>"});
    REQUIRE(plan.add_recipients.size() == 2);
    CHECK(plan.add_recipients[0].address == "<bob@example.net.acs-smtp.paas-route.invalid>");
    CHECK(plan.add_recipients[0].esmtp_args == "NOTIFY=NEVER ORCPT=rfc822;bob@example.net");
    CHECK(plan.add_recipients[1].address == "<\"carol@[192.0.2.9]\"@acs-smtp.paas-route.invalid>");
    CHECK(plan.add_recipients[1].esmtp_args == "ORCPT=rfc822;carol@[192.0.2.9]");
    CHECK(has(plan.log, "external_only=acs-smtp, rerouted=2, staying=1"));
    CHECK_FALSE(plan.quarantine_reason);

    // Only internal recipients: nothing changes, the message keeps Postfix's normal path.
    const std::vector<std::string> local = {"alice@contoso.test"},
                                   local_args = {"<alice@contoso.test>"};
    plan = plan_for_verdict(verdict, &route, {local, local_args});
    CHECK(plan.delete_recipients.empty());
    CHECK(plan.add_recipients.empty());
    CHECK(has(plan.log, "rerouted=0, staying=1"));

    // A dry run changes nothing; a route without external_only keeps its routing header.
    verdict.dry_run = true;
    plan = plan_for_verdict(verdict, &route, {rcpts, args});
    CHECK(plan.add_recipients.empty());
    CHECK(plan.delete_recipients.empty());
    verdict.dry_run = false;
    verdict.add_routing_header = true;
    route.external_only = false;
    plan = plan_for_verdict(verdict, &route, {rcpts, args});
    CHECK(plan.add_recipients.empty());
    REQUIRE(plan.add_headers.size() == 1);
    CHECK(plan.add_headers[0].second == "acs-smtp");
}

TEST_CASE("plan: an API route's relay fallback follows the fallback route's external_only") {
    Config config;
    config.routing_header = "X-PaaS-Route";
    Route fallback;
    fallback.name = "acs-smtp";
    fallback.action = Action::relay;
    fallback.header_value = "acs-smtp";
    fallback.transport = "acs-relay:[127.0.0.1]:2525";
    fallback.external_only = true;
    fallback.internal = internal({"contoso.test"});
    config.routes.emplace("acs-smtp", fallback);
    ApiSettings api;
    api.local_domains = {"local.test"};
    api.on_failure = {FailurePolicy::Kind::relay, "acs-smtp"};
    Verdict verdict;
    verdict.submit_to_api = true;
    const std::vector<std::string> rcpts = {"a@example.net", "b@example.net", "c@contoso.test",
                                            "d@local.test"};
    std::vector<std::string> args;
    for (const auto& r : rcpts) args.push_back("<" + r + ">");

    ApiResult failed;
    failed.failure = ApiFailure::transient;
    failed.detail = "HTTP 503";
    MtaPlan plan = plan_for_api(config, api, verdict, rcpts, args, failed);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK(plan.add_headers.empty());
    CHECK(plan.delete_recipients == std::vector<std::string>{"<a@example.net>", "<b@example.net>"});
    REQUIRE(plan.add_recipients.size() == 2);
    CHECK(plan.add_recipients[1].address == "<b@example.net.acs-smtp.paas-route.invalid>");
    CHECK(has(plan.log, "policy=relay:acs-smtp"));
    CHECK(has(plan.log, "external_only=acs-smtp, rerouted=2, staying=2"));

    // After a partial acceptance: what the service has leaves; only the rest is rerouted.
    ApiResult partial = failed;
    partial.accepted = {"a@example.net"};
    plan = plan_for_api(config, api, verdict, rcpts, args, partial);
    CHECK(plan.delete_recipients == std::vector<std::string>{"<a@example.net>", "<b@example.net>"});
    REQUIRE(plan.add_recipients.size() == 1);
    CHECK(plan.add_recipients[0].address == "<b@example.net.acs-smtp.paas-route.invalid>");
    CHECK(has(plan.log, "rerouted=1, staying=2"));
}

TEST_CASE("configuration: external_only, internal recipients and rewrite maps") {
    TempDir dir;
    dir.write("relay_domains", "contoso.test OK\n");
    const std::string good = kHead + R"(
internal_domains = ["contoso.test", ".corp.contoso.test"]

[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"
external_only = true
sender_rewrite = { "Contoso.Local" = "contoso.com" }
recipient_rewrite = { "fabrikam.local" = "fabrikam.com" }

[routes.own]
action = "relay"
transport = "own-relay:[192.0.2.1]:25"
external_only = true
internal_table = "texthash:relay_domains"
)";
    auto config = load_config(dir.write("paas-milter.toml", good));
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    const Route* acs = (*config)->find_route("acs-smtp");
    REQUIRE(acs);
    CHECK(acs->external_only);
    REQUIRE(acs->internal);
    CHECK(acs->internal == (*config)->internal_recipients);  // the [milter] default
    CHECK(acs->internal->contains("a@eu.corp.contoso.test"));
    CHECK(acs->rewrite.sender.entries ==
          std::vector<std::pair<std::string, std::string>>{{"contoso.local", "contoso.com"}});
    const Route* own = (*config)->find_route("own");
    REQUIRE(own->internal);
    CHECK(own->internal->contains("x@contoso.test"));
    CHECK_FALSE(own->internal->contains("x@corp.contoso.test.example"));

    const std::string relay = kHead + R"(
[routes.r]
action = "relay"
transport = "r-relay:[192.0.2.1]:25"
)";
    CHECK(has(load_error(relay + "external_only = true\n"), "no internal recipients defined"));
    CHECK(has(
        load_error(relay +
                   "external_only = true\ninternal_table = \"hash:/etc/postfix/relay_domains\"\n"),
        "name the source file as \"texthash:/etc/postfix/relay_domains\""));
    CHECK(has(load_error(relay + "internal_domains = [\"contoso.test\"]\n"),
              "only valid with external_only = true"));
    CHECK(has(load_error(relay + "external_only = true\ninternal_domains = [\"not a domain\"]\n"),
              "is not a domain"));
    CHECK(has(load_error(kHead + "[routes.r]\naction = \"relay\"\nexternal_only = true\n"
                                 "internal_domains = [\"contoso.test\"]\n"),
              "needs transport"));
    CHECK(has(load_error(kHead + "[routes.\"b.a\"]\naction = \"relay\"\ntransport = \"x:[h]\"\n"
                                 "external_only = true\ninternal_domains = [\"c.test\"]\n"),
              "DNS label"));
    CHECK(has(load_error(kHead + "[routes.p]\naction = \"pass\"\nexternal_only = true\n"),
              "only valid with action = \"relay\""));
    CHECK(has(load_error(kHead + "[routes.p]\naction = \"pass\"\n"
                                 "sender_rewrite = { \"a.local\" = \"a.com\" }\n"),
              "only valid with action = \"relay\" or \"api\""));
    CHECK(has(load_error(relay + "sender_rewrite = { \"a.local\" = \"a.com\" }\n"
                                 "recipient_rewrite = { \"a.local\" = \"b.com\" }\n"),
              "cannot tell the two apart"));
    CHECK(has(load_error(relay + "sender_rewrite = { \"a.local\" = 3 }\n"), "expected a domain"));
    CHECK(has(load_error(kHead + "[routes.r]\naction = \"relay\"\n"
                                 "recipient_rewrite = { \"a.local\" = \"a.com\" }\n"),
              "set transport"));
}

TEST_CASE("ACS conversion: sender and recipient domains rewritten, envelope and headers") {
    ConversionOptions options;
    options.sender = "DoNotReply@contoso.azurecomm.net";
    options.verified_domains = {"contoso.com"};
    options.rewrite.sender.entries = {{"contoso.local", "contoso.com"}};
    options.rewrite.recipient.entries = {{"fabrikam.local", "fabrikam.com"}};
    const std::string source = crlf(
        "From: Scanner <scanner@contoso.local>\nReply-To: desk@contoso.local\n"
        "To: Bob <bob@fabrikam.local>, carol@example.net\nCc: dan@fabrikam.local\n"
        "Subject: scan\n\nbody\n");
    Envelope envelope{
        "scanner@contoso.local",
        {"bob@fabrikam.local", "carol@example.net", "dan@fabrikam.local", "eve@fabrikam.local"}};
    auto message = convert_message(source, envelope, options);
    REQUIRE_MESSAGE(message.ok(), message.error().to_string());
    // The rewritten sender is in a verified domain: it is kept.
    CHECK(message->sender_address == "scanner@contoso.com");
    REQUIRE(message->reply_to.size() == 1);
    CHECK(message->reply_to[0].address == "desk@contoso.com");
    REQUIRE(message->to.size() == 2);
    CHECK(message->to[0].address == "bob@fabrikam.com");
    CHECK(message->to[0].display_name == "Bob");
    CHECK(message->to[1].address == "carol@example.net");
    REQUIRE(message->cc.size() == 1);
    CHECK(message->cc[0].address == "dan@fabrikam.com");
    REQUIRE(message->bcc.size() == 1);
    CHECK(message->bcc[0].address == "eve@fabrikam.com");

    // envelope sender as the source: rewritten as well
    options.sender_source = SenderSource::envelope;
    message = convert_message(source, envelope, options);
    REQUIRE(message.ok());
    CHECK(message->sender_address == "scanner@contoso.com");
}

TEST_CASE("Graph MIME: sender and recipient domains rewritten in the fields, Bcc, recipients") {
    graph::GraphMimeOptions options;
    options.rewrite.sender.entries = {{"contoso.local", "contoso.com"}};
    options.rewrite.recipient.entries = {{"fabrikam.local", "fabrikam.com"}};
    const std::string source = crlf(
        "From: Scanner <scanner@contoso.local>\nReply-To: desk@contoso.local\n"
        "To: Bob <bob@fabrikam.local>, carol@example.net\nSubject: scan\n"
        "X-Other: keep@contoso.local\n\nbody bob@fabrikam.local\n");
    auto prepared = graph::prepare_graph_mime(
        source, {"<bob@fabrikam.local>", "carol@example.net", "eve@fabrikam.local"}, options);
    REQUIRE_MESSAGE(prepared.ok(), prepared.error().to_string());
    const std::string& mime = prepared->mime;
    CHECK(has(mime, "From: Scanner <scanner@contoso.com>\r\n"));
    CHECK(has(mime, "Reply-To: desk@contoso.com\r\n"));
    CHECK(has(mime, "To: Bob <bob@fabrikam.com>, carol@example.net\r\n"));
    CHECK(has(mime, "Bcc: eve@fabrikam.com\r\n"));
    CHECK(has(mime, "X-Other: keep@contoso.local\r\n"));      // not an address field
    CHECK(has(mime, "\r\n\r\nbody bob@fabrikam.local\r\n"));  // the body is never touched
    CHECK(prepared->recipients() ==
          std::vector<std::string>{"bob@fabrikam.com", "carol@example.net", "eve@fabrikam.com"});

    // Without maps the fields keep their bytes.
    auto plain = graph::prepare_graph_mime(source, {"bob@fabrikam.local"}, {});
    REQUIRE(plain.ok());
    CHECK(has(plain->mime, "From: Scanner <scanner@contoso.local>\r\n"));
}
