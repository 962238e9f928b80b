#include <doctest/doctest.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <string>

#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/drain.hpp"
#include "paasmilter/services.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::TempDir;

namespace {

const std::string kMinimal = R"(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.acs]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"

[routes.block]
action = "reject"

[[rules]]
name = "printers"
client_addr = ["192.0.2.0/24"]
route = "acs"
)";

// Loads `text` as paas-milter.toml and returns the error text ("" when it loaded).
std::string load_error(const std::string& text, TempDir& dir) {
    auto config = load_config(dir.write("paas-milter.toml", text));
    return config ? std::string() : config.error().to_string();
}

std::string replace(std::string text, const std::string& from, const std::string& to) {
    auto pos = text.find(from);
    REQUIRE(pos != std::string::npos);
    return text.replace(pos, from.size(), to);
}

}  // namespace

TEST_CASE("a minimal configuration loads with defaults") {
    TempDir dir;
    auto config = load_config(dir.write("paas-milter.toml", kMinimal));
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    const Config& c = **config;
    CHECK(c.socket == "inet:10025@127.0.0.1");
    CHECK(c.routing_header == "X-PaaS-Route");
    CHECK(c.mode == Mode::enforce);
    CHECK(c.default_route.empty());
    REQUIRE(c.find_route("acs"));
    CHECK(c.find_route("acs")->action == Action::relay);
    CHECK(c.find_route("acs")->header_value == "acs");
    REQUIRE(c.find_route("block"));
    CHECK(c.find_route("block")->reply_code == 550);
    CHECK(c.find_route("block")->reply_status == "5.7.1");
    CHECK(c.find_route("block")->reply_text == "Message rejected by policy");
    REQUIRE(c.rules.size() == 1);
    CHECK(c.rules[0].name == "printers");
    CHECK(c.rules[0].conditions.size() == 1);
}

TEST_CASE("the state directory: configured, else systemd's, else /var/lib/paas-milter") {
    TempDir dir;
    auto config = load_config(dir.write("paas-milter.toml", kMinimal));
    REQUIRE(config.ok());
    CHECK_FALSE((*config)->has_api_routes());
    CHECK(state_directory_of(**config, nullptr) == "/var/lib/paas-milter");
    CHECK(state_directory_of(**config, "") == "/var/lib/paas-milter");
    CHECK(state_directory_of(**config, "/var/lib/paas-milter:/var/lib/other") ==
          "/var/lib/paas-milter");
    CHECK(state_directory_of(**config, "relative") == "/var/lib/paas-milter");
    auto configured = load_config(
        dir.write("paas-milter.toml",
                  replace(kMinimal, "socket = ", "state_directory = \"/srv/paas\"\nsocket = ")));
    REQUIRE(configured.ok());
    CHECK(state_directory_of(**configured, "/run/elsewhere") == "/srv/paas");
    CHECK(load_error(replace(kMinimal, "socket = ", "state_directory = \"var/x\"\nsocket = "), dir)
              .find("paas-milter.toml:3: milter.state_directory: \"var/x\" is not an "
                    "absolute path") != std::string::npos);
}

TEST_CASE("[metrics] listen: a loopback HOST:PORT, others warned about, bad ones refused") {
    TempDir dir;
    auto with = [&](const std::string& listen) {
        return load_config(
            dir.write("paas-milter.toml", kMinimal + "\n[metrics]\nlisten = \"" + listen + "\"\n"));
    };
    auto plain = load_config(dir.write("paas-milter.toml", kMinimal));
    REQUIRE(plain.ok());
    CHECK((*plain)->metrics_listen.empty());
    for (const char* good : {"127.0.0.1:9940", "[::1]:9940", "localhost:9940"}) {
        CAPTURE(good);
        auto config = with(good);
        REQUIRE(config.ok());
        CHECK((*config)->metrics_listen == good);
        CHECK((*config)->warnings.empty());
    }
    auto open = with("0.0.0.0:9940");
    REQUIRE(open.ok());
    REQUIRE((*open)->warnings.size() == 1);
    CHECK((*open)->warnings[0].find("metrics.listen: \"0.0.0.0:9940\" is not a loopback address") !=
          std::string::npos);
    const std::pair<const char*, const char*> bad[] = {
        {"9940", "is not \"HOST:PORT\""},
        {"127.0.0.1:http", "has no valid port"},
        {"127.0.0.1:70000", "has no valid port"},
        {"::1:9940", "has no IPv4 address"},
        {"[127.0.0.1]:9940", "has no valid IPv6 address"},
        {"metrics.example:9940", "has no IPv4 address"},
    };
    for (const auto& [listen, why] : bad) {
        CAPTURE(listen);
        auto config = with(listen);
        REQUIRE_FALSE(config.ok());
        CHECK(config.error().to_string().find(why) != std::string::npos);
        CHECK(config.error().to_string().find("paas-milter.toml:18: metrics.listen") !=
              std::string::npos);
    }
    CHECK(load_error(kMinimal + "\n[metrics]\nport = 9940\n", dir).find("unknown key") !=
          std::string::npos);
}

