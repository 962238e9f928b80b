// Fuzz target for classification, verdicts and their log lines, on the fixed fixture
// configuration. The input is one transaction, in fields read by InputReader (each ends at
// a backslash followed by a byte other than a backslash):
//   client_addr, client_name, cert_subject, cert_issuer, cert_fingerprint, auth, sender,
//   recipients (one field, split at ','), then until the input ends: header name, header
//   value, one byte — 0xF0..0xFF repeats the value 2^(4 + low nibble) times, for huge
//   headers. Repeated bytes are capped at 128 KiB per transaction (Postfix's own
//   header_size_limit is 100 KiB): a larger cap only slows fuzzing down.
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "fixture.hpp"
#include "fuzz_util.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/verdict.hpp"

namespace paasmilter::fuzz {
namespace {

constexpr std::size_t kMaxHeaders = 64;
constexpr std::size_t kMaxRepeatedBytes = std::size_t{128} << 10;

const Config& config() {
    static const std::shared_ptr<const Config> loaded = [] {
        TempDir dir;  // tables are read at load time; the directory can go afterwards
        write_fixture_tables(dir);
        auto result = load_config(dir.write("paas-milter.toml", std::string(kFixtureConfig)));
        if (!result) {
            std::fprintf(stderr, "fixture configuration: %s\n", result.error().to_string().c_str());
            std::abort();
        }
        return *result;
    }();
    return *loaded;
}

// `budget`: repeated bytes still allowed in this transaction.
std::string repeated(const std::string& value, std::uint8_t control, std::size_t& budget) {
    if (control < 0xF0 || value.empty() || value.size() > budget) return value;
    const std::size_t times =
        std::min(std::size_t{1} << (4 + (control & 0x0F)), budget / value.size());
    budget -= times * value.size();
    std::string out;
    out.reserve(value.size() * times);
    for (std::size_t i = 0; i < times; ++i) out += value;
    return out;
}

bool same_header_name(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return std::tolower(static_cast<unsigned char>(x)) ==
                      std::tolower(static_cast<unsigned char>(y));
           });
}

Transaction transaction_from(InputReader& in) {
    Transaction tx;
    tx.client_addr = in.take_string();
    tx.client_name = in.take_string();
    tx.cert_subject = in.take_string();
    tx.cert_issuer = in.take_string();
    tx.cert_fingerprint = in.take_string();
    tx.auth_user = in.take_string();
    tx.sender = strip_angle_brackets(in.take_string());
    const std::string recipients = in.take_string();
    for (std::size_t start = 0; start < recipients.size();) {
        const std::size_t end = std::min(recipients.find(',', start), recipients.size());
        tx.recipients.push_back(strip_angle_brackets(recipients.substr(start, end - start)));
        start = end + 1;
    }
    std::size_t budget = kMaxRepeatedBytes;
    while (!in.empty() && tx.headers.size() < kMaxHeaders) {
        HeaderField header;
        header.name = in.take_string();
        const std::string value = in.take_string();
        header.value = repeated(value, in.take_byte(), budget);
        tx.headers.push_back(std::move(header));
    }
    return tx;
}

}  // namespace
}  // namespace paasmilter::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace paasmilter;
    using namespace paasmilter::fuzz;
    const Config& c = config();
    InputReader in(as_text(data, size));
    const Transaction tx = transaction_from(in);

    const Decision decision = classify(c, tx);
    check(!decision.rule || decision.route, "a rule matched but no route was chosen");
    check(!decision.default_route || (!decision.rule && decision.route),
          "default route reported for a matched rule");
    // Fixture has a default route: every transaction ends with one.
    check(decision.route != nullptr, "no route despite milter.default_route");
    for (const ConditionHit& hit : decision.hits) {
        check(!hit.source.empty() && !hit.where.empty(), "a hit without source or location");
    }

    const int forged = static_cast<int>(std::count_if(
        tx.headers.begin(), tx.headers.end(),
        [&](const HeaderField& h) { return same_header_name(h.name, c.routing_header); }));
    const Verdict verdict = decide_verdict(c, decision, forged);
    const std::string log_line = format_decision_log(tx, decision, verdict);
    // One log line: client-sent text must not be able to start a new one. The client
    // address comes from the MTA's socket, not the client, and is logged as is.
    constexpr std::string_view kLineBreaks("\n\r\0", 3);
    check(tx.client_addr.find_first_of(kLineBreaks) != std::string::npos ||
              log_line.find_first_of(kLineBreaks) == std::string::npos,
          "client text broke the decision log line");
    check(!format_query_report(decision, verdict, tx).empty(), "empty query report");
    return 0;
}
