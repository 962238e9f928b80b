// Fuzz target for the configuration loader: the input is the TOML file. It sits next to
// the fixture tables, so seeds can refer to real tables ("cidr:tables/devices.cidr");
// references to missing files just fail to load. A configuration that loads is used:
// header-checks are rendered and a few transactions classified, logged and reported.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fixture.hpp"
#include "fuzz_util.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/verdict.hpp"

namespace paasmilter::fuzz {
namespace {

struct Fixture {
    TempDir dir;
    std::string config_path = (dir.path() / "paas-milter.toml").string();

    Fixture() { write_fixture_tables(dir); }
};

const Fixture& fixture() {
    static const Fixture instance;
    return instance;
}

const std::vector<Transaction>& transactions() {
    static const std::vector<Transaction> list = [] {
        std::vector<Transaction> out(4);
        out[0].client_addr = "192.0.2.7";
        out[0].sender = "scan@contoso.com";
        out[0].recipients = {"a@example.net"};
        out[1].client_addr = "2001:db8::1";
        out[1].client_name = "printer.contoso.test";
        out[1].cert_subject = "/C=US/O=Contoso/CN=scanner-4.contoso.test";
        out[1].cert_issuer = "Contoso Device CA";
        out[1].auth_user = "erp-batch";
        out[1].recipients = {"postmaster@contoso.test", "x@corp.contoso.test"};
        out[1].headers = {{"Subject", "[ALERT] disk"}, {"X-PaaS-Route", "forged"}};
        out[2].client_addr = "172.16.5.1";
        out[2].cert_fingerprint = "de:ad:be:ef";
        out[2].headers = {{"X-Mailer", "OldScan Firmware 1.2"}};
        // out[3]: a unix-socket client with nothing known.
        return out;
    }();
    return list;
}

}  // namespace
}  // namespace paasmilter::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace paasmilter;
    using namespace paasmilter::fuzz;
    const Fixture& f = fixture();
    f.dir.write("paas-milter.toml", std::string(as_text(data, size)));
    auto config = load_config(f.config_path);
    if (!config) {
        check(!config.error().message.empty(), "a configuration error without a message");
        return 0;
    }
    const Config& c = **config;
    check(!render_header_checks(c).empty(), "empty header-checks output");
    for (const Transaction& tx : transactions()) {
        const Decision decision = classify(c, tx);
        // The loader promises that a matching rule always yields a route.
        check(!decision.rule || decision.route, "a rule matched but no route was chosen");
        const Verdict verdict = decide_verdict(c, decision, 0);
        check(!format_decision_log(tx, decision, verdict).empty(), "empty decision log line");
        check(!format_query_report(decision, verdict, tx).empty(), "empty query report");
    }
    return 0;
}