TEST_CASE("the shipped example configuration is valid") {
    auto config = load_config(PAAS_SOURCE_DIR "/etc/paas-milter.toml");
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    CHECK((*config)->rules.size() >= 3);
}

TEST_CASE("configuration errors name the file, the line and the key") {
    TempDir dir;
    std::string path = (dir.path() / "paas-milter.toml").string();

    SUBCASE("unknown key in [milter]") {
        auto text = replace(kMinimal, "socket = ", "sockett = \"x\"\nsocket = ");
        CHECK(load_error(text, dir) == path + ":3: unknown key \"milter.sockett\"");
    }
    SUBCASE("unknown top-level table") {
        CHECK(load_error(kMinimal + "[extra]\nx = 1\n", dir).find(":16: unknown key \"extra\"") !=
              std::string::npos);
    }
    SUBCASE("wrong type") {
        auto text = replace(kMinimal, "\"inet:10025@127.0.0.1\"", "10025");
        CHECK(load_error(text, dir) == path + ":3: milter.socket: expected a string");
    }
    SUBCASE("Postfix socket syntax is caught") {
        auto text = replace(kMinimal, "inet:10025@127.0.0.1", "inet:127.0.0.1:10025");
        CHECK(load_error(text, dir).find(":3: milter.socket: \"inet:127.0.0.1:10025\" looks like "
                                         "Postfix syntax") != std::string::npos);
    }
    SUBCASE("missing [milter]") {
        auto text = replace(kMinimal, "[milter]\nsocket = \"inet:10025@127.0.0.1\"\n", "");
        CHECK(load_error(text, dir) == path + ": missing table [milter]");
    }
    SUBCASE("missing socket") {
        auto text = replace(kMinimal, "socket = \"inet:10025@127.0.0.1\"\n", "");
        CHECK(load_error(text, dir) == path + ":2: milter: missing key \"socket\"");
    }
    SUBCASE("bad mode") {
        auto text = replace(kMinimal, "socket = ", "mode = \"on\"\nsocket = ");
        CHECK(load_error(text, dir) ==
              path + ":3: milter.mode: \"on\" is not \"enforce\" or \"dry-run\"");
    }
    SUBCASE("rule names an unknown route") {
        auto text = replace(kMinimal, "route = \"acs\"", "route = \"acs2\"");
        CHECK(load_error(text, dir) ==
              path + ":15: rules[1] (\"printers\").route: unknown route \"acs2\"");
    }
    SUBCASE("unknown action") {
        auto text = replace(kMinimal, "action = \"reject\"", "action = \"drop\"");
        CHECK(load_error(text, dir).find(":10: routes.block.action: \"drop\" is not one of") !=
              std::string::npos);
    }
    SUBCASE("reply code of the wrong class") {
        auto text =
            replace(kMinimal, "action = \"reject\"", "action = \"reject\"\nreply_code = 450");
        CHECK(load_error(text, dir) ==
              path + ":11: routes.block.reply_code: 450 is not a 5xx code");
    }
    SUBCASE("reply keys on a relay route") {
        auto text =
            replace(kMinimal, "action = \"relay\"", "action = \"relay\"\nreply_text = \"x\"");
        CHECK(load_error(text, dir).find(":7: routes.acs.reply_text: only valid with action") !=
              std::string::npos);
    }
    SUBCASE("unknown rule key") {
        auto text = replace(kMinimal, "name = \"printers\"", "name = \"printers\"\nclient_ip = []");
        CHECK(load_error(text, dir) == path + ":14: rules[1]: unknown key \"client_ip\"");
    }
    SUBCASE("a rule without conditions") {
        auto text = replace(kMinimal, "client_addr = [\"192.0.2.0/24\"]\n", "");
        CHECK(load_error(text, dir).find("a rule needs at least one condition") !=
              std::string::npos);
    }
    SUBCASE("bad CIDR inline") {
        auto text = replace(kMinimal, "192.0.2.0/24", "192.0.2.0/33");
        auto error = load_error(text, dir);
        CHECK(error.find(path + ":14:") == 0);
    }
    SUBCASE("a table that does not exist") {
        auto text = replace(kMinimal, "192.0.2.0/24", "cidr:missing.cidr");
        auto error = load_error(text, dir);
        CHECK(error.find(path + ":14: rules[1] (\"printers\").client_addr: ") == 0);
        CHECK(error.find("missing.cidr") != std::string::npos);
    }
    SUBCASE("a table result that is not a route is an error at the table line") {
        std::string table =
            dir.write("devices.cidr", "# devices\n10.0.0.0/8 acs\n10.1.0.0/16 acz\n");
        auto text = replace(kMinimal, "192.0.2.0/24", "cidr:devices.cidr");
        CHECK(load_error(text, dir) ==
              table + ":3: result \"acz\" is not a route name, OK or DUNNO");
    }
    SUBCASE("duplicate rule names") {
        CHECK(load_error(kMinimal + "[[rules]]\nname = \"printers\"\nsender = [\"x\"]\nroute = "
                                    "\"acs\"\n",
                         dir)
                  .find("duplicate rule name \"printers\"") != std::string::npos);
    }
    SUBCASE("TOML syntax error") {
        CHECK(load_error(kMinimal + "[[rules]\n", dir).find(path + ":16:") == 0);
    }
    SUBCASE("invalid routing header name") {
        auto text = replace(kMinimal, "socket = ", "routing_header = \"X Route\"\nsocket = ");
        CHECK(load_error(text, dir).find(":3: milter.routing_header") != std::string::npos);
    }
    SUBCASE("default_route must exist") {
        auto text = replace(kMinimal, "socket = ", "default_route = \"nowhere\"\nsocket = ");
        CHECK(load_error(text, dir) ==
              path + ":3: milter.default_route: unknown route \"nowhere\"");
    }
    SUBCASE("route names OK and DUNNO are reserved") {
        auto text = replace(kMinimal, "[routes.block]", "[routes.DUNNO]");
        CHECK(load_error(text, dir).find("routes.DUNNO: a route name is") != std::string::npos);
    }
}

TEST_CASE("a rule may take its route from the table") {
    TempDir dir;
    dir.write("certs.regexp", "/^printer-/ acs\n/^blocked-/ block\n/^other/ DUNNO\n");
    auto text = replace(kMinimal, "client_addr = [\"192.0.2.0/24\"]\nroute = \"acs\"",
                        "cert_subject = [\"regexp:certs.regexp\"]");
    auto config = load_config(dir.write("paas-milter.toml", text));
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    CHECK((*config)->rules[0].conditions[0].always_names_route);

    SUBCASE("but not when a result is OK") {
        dir.write("certs.regexp", "/^printer-/ OK\n");
        auto error = load_error(text, dir);
        CHECK(error.find("certs.regexp:1: result OK needs a \"route\"") != std::string::npos);
    }
}

TEST_CASE("header-checks output maps each relay route to its transport") {
    TempDir dir;
    auto config = load_config(dir.write("paas-milter.toml", kMinimal));
    REQUIRE(config.ok());
    std::string out = render_header_checks(**config);
    CHECK(out.find("/^X-PaaS-Route:\\s*acs$/ FILTER acs-relay:[smtp.azurecomm.net]:587\n") !=
          std::string::npos);
    CHECK(out.find("block") == std::string::npos);
}

namespace {

const std::string kApiRoutes = R"(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.acs-smtp]
action = "relay"

[routes.acs-api]
action = "api"
connection_string_file = "secrets/acs.conn"
sender = "DoNotReply@contoso.azurecomm.net"
verified_domains = ["contoso.com"]
local_domains = ["contoso.test"]
on_failure = "relay:acs-smtp"
on_permanent_failure = "hold"
time_budget = 90
)";

}  // namespace

TEST_CASE("api routes") {
    TempDir dir;
    dir.write("secrets/acs.conn",
              "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
    std::string path = (dir.path() / "paas-milter.toml").string();

    SUBCASE("a complete access-key route") {
        auto config = load_config(dir.write("paas-milter.toml", kApiRoutes));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const Route* route = (*config)->find_route("acs-api");
        REQUIRE(route);
        REQUIRE(route->api);
        const ApiSettings& api = *route->api;
        CHECK(route->action == Action::api);
        CHECK(api.endpoint == "https://contoso.communication.azure.com");
        CHECK(api.access_key == "c2VjcmV0");
        CHECK_FALSE(api.entra);
        CHECK(api.api_version == "2023-03-31");
        CHECK_FALSE(api.inline_attachments);
        CHECK(api.conversion.sender == "DoNotReply@contoso.azurecomm.net");
        CHECK(api.conversion.verified_domains == std::vector<std::string>{"contoso.com"});
        CHECK(api.local_domains == std::vector<std::string>{"contoso.test"});
        CHECK(to_string(api.on_failure) == "relay:acs-smtp");
        CHECK(to_string(api.on_permanent_failure) == "hold");
        CHECK(to_string(api.on_oversize) == "reject");
        CHECK(api.time_budget == std::chrono::seconds(90));
        CHECK_FALSE(api.http);  // built only with a ServiceRegistry (the daemon)
    }
    SUBCASE("api-version 2025-09-01 turns on inline attachments") {
        auto text = replace(kApiRoutes, "time_budget = 90", "api_version = \"2025-09-01\"");
        auto config = load_config(dir.write("paas-milter.toml", text));
        REQUIRE(config.ok());
        CHECK((*config)->find_route("acs-api")->api->inline_attachments);
    }
    SUBCASE("Entra ID client credentials") {
        dir.write("secrets/entra.secret", "s3cret\n");
        auto text = replace(kApiRoutes, "connection_string_file = \"secrets/acs.conn\"",
                            "endpoint = \"https://contoso.communication.azure.com\"\n"
                            "tenant_id = \"t\"\nclient_id = \"c\"\n"
                            "client_secret_file = \"secrets/entra.secret\"");
        auto config = load_config(dir.write("paas-milter.toml", text));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const auto& entra = (*config)->find_route("acs-api")->api->entra_credentials;
        REQUIRE(entra.has_value());
        CHECK(entra->tenant_id == "t");
        CHECK(entra->client_secret == "s3cret");
    }
    SUBCASE("errors") {
        CHECK(load_error(replace(kApiRoutes, "on_failure = \"relay:acs-smtp\"",
                                 "on_failure = \"relay:acs-api\""),
                         dir)
                  .find("fallback \"relay:acs-api\" does not name a route with action = "
                        "\"relay\"") != std::string::npos);
        CHECK(load_error(
                  replace(kApiRoutes, "on_failure = \"relay:acs-smtp\"", "on_failure = \"bounce\""),
                  dir) == path +
                              ":14: routes.acs-api.on_failure: \"bounce\" is not "
                              "tempfail, hold, reject or relay:ROUTE");
        CHECK(load_error(replace(kApiRoutes, "sender = ", "sendr = \"x\"\nsender = "), dir) ==
              path + ":11: unknown key \"routes.acs-api.sendr\"");
        CHECK(load_error(replace(kApiRoutes, "secrets/acs.conn", "secrets/missing"), dir)
                  .find(path + ":10: routes.acs-api.connection_string_file: cannot read ") == 0);
        CHECK(load_error(replace(kApiRoutes, "time_budget = 90", "time_budget = 400"), dir) ==
              path + ":16: routes.acs-api.time_budget: 400 is not between 5 and 280");
        CHECK(load_error(
                  replace(kApiRoutes, "action = \"relay\"", "action = \"relay\"\nsender = \"a@b\""),
                  dir) == path +
                              ":7: routes.acs-smtp.sender: only valid with action = "
                              "\"api\"");
        dir.write("secrets/acs.conn", "endpoint=https://x;accesskey=not base64!");
        std::string error = load_error(kApiRoutes, dir);
        CHECK(error.find(path + ":10: routes.acs-api.connection_string_file:") == 0);
        CHECK(error.find("not base64") == std::string::npos);  // never echo the secret
    }
}

TEST_CASE("warnings: a milter socket that other hosts can reach") {
    TempDir dir;
    const std::string path = (dir.path() / "paas-milter.toml").string();
    auto warnings_for = [&](const std::string& socket) {
        auto config = load_config(
            dir.write("paas-milter.toml", replace(kMinimal, "inet:10025@127.0.0.1", socket)));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        return (*config)->warnings;
    };
    for (const std::string socket :
         {"inet:10025@127.0.0.1", "inet:10025@127.0.0.53", "inet:10025@localhost",
          "inet6:10025@::1", "unix:/var/spool/postfix/paas-milter/milter.sock",
          "local:/run/paas-milter.sock"}) {
        INFO(socket);
        CHECK(warnings_for(socket).empty());
    }
    for (const std::string socket : {"inet:10025", "inet6:10025"}) {
        INFO(socket);
        auto warnings = warnings_for(socket);
        REQUIRE(warnings.size() == 1);
        CHECK(warnings[0].find(path + ":3: milter.socket: \"" + socket + "\"") == 0);
        CHECK(warnings[0].find("every interface") != std::string::npos);
    }
    for (const std::string socket : {"inet:10025@0.0.0.0", "inet6:10025@::",
                                     "inet:10025@192.0.2.10", "inet:10025@mail.example.com"}) {
        INFO(socket);
        auto warnings = warnings_for(socket);
        REQUIRE(warnings.size() == 1);
        CHECK(warnings[0].find(path + ":3: milter.socket: \"" + socket + "\"") == 0);
        CHECK(warnings[0].find("not a loopback address") != std::string::npos);
    }
}

TEST_CASE("warnings: secret files readable by group or others") {
    TempDir dir;
    const std::string path = (dir.path() / "paas-milter.toml").string();
    const std::string secret =
        dir.write("secrets/acs.conn",
                  "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
    auto warnings_for = [&](const std::string& text) {
        auto config = load_config(dir.write("paas-milter.toml", text));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        return (*config)->warnings;
    };

    REQUIRE(::chmod(secret.c_str(), 0600) == 0);
    CHECK(warnings_for(kApiRoutes).empty());

    REQUIRE(::chmod(secret.c_str(), 0644) == 0);
    auto warnings = warnings_for(kApiRoutes);
    REQUIRE(warnings.size() == 1);
    CHECK(warnings[0].find(path + ":10: routes.acs-api.connection_string_file: " + secret) == 0);
    CHECK(warnings[0].find("mode 0644") != std::string::npos);
    CHECK(warnings[0].find("c2VjcmV0") == std::string::npos);  // never the content

    REQUIRE(::chmod(secret.c_str(), 0640) == 0);
    warnings = warnings_for(kApiRoutes);
    REQUIRE(warnings.size() == 1);
    CHECK(warnings[0].find("mode 0640") != std::string::npos);

    // Entra ID: the client secret file and the certificate file (it holds the private key).
    const std::string client_secret = dir.write("secrets/entra.secret", "s3cret\n");
    const std::string certificate = dir.write("secrets/app.pem", "-----BEGIN...\n");
    REQUIRE(::chmod(client_secret.c_str(), 0604) == 0);
    REQUIRE(::chmod(certificate.c_str(), 0600) == 0);
    const std::string entra_key =
        "tenant_id = \"t\"\nclient_id = \"c\"\n"
        "endpoint = \"https://contoso.communication.azure.com\"\n";
    warnings = warnings_for(replace(kApiRoutes, "connection_string_file = \"secrets/acs.conn\"",
                                    entra_key + "client_secret_file = \"secrets/entra.secret\""));
    REQUIRE(warnings.size() == 1);
    CHECK(warnings[0].find("routes.acs-api.client_secret_file: " + client_secret) !=
          std::string::npos);
    CHECK(warnings[0].find("mode 0604") != std::string::npos);
    CHECK(warnings[0].find("s3cret") == std::string::npos);

    const std::string with_certificate =
        replace(kApiRoutes, "connection_string_file = \"secrets/acs.conn\"",
                entra_key + "client_certificate_file = \"secrets/app.pem\"");
    CHECK(warnings_for(with_certificate).empty());
    REQUIRE(::chmod(certificate.c_str(), 0644) == 0);
    warnings = warnings_for(with_certificate);
    REQUIRE(warnings.size() == 1);
    CHECK(warnings[0].find("routes.acs-api.client_certificate_file: " + certificate) !=
          std::string::npos);
    CHECK(warnings[0].find("mode 0644") != std::string::npos);
}

TEST_CASE("drain time: the longest API time budget plus a margin, at least 30 s") {
    TempDir dir;
    auto drain_for = [&](const std::string& text) {
        auto config = load_config(dir.write("paas-milter.toml", text));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        return drain_time(**config);
    };
    dir.write("secrets/acs.conn",
              "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
    CHECK(drain_for(kMinimal) == std::chrono::seconds(30));
    CHECK(drain_for(replace(kApiRoutes, "time_budget = 90", "time_budget = 10")) ==
          std::chrono::seconds(30));
    CHECK(drain_for(kApiRoutes) == std::chrono::seconds(95));
    // Two API routes: the longer budget counts.
    const std::string second = R"(
[routes.acs-api-2]
action = "api"
connection_string_file = "secrets/acs.conn"
sender = "DoNotReply@contoso.azurecomm.net"
time_budget = 200
)";
    CHECK(drain_for(kApiRoutes + second) == std::chrono::seconds(205));
}

TEST_CASE("services: none for check and query; a reload keeps those whose settings are unchanged") {
    TempDir dir;
    dir.write("acs.conn", "endpoint=https://acs.example.test;accesskey=c2VjcmV0\n");
    std::filesystem::permissions(dir.path() / "acs.conn", std::filesystem::perms::owner_read |
                                                              std::filesystem::perms::owner_write);
    auto config_with = [&](const std::string& extra) {
        return dir.write("paas-milter.toml", std::string(R"(
[milter]
socket = "inet:12345@127.0.0.1"

[routes.acs]
action = "api"
connection_string_file = "acs.conn"
sender = "DoNotReply@contoso.test"
)") + extra);
    };
    auto api_of = [](const Config& config) { return config.routes.at("acs").api; };

    auto plain = load_config(config_with(""));
    REQUIRE(plain.ok());
    CHECK(api_of(**plain)->http == nullptr);  // check/query: no network machinery

    ServiceRegistry registry;
    auto first = load_config(config_with(""), &registry);
    auto second = load_config(config_with(""), &registry);
    REQUIRE((first.ok() && second.ok()));
    REQUIRE(api_of(**first)->http != nullptr);
    CHECK(api_of(**first)->http == api_of(**second)->http);  // the pool survives a reload
    auto changed = load_config(config_with("max_concurrency = 3\n"), &registry);
    REQUIRE(changed.ok());
    CHECK(api_of(**changed)->http != api_of(**first)->http);
    CHECK(api_of(**changed)->http_options.max_concurrency == 3);
}

TEST_CASE("services: the Entra token cache survives a reload with the same credentials") {
    TempDir dir;
    dir.write("secret", "s3cret\n");
    std::filesystem::permissions(dir.path() / "secret", std::filesystem::perms::owner_read |
                                                            std::filesystem::perms::owner_write);
    auto config_with = [&](const std::string& client) {
        return dir.write("paas-milter.toml", R"(
[milter]
socket = "inet:12345@127.0.0.1"

[routes.acs]
action = "api"
endpoint = "https://acs.example.test"
tenant_id = "t"
client_id = ")" + client + R"("
client_secret_file = "secret"
sender = "DoNotReply@contoso.test"
)");
    };
    ServiceRegistry registry;
    auto first = load_config(config_with("app-1"), &registry);
    auto again = load_config(config_with("app-1"), &registry);
    auto other = load_config(config_with("app-2"), &registry);
    REQUIRE((first.ok() && again.ok() && other.ok()));
    const auto& a = (*first)->routes.at("acs").api;
    REQUIRE(a->entra != nullptr);
    CHECK(a->entra == (*again)->routes.at("acs").api->entra);
    CHECK(a->entra != (*other)->routes.at("acs").api->entra);
    CHECK(load_config(config_with("app-1")).value()->routes.at("acs").api->entra == nullptr);
}

TEST_CASE("graph routes") {
    TempDir dir;
    dir.write("secrets/graph.secret", "s3cret\n");
    const std::string graph = R"(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.exo-smtp]
action = "relay"

[routes.graph]
action = "api"
provider = "graph"
tenant_id = "contoso.onmicrosoft.com"
client_id = "c"
client_secret_file = "secrets/graph.secret"
mailbox = "scanner@contoso.com"
on_failure = "relay:exo-smtp"
on_ambiguous = "hold"
)";
    std::string path = (dir.path() / "paas-milter.toml").string();

    SUBCASE("a complete route") {
        auto config = load_config(dir.write("paas-milter.toml", graph));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const ApiSettings& api = *(*config)->find_route("graph")->api;
        CHECK(api.provider == ApiSettings::Provider::graph);
        CHECK(api.graph.mailbox == "scanner@contoso.com");
        CHECK(api.graph.endpoint == "https://graph.microsoft.com");
        CHECK_FALSE(api.graph.sent_items_check);
        CHECK(api.graph.mailbox_concurrency == 4);
        CHECK_FALSE(api.graph.upload_sessions);
        CHECK(api.graph.max_message_bytes == 35'000'000);
        CHECK(api.on_ambiguous == AmbiguityPolicy::hold);
        CHECK(api.max_request_bytes == 4'000'000);
        REQUIRE(api.entra_credentials);
        CHECK(api.entra_credentials->scope == "https://graph.microsoft.com/.default");
        CHECK(api.entra_credentials->assertion_algorithm == ClientAssertionAlgorithm::ps256);
    }
    SUBCASE("a national cloud: the token is for its Graph") {
        auto config = load_config(
            dir.write("paas-milter.toml",
                      replace(graph, "on_ambiguous = \"hold\"",
                              "graph_endpoint = \"https://graph.microsoft.us/\"\n"
                              "authority = \"https://login.microsoftonline.us\"\n"
                              "assertion_algorithm = \"RS256\"\nsent_items_check = true")));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const ApiSettings& api = *(*config)->find_route("graph")->api;
        CHECK(api.graph.endpoint == "https://graph.microsoft.us");
        CHECK(api.graph.sent_items_check);
        CHECK(api.entra_credentials->scope == "https://graph.microsoft.us/.default");
        CHECK(api.entra_credentials->assertion_algorithm == ClientAssertionAlgorithm::rs256);
    }
    SUBCASE("upload sessions for large messages, up to max_message_bytes") {
        auto config = load_config(dir.write(
            "paas-milter.toml", replace(graph, "on_ambiguous = \"hold\"",
                                        "upload_sessions = true\nmax_message_bytes = 150000000")));
        REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
        const ApiSettings& api = *(*config)->find_route("graph")->api;
        CHECK(api.graph.upload_sessions);
        CHECK(api.graph.max_message_bytes == 150'000'000);
    }
    SUBCASE("errors") {
        CHECK(load_error(replace(graph, "mailbox = \"scanner@contoso.com\"\n", ""), dir)
                  .find("routes.graph: missing key \"mailbox\"") != std::string::npos);
        CHECK(load_error(replace(graph, "mailbox = ", "sender = \"a@b.c\"\nmailbox = "), dir)
                  .find(path + ":14: routes.graph.sender: not a key of provider = \"graph\"") == 0);
        CHECK(load_error(replace(graph, "tenant_id = \"contoso.onmicrosoft.com\"\n", ""), dir)
                  .find("provider = \"graph\" needs tenant_id and client_id") != std::string::npos);
        CHECK(load_error(replace(graph, "\"hold\"", "\"retry\""), dir)
                  .find("routes.graph.on_ambiguous: \"retry\" is not tempfail, hold or "
                        "assume-sent") != std::string::npos);
        CHECK(load_error(replace(graph, "provider = \"graph\"", "provider = \"ses\""), dir)
                  .find("\"ses\" is not \"acs\" or \"graph\"") != std::string::npos);
        CHECK(
            load_error(replace(graph, "on_ambiguous", "mailbox_concurrency = 5\non_ambiguous"), dir)
                .find("mailbox_concurrency: 5 is not between 1 and 4") != std::string::npos);
        CHECK(load_error(
                  replace(graph, "on_ambiguous", "max_request_bytes = 5000000\non_ambiguous"), dir)
                  .find("max_request_bytes: 5000000 is not between 1000000 and 4000000") !=
              std::string::npos);
        CHECK(
            load_error(
                replace(graph, "on_ambiguous", "max_message_bytes = 150000001\non_ambiguous"), dir)
                .find("max_message_bytes: 150000001 is not between 1000000 and 150000000") !=
            std::string::npos);
        CHECK(load_error(replace(graph, "on_ambiguous", "upload_sessions = \"yes\"\non_ambiguous"),
                         dir)
                  .find("routes.graph.upload_sessions") != std::string::npos);
    }
    SUBCASE("an ACS route refuses Graph's keys") {
        dir.write("secrets/acs.conn",
                  "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
        CHECK(load_error(replace(kApiRoutes, "time_budget = 90", "mailbox = \"x@y.z\""), dir)
                  .find("routes.acs-api.mailbox: not a key of provider = \"acs\"") !=
              std::string::npos);
        CHECK(load_error(replace(kApiRoutes, "time_budget = 90", "upload_sessions = true"), dir)
                  .find("routes.acs-api.upload_sessions: not a key of provider = \"acs\"") !=
              std::string::npos);
    }
}

TEST_CASE("sender_map: who sends, by the client's identity") {
    TempDir dir;
    dir.write("secrets/graph.secret", "s3cret\n");
    dir.write("senders.cidr", "192.0.2.0/24 printers@contoso.com\n10.0.0.0/8 DUNNO\n");
    dir.write("senders-by-login", "erp erp-mailbox@contoso.com\n");
    dir.write("senders-by-cert", "scanner-1.contoso.com scanner@contoso.com\n");
    const std::string graph = R"(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.graph]
action = "api"
provider = "graph"
tenant_id = "t"
client_id = "c"
client_secret_file = "secrets/graph.secret"
mailbox = "noreply@contoso.com"

[routes.graph.sender_map]
client_addr = "cidr:senders.cidr"
auth = "texthash:senders-by-login"
cert_subject = "texthash:senders-by-cert"
unmapped = "refuse"
)";
    std::string path = (dir.path() / "paas-milter.toml").string();
    auto config = load_config(dir.write("paas-milter.toml", graph));
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    const ApiSettings& api = *(*config)->find_route("graph")->api;
    REQUIRE(api.sender_map);
    CHECK(api.sender_map->refuse_unmapped);

    Transaction tx;
    tx.client_addr = "192.0.2.7";
    auto by_address = map_sender(*api.sender_map, tx);
    REQUIRE(by_address);
    CHECK(by_address->address == "printers@contoso.com");
    CHECK(by_address->hit.field == Field::client_addr);
    // The strongest proof of identity wins: a certificate, then a SASL login.
    tx.auth_user = "erp";
    CHECK(map_sender(*api.sender_map, tx)->address == "erp-mailbox@contoso.com");
    tx.cert_subject = "scanner-1.contoso.com";
    CHECK(map_sender(*api.sender_map, tx)->address == "scanner@contoso.com");
    // DUNNO and unknown clients: no sender.
    Transaction stranger;
    stranger.client_addr = "10.1.2.3";
    CHECK_FALSE(map_sender(*api.sender_map, stranger));

    SUBCASE("a map by envelope sender is warned about: the client chooses it") {
        dir.write("by-sender", "printer@contoso.com printer@contoso.com\n");
        auto loaded = load_config(
            dir.write("paas-milter.toml",
                      replace(graph, "unmapped", "sender = \"texthash:by-sender\"\nunmapped")));
        REQUIRE(loaded.ok());
        const auto& warnings = (*loaded)->warnings;
        auto warned = std::find_if(warnings.begin(), warnings.end(), [](const std::string& w) {
            return w.find("sender_map.sender: the envelope sender is chosen by the client") !=
                   std::string::npos;
        });
        REQUIRE(warned != warnings.end());
        CHECK(warned->find("get past unmapped = \"refuse\"") != std::string::npos);
    }
    SUBCASE("errors name the file, the line and the key") {
        dir.write("bad.cidr", "192.0.2.0/24 has space@contoso.com extra\n");
        CHECK(load_error(replace(graph, "cidr:senders.cidr", "192.0.2.1"), dir)
                  .find(":14: routes.graph.sender_map.client_addr: expected a table") !=
              std::string::npos);
        CHECK(load_error(replace(graph, "\"refuse\"", "\"drop\""), dir)
                  .find("sender_map.unmapped: \"drop\" is not \"route\" or \"refuse\"") !=
              std::string::npos);
        CHECK(load_error(replace(graph, "unmapped", "recipient = \"cidr:x\"\nunmapped"), dir)
                  .find("unknown key \"routes.graph.sender_map.recipient\"") != std::string::npos);
        dir.write("acs.conn",
                  "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
        dir.write("no-address", "erp erp-mailbox\n");
        std::string acs = replace(
            replace(replace(graph, "provider = \"graph\"\n", ""),
                    "tenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = "
                    "\"secrets/graph.secret\"\nmailbox = \"noreply@contoso.com\"",
                    "connection_string_file = \"acs.conn\"\nsender = \"noreply@contoso.com\""),
            "texthash:senders-by-login", "texthash:no-address");
        CHECK(load_error(acs, dir).find("no-address:1: routes.graph.sender_map.auth: "
                                        "\"erp-mailbox\" is not a sender address") !=
              std::string::npos);
    }
}

TEST_CASE("secrets handed over by systemd's LoadCredential= ($CREDENTIALS_DIRECTORY)") {
    TempDir dir;
    TempDir credentials;
    credentials.write("acs.conn",
                      "endpoint=https://contoso.communication.azure.com/;accesskey=Y3JlZA==\n");
    const std::string text =
        replace(kApiRoutes, "connection_string_file = \"secrets/acs.conn\"",
                "connection_string_file = \"$CREDENTIALS_DIRECTORY/acs.conn\"");
    const char* saved = std::getenv("CREDENTIALS_DIRECTORY");
    const std::string saved_value = saved ? saved : "";
    ::setenv("CREDENTIALS_DIRECTORY", credentials.path().c_str(), 1);
    auto config = load_config(dir.write("paas-milter.toml", text));
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    CHECK((*config)->find_route("acs-api")->api->access_key == "Y3JlZA==");
    ::unsetenv("CREDENTIALS_DIRECTORY");
    CHECK(load_error(text, dir).find("names $CREDENTIALS_DIRECTORY, which is not set (systemd "
                                     "sets it for a unit with LoadCredential=)") !=
          std::string::npos);
    if (saved) ::setenv("CREDENTIALS_DIRECTORY", saved_value.c_str(), 1);
}
