// The classifier at scale (issue 10, target 2): a configuration an operator of a large site
// would write — ordered rules over a 100,000-entry cidr: table (IPv4 and IPv6), a
// 10,000-subject texthash: table of client certificates and a 1,000-regex pcre: table of
// header checks — measured on a fixed transaction mix:
//   1. classify() latency per transaction (p50, p99), one thread, steady state;
//   2. loading the configuration (load_config, as the daemon does) and reloading it while the
//      first snapshot is alive;
//   3. latency while another thread reloads, taking the snapshot per message as the daemon's
//      workers do (milter/config_snapshot.hpp), against the same loop without reloads;
// each against a baseline measured in the same run: a naive classifier that scans the same
// entries in file order (every cidr entry, every subject, every regex one by one), or for
// the reload figures the load without traffic and the traffic without reloads. Each
// transaction is copied just before it is classified, untimed (in the daemon the callbacks
// have just written what classify() reads); the tables are as warm as sharing them with
// 20,000 different transactions leaves them. Also printed: each big table alone against its
// naive scan, and what freeing a whole snapshot costs (in the daemon, whichever thread
// drops the last reference pays it).
//
// Prints human-readable lines, then one line per figure for tests/bench/run.sh:
//   RESULT <TAB> name <TAB> value <TAB> unit <TAB> baseline <TAB> ratio <TAB> target <TAB> met
// Nothing is asserted about time (not a meson test). It fails only when loading fails or when
// the classifier and the naive scan disagree on a transaction.
//
// `bench-classify-scale --profile SECONDS` loads the configuration and then only classifies,
// printing p50/p99 overall and by deciding rule: the run to give `perf record`.
#include <arpa/inet.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "config_snapshot.hpp"  // milter/: how the daemon publishes a reloaded configuration
#include "naive_cidr.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/regex.hpp"
#include "temp_dir.hpp"

namespace paasmilter::bench {
namespace {

constexpr int kCidrEntries = 100'000;
constexpr int kSubjects = 10'000;
constexpr int kHeaderRegexes = 1'000;
constexpr int kTransactions = 20'000;
constexpr int kCheckedTransactions = 2'000;  // naive classifier: slow, a sample suffices
constexpr int kReloads = 5;
constexpr std::uint32_t kSeed = 20261124;  // fixed: every run measures the same work
constexpr auto kSteadyDuration = std::chrono::seconds(2);
constexpr std::size_t kInFlight = 8;  // messages holding a snapshot at once (traffic thread)

using Clock = std::chrono::steady_clock;

// Results feed this so the optimiser cannot drop the work being timed.
std::atomic<std::size_t> g_sink{0};

double to_ms(Clock::duration d) {
    return std::chrono::duration<double, std::milli>(d).count();
}

// p in [0, 1] of a sample of latencies in ns (sorts a copy).
double percentile_us(std::vector<std::uint32_t> ns, double p) {
    if (ns.empty()) return 0;
    const auto k = static_cast<std::size_t>(p * static_cast<double>(ns.size() - 1));
    std::nth_element(ns.begin(), ns.begin() + static_cast<std::ptrdiff_t>(k), ns.end());
    return ns[k] / 1000.0;
}
double max_us(const std::vector<std::uint32_t>& ns) {
    return ns.empty() ? 0 : *std::max_element(ns.begin(), ns.end()) / 1000.0;
}
std::uint32_t elapsed_ns(Clock::time_point start, Clock::time_point end) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count();
    return static_cast<std::uint32_t>(std::min<long long>(ns, 0xffffffffLL));
}

// ---------------------------------------------------------------------------------------
// The tables, generated with their naive counterparts.

std::uint8_t random_byte(std::mt19937& rng) {
    return static_cast<std::uint8_t>(rng() & 0xff);
}

// A device inventory: 70 % IPv4 (mostly single hosts in 10/8, 172.16/12 and a few public
// /16s; some /24–/30 subnets), 30 % IPv6 under a few /48 sites of 2001:db8::/32 (/64 subnets,
// /128 hosts, some /56). 1 % DUNNO exceptions; the rest name one of three routes or say OK.
std::vector<CidrEntry> make_cidr_entries(std::mt19937& rng) {
    std::vector<CidrEntry> entries;
    entries.reserve(kCidrEntries);
    constexpr int kV4Prefixes[] = {32, 32, 32, 32, 32, 32, 30, 29, 28, 24};
    constexpr int kV6Prefixes[] = {128, 128, 128, 64, 64, 64, 56};
    constexpr std::array<std::uint8_t, 2> kPublicV4[] = {{198, 18}, {198, 19}, {203, 0}};
    constexpr const char* kResults[] = {"acs-smtp", "acs-smtp", "exchange-online", "graph", "OK"};
    for (int i = 0; i < kCidrEntries; ++i) {
        CidrEntry entry;
        if (rng() % 10 < 7) {
            entry.family = AF_INET;
            switch (rng() % 4) {
                case 0:
                case 1:
                    entry.bytes = {10, random_byte(rng), random_byte(rng), random_byte(rng)};
                    break;
                case 2:
                    entry.bytes = {172, static_cast<std::uint8_t>(16 + rng() % 16),
                                   random_byte(rng), random_byte(rng)};
                    break;
                default: {
                    const auto& net = kPublicV4[rng() % std::size(kPublicV4)];
                    entry.bytes = {net[0], net[1], random_byte(rng), random_byte(rng)};
                }
            }
            entry.prefix = kV4Prefixes[rng() % std::size(kV4Prefixes)];
        } else {
            entry.family = AF_INET6;
            entry.bytes = {0x20, 0x01, 0x0d, 0xb8, 0x00, static_cast<std::uint8_t>(rng() % 16)};
            for (int k = 6; k < 16; ++k) entry.bytes[k] = random_byte(rng);
            entry.prefix = kV6Prefixes[rng() % std::size(kV6Prefixes)];
        }
        clear_host_bits(entry.bytes, entry.prefix);
        entry.value = rng() % 100 == 0 ? "DUNNO" : kResults[rng() % std::size(kResults)];
        entries.push_back(std::move(entry));
    }
    return entries;
}

std::string cidr_file(const std::vector<CidrEntry>& entries) {
    std::string out = "# device inventory, generated\n";
    for (const CidrEntry& e : entries) {
        out += to_text(e.family, e.bytes) + "/" + std::to_string(e.prefix) + "\t" + e.value + "\n";
    }
    return out;
}

// Pronounceable made-up words, distinct for distinct n: product names, spam words, domains.
std::string word(std::uint32_t n) {
    constexpr const char* kSyllables[] = {"ba",  "ko",  "ri", "len", "tu", "mar", "zo",  "vex",
                                          "qui", "dra", "fo", "nel", "pa", "sim", "gor", "wy"};
    std::string out;
    do {
        out += kSyllables[n % 16];
        n /= 16;
    } while (n != 0);
    return out.size() < 5 ? out + "ex" : out;
}

struct Subject {
    std::string name;
    std::string value;
};

// Certificates of scanners and printers at 40 sites, listed in no particular order (a
// fixed permutation: std::shuffle differs between standard libraries).
std::vector<Subject> make_subjects() {
    std::vector<Subject> subjects;
    subjects.reserve(kSubjects);
    for (int k = 0; k < kSubjects; ++k) {
        const int i = static_cast<int>(static_cast<long>(k) * 7919 % kSubjects);
        const bool scanner = i % 3 != 0;
        subjects.push_back(Subject{
            fmt::format("{}-{:05}.site{}.contoso.test", scanner ? "scanner" : "printer", i, i % 40),
            scanner ? "exchange-online" : "acs-smtp"});
    }
    return subjects;
}

std::string subjects_file(const std::vector<Subject>& subjects) {
    std::string out = "# device certificates (CommonName as Postfix sends it), generated\n";
    for (const Subject& s : subjects) out += s.name + "\t" + s.value + "\n";
    return out;
}

std::string lowercase(std::string_view text) {
    std::string out(text);
    for (char& c : out) {
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    }
    return out;
}

const Subject* naive_subject_lookup(const std::vector<Subject>& subjects, const std::string& key) {
    const std::string folded = lowercase(key);
    for (const Subject& s : subjects) {
        if (s.name == folded) return &s;  // generated names are lowercase
    }
    return nullptr;
}

// header_checks(5)-style lines, grouped by header as operators keep them. Each entry knows
// how to build a header line it matches, so that transactions can hit any of them.
struct HeaderCheck {
    std::string pattern;  // "/.../" as written in the table
    std::string value;    // result
    std::string sample;   // a header line the pattern matches ("Name: value")
    bool is_if = false;   // "if /pattern/" line (sample unused)
    int block_end = -1;   // is_if: index of the first entry after "endif"
};

std::vector<HeaderCheck> make_header_checks(std::mt19937& rng) {
    std::vector<HeaderCheck> checks;
    const auto result = [&] { return rng() % 40 == 0 ? std::string("DUNNO") : "blocked"; };
    std::uint32_t next_word = 7;  // distinct words throughout the table
    const auto fresh = [&] { return word(next_word++ * 2654435761u % 1000003u); };
    constexpr int kPerKind = kHeaderRegexes / 10;

    // 150: broken firmware, by mailer.
    for (int i = 0; i < kPerKind * 3 / 2; ++i) {
        const std::string product = fresh();
        checks.push_back({"/^X-Mailer: " + product + "Scan [0-9]+ (?:Firmware|FW) [0-3]\\./",
                          result(), "X-Mailer: " + product + "Scan 5 Firmware 2.7"});
    }
    // 250: sender domains.
    for (int i = 0; i < kPerKind * 5 / 2; ++i) {
        const std::string domain = fresh();
        checks.push_back({"/^From:.*@(?:[a-z0-9-]+\\.)*" + domain + "\\.example\\b/", result(),
                          "From: \"Offers\" <news@mail." + domain + ".example>"});
    }
    // 100: relays.
    for (int i = 0; i < kPerKind; ++i) {
        const std::string host = fresh();
        checks.push_back({"/^Received: from [^ ]*\\." + host + "\\.example[ )]/", result(),
                          "Received: from out7." + host + ".example (out7." + host +
                              ".example [198.51.100.7]) by "
                              "mx1.contoso.test (Postfix) with ESMTP id 4Xb2; Tue, 11 Nov 2025"});
    }
    // 300: subject words, inside an if-block as Postfix's documentation suggests.
    const std::size_t if_index = checks.size();
    checks.push_back({"/^Subject:/", "", "", true});
    for (int i = 0; i < kPerKind * 3 - 1; ++i) {
        const std::string spam = fresh();
        checks.push_back(
            {"/^Subject:.*\\b" + spam + "\\b/", result(), "Subject: Your " + spam + " is waiting"});
    }
    checks[if_index].block_end = static_cast<int>(checks.size());
    // 100: subject alternations.
    for (int i = 0; i < kPerKind; ++i) {
        const std::string a = fresh(), b = fresh(), c = fresh();
        checks.push_back({"/^Subject:.*(?:" + a + "|" + b + "|" + c + ")s?\\b/", result(),
                          "Subject: Re: cheap " + b + "s"});
    }
    // 50: attachment names.
    for (int i = 0; i < kPerKind / 2; ++i) {
        const std::string name = fresh();
        checks.push_back({"/^Content-(?:Type|Disposition):.*name\\s*=\\s*\"?" + name +
                              "[^\"]*\\.(?:exe|scr|js)/",
                          result(),
                          "Content-Type: application/octet-stream; name=\"" + name + "-01.scr\""});
    }
    // 50: phrases anywhere.
    while (checks.size() < static_cast<std::size_t>(kHeaderRegexes)) {
        const std::string a = fresh(), b = fresh();
        checks.push_back({"/" + a + " +" + b + "/", result(), "Comments: " + a + " " + b});
    }
    return checks;
}

std::string header_checks_file(const std::vector<HeaderCheck>& checks) {
    std::string out = "# header_checks(5) style, generated\n";
    for (std::size_t i = 0; i < checks.size(); ++i) {
        for (const HeaderCheck& c : checks) {
            if (c.is_if && static_cast<std::size_t>(c.block_end) == i) out += "endif\n";
        }
        const HeaderCheck& c = checks[i];
        out += c.is_if ? "if " + c.pattern + "\n" : c.pattern + "\t" + c.value + "\n";
    }
    for (const HeaderCheck& c : checks) {
        if (c.is_if && static_cast<std::size_t>(c.block_end) == checks.size()) out += "endif\n";
    }
    return out;
}

// The regexes one by one in file order, as pcre_table(5) defines them (PCRE2 with JIT, the
// same flags the table uses: pcre: tables are case-insensitive by default).
class NaiveHeaderChecks {
  public:
    bool compile(const std::vector<HeaderCheck>& checks) {
        for (const HeaderCheck& c : checks) {
            auto regex = Regex::compile(c.pattern.substr(1, c.pattern.size() - 2));
            if (!regex) {
                std::fprintf(stderr, "bench-classify-scale: %s\n", regex.error().message.c_str());
                return false;
            }
            entries_.push_back(Entry{std::move(*regex), &c});
        }
        return true;
    }
    // The result of the first entry that matches `line`, or null.
    const std::string* lookup(std::string_view line) const {
        for (std::size_t i = 0; i < entries_.size(); ++i) {
            const bool holds = entries_[i].regex.matches(line);
            if (entries_[i].check->is_if) {
                if (!holds) i = static_cast<std::size_t>(entries_[i].check->block_end) - 1;
            } else if (holds) {
                return &entries_[i].check->value;
            }
        }
        return nullptr;
    }

  private:
    struct Entry {
        Regex regex;
        const HeaderCheck* check;
    };
    std::vector<Entry> entries_;
};

// ---------------------------------------------------------------------------------------
// The configuration: what an operator of a large site writes.

constexpr std::string_view kConfig = R"toml(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.acs-smtp]
action = "relay"

[routes.exchange-online]
action = "relay"

[routes.graph]
action = "relay"

[routes.local]
action = "pass"

[routes.blocked]
action = "reject"

# Known-bad mailers, spam relays and attachments: refused first.
[[rules]]
name = "header-checks"
header = ["pcre:tables/header_checks.pcre"]

# The device inventory.
[[rules]]
name = "devices"
client_addr = ["cidr:tables/devices.cidr"]
route = "acs-smtp"

# Scanners and printers that present a certificate from the device CA.
[[rules]]
name = "certificates"
cert_issuer = ["Contoso Device CA", "Contoso Device CA 2"]
cert_subject = ["texthash:tables/cert-subjects"]

[[rules]]
name = "erp"
auth = ["erp-batch"]
sender = ["erp.contoso.com"]
route = "exchange-online"

[[rules]]
name = "monitoring-alerts"
client_addr = ["127.0.0.0/8", "::1"]
header = ["/^Subject:.*\\[ALERT\\]/"]
route = "acs-smtp"

[[rules]]
name = "internal-only"
recipient = ["contoso.test"]
recipient_match = "all"
route = "local"
)toml";

// The same rules, written out naively over the naive tables: the baseline, and the check
// that the real classifier answers the same.
struct NaiveDecision {
    std::string rule;   // "" when no rule matched
    std::string route;  // "" when no route
};

class NaiveClassifier {
  public:
    NaiveClassifier(const std::vector<CidrEntry>& cidr, const std::vector<Subject>& subjects,
                    const NaiveHeaderChecks& headers)
        : cidr_(cidr), subjects_(subjects), headers_(headers) {}

    NaiveDecision classify(const Transaction& tx) const {
        for (const HeaderField& h : tx.headers) {
            const std::string line = unfolded(h);
            if (const std::string* value = headers_.lookup(line); value && *value != "DUNNO") {
                return {"header-checks", *value};
            }
        }
        if (const CidrEntry* e = naive_cidr_lookup(cidr_, tx.client_addr);
            e && e->value != "DUNNO") {
            return {"devices", e->value == "OK" ? "acs-smtp" : e->value};
        }
        const std::string issuer = lowercase(tx.cert_issuer);
        if (!tx.cert_subject.empty() &&
            (issuer == "contoso device ca" || issuer == "contoso device ca 2")) {
            if (const Subject* s = naive_subject_lookup(subjects_, tx.cert_subject)) {
                return {"certificates", s->value};
            }
        }
        if (lowercase(tx.auth_user) == "erp-batch" && tx.sender.ends_with("@erp.contoso.com")) {
            return {"erp", "exchange-online"};
        }
        if (tx.client_addr.starts_with("127.") || tx.client_addr == "::1") {
            for (const HeaderField& h : tx.headers) {
                if (lowercase(h.name) == "subject" &&
                    h.value.find("[ALERT]") != std::string::npos) {
                    return {"monitoring-alerts", "acs-smtp"};
                }
            }
        }
        if (!tx.recipients.empty() &&
            std::all_of(tx.recipients.begin(), tx.recipients.end(), [](const std::string& r) {
                return r.ends_with(".contoso.test") || r.ends_with("@contoso.test");
            })) {
            return {"internal-only", "local"};
        }
        return {};
    }

  private:
    static std::string unfolded(const HeaderField& h) {
        std::string line = h.name + ": ";
        for (char c : h.value) {
            if (c != '\r' && c != '\n') line += c;
        }
        return line;
    }

    const std::vector<CidrEntry>& cidr_;
    const std::vector<Subject>& subjects_;
    const NaiveHeaderChecks& headers_;
};

// ---------------------------------------------------------------------------------------
// The transaction mix.

// Draws in a fixed order: the order a function's arguments are evaluated in is unspecified,
// and the transactions must not depend on the compiler.
std::array<unsigned, 4> draws(std::mt19937& rng, std::array<unsigned, 4> ranges) {
    std::array<unsigned, 4> out{};
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = rng() % ranges[i];
    return out;
}

std::string random_v4(std::mt19937& rng) {
    const auto d = draws(rng, {100, 256, 256, 254});
    return fmt::format("{}.{}.{}.{}", 100 + d[0], d[1], d[2], 1 + d[3]);
}

std::string address_in(std::mt19937& rng, const CidrEntry& entry) {
    std::array<std::uint8_t, 16> bytes = entry.bytes;
    const int bits = entry.family == AF_INET ? 32 : 128;
    for (int bit = entry.prefix; bit < bits; ++bit) {
        if (rng() % 2) bytes[bit / 8] ^= static_cast<std::uint8_t>(0x80u >> (bit % 8));
    }
    return to_text(entry.family, bytes);
}

// Of every 100 transactions: 1 with a header from the header checks (first rule); 40 from a
// device in the inventory (second rule; some of them DUNNO exceptions); 20 with a device
// certificate; 3 ERP, 2 monitoring alerts, 10 internal-only; the rest (24) match nothing:
// outside clients, a few near misses inside the same /16s and unknown certificates. Every
// message has 8-11 headers as a device or mail client writes them, Received lines included.
std::vector<Transaction> make_transactions(std::mt19937& rng, const std::vector<CidrEntry>& cidr,
                                           const std::vector<Subject>& subjects,
                                           const std::vector<HeaderCheck>& checks) {
    std::vector<Transaction> out;
    out.reserve(kTransactions);
    for (int i = 0; i < kTransactions; ++i) {
        Transaction tx;
        const int kind = static_cast<int>(rng() % 100);
        const std::string n = std::to_string(rng() % 100000);
        tx.client_addr = random_v4(rng);
        tx.client_name = "unknown";
        tx.sender = "user" + n + "@example.org";
        tx.recipients = {"someone" + n + "@example.net"};
        std::string subject = "Scanned document " + n;
        std::string extra;  // a header line from the header checks
        if (kind < 1) {
            const HeaderCheck* check = nullptr;
            while (!check || check->is_if) check = &checks[rng() % checks.size()];
            extra = check->sample;
        } else if (kind < 41) {
            tx.client_addr = address_in(rng, cidr[rng() % cidr.size()]);
            tx.sender = "scanner" + n + "@contoso.com";
        } else if (kind < 61) {
            const Subject& s = subjects[rng() % subjects.size()];
            tx.cert_subject = rng() % 2 ? s.name : lowercase(s.name);
            for (char& c : tx.cert_subject) {
                if (c == 'c' && rng() % 4 == 0) c = 'C';
            }
            tx.cert_issuer = rng() % 2 ? "Contoso Device CA" : "Contoso Device CA 2";
        } else if (kind < 64) {
            tx.auth_user = "erp-batch";
            tx.sender = "batch" + n + "@erp.contoso.com";
        } else if (kind < 66) {
            tx.client_addr = "127.0.0.1";
            subject = "[ALERT] disk " + n + " full";
        } else if (kind < 76) {
            tx.recipients = {"a" + n + "@contoso.test", "b" + n + "@it.contoso.test"};
        } else if (kind < 86) {
            const auto d = draws(rng, {256, 256, 256, 1});
            tx.client_addr = fmt::format("10.{}.{}.{}", d[0], d[1], d[2]);
        } else if (kind < 90) {
            const auto d = draws(rng, {65536, 65536, 1, 1});
            tx.client_addr = fmt::format("2001:db8:0:{:x}::{:x}", d[0], d[1]);
        } else if (kind < 95) {
            tx.cert_subject = "laptop-" + n + ".contoso.test";
            tx.cert_issuer = "Contoso Device CA";
        }
        const std::string host = fmt::format("dev{}.contoso.com", n);
        tx.headers = {
            {"Received", "from " + host + " (" + host + " [" + tx.client_addr +
                             "]) by mx1.contoso.test (Postfix) with ESMTPS id 4Xb2Kq0Zz1z9t"
                             "\r\n\tfor <" +
                             tx.recipients.front() +
                             ">; Tue, 11 Nov 2025 10:" + std::to_string(i % 60) + ":00 +0100"},
            {"From", "\"Device " + n + "\" <" + tx.sender + ">"},
            {"To", "<" + tx.recipients.front() + ">"},
            {"Subject", subject},
            {"Date", "Tue, 11 Nov 2025 10:00:00 +0100"},
            {"Message-ID", "<" + std::to_string(rng()) + "." + n + "@contoso.com>"},
            {"MIME-Version", "1.0"},
            {"Content-Type", "multipart/mixed;\r\n\tboundary=\"----=_Part_" + n + "\""},
        };
        if (rng() % 2) tx.headers.push_back({"X-Mailer", "ScanStation 5.2 (build " + n + ")"});
        if (rng() % 3 == 0) tx.headers.push_back({"Importance", "normal"});
        if (rng() % 3 == 0) tx.headers.push_back({"X-Priority", "3 (Normal)"});
        if (!extra.empty()) {
            const auto colon = extra.find(':');
            tx.headers.insert(tx.headers.begin() + static_cast<std::ptrdiff_t>(rng() % 6),
                              {extra.substr(0, colon), extra.substr(colon + 2)});
        }
        out.push_back(std::move(tx));
    }
    return out;
}

// ---------------------------------------------------------------------------------------
// Output.

void result_line(const std::string& name, double value, const char* unit,
                 std::optional<double> baseline, const std::string& target, bool met) {
    const std::string base = baseline ? fmt::format("{:.4g}", *baseline) : "-";
    const std::string ratio =
        baseline && *baseline > 0 ? fmt::format("{:.4g}", value / *baseline) : "-";
    std::printf("RESULT\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name.c_str(),
                fmt::format("{:.4g}", value).c_str(), unit, base.c_str(), ratio.c_str(),
                target.c_str(), met ? "yes" : "no");
}

// ---------------------------------------------------------------------------------------
// Measurements.

// One latency per classify() call, over the transactions in order, repeated for `duration`.
// Each transaction is copied just before its call, untimed: in the daemon the callbacks
// have just written the facts and headers classify() reads (they are in cache), while the
// tables are shared by every message.
std::vector<std::uint32_t> time_classify(const Config& config,
                                         const std::vector<Transaction>& transactions,
                                         Clock::duration duration) {
    std::vector<std::uint32_t> ns;
    ns.reserve(4'000'000);
    const auto start = Clock::now();
    while (Clock::now() - start < duration) {
        for (const Transaction& stored : transactions) {
            const Transaction tx = stored;  // built just before, as the milter callbacks do
            const auto t0 = Clock::now();
            const Decision d = classify(config, tx);
            const auto t1 = Clock::now();
            g_sink.fetch_add(reinterpret_cast<std::uintptr_t>(d.route), std::memory_order_relaxed);
            ns.push_back(elapsed_ns(t0, t1));
        }
    }
    return ns;
}

// The daemon's traffic: each message takes the snapshot in force (at MAIL FROM), keeps it
// while in flight, is classified, and drops its reference when the connection's next message
// replaces it. kInFlight messages overlap, so an old snapshot may die here, as it may on a
// milter worker. Each sample times taking the snapshot, classifying and dropping the slot's
// previous message: what one message costs a worker.
class Traffic {
  public:
    Traffic(const ConfigSnapshot& snapshot, const std::vector<Transaction>& transactions)
        : snapshot_(snapshot), transactions_(transactions) {
        steady_.reserve(8'000'000);
        during_reload_.reserve(8'000'000);
    }

    void run(const std::atomic<bool>& stop, const std::atomic<int>& reloading) {
        std::array<std::shared_ptr<const Config>, kInFlight> in_flight;
        std::size_t slot = 0;
        while (!stop.load(std::memory_order_relaxed)) {
            for (const Transaction& stored : transactions_) {
                const Transaction tx = stored;
                const bool reload_before = reloading.load(std::memory_order_acquire) != 0;
                const auto t0 = Clock::now();
                std::shared_ptr<const Config> config = snapshot_.get();
                const Decision d = classify(*config, tx);
                in_flight[slot] = std::move(config);  // drops the slot's previous message
                const auto t1 = Clock::now();
                slot = (slot + 1) % kInFlight;
                g_sink.fetch_add(reinterpret_cast<std::uintptr_t>(d.route),
                                 std::memory_order_relaxed);
                const bool reload_after = reloading.load(std::memory_order_acquire) != 0;
                (reload_before || reload_after ? during_reload_ : steady_)
                    .push_back(elapsed_ns(t0, t1));
                if (stop.load(std::memory_order_relaxed)) break;
            }
        }
    }

    std::vector<std::uint32_t>& steady() { return steady_; }
    std::vector<std::uint32_t>& during_reload() { return during_reload_; }

  private:
    const ConfigSnapshot& snapshot_;
    const std::vector<Transaction>& transactions_;
    std::vector<std::uint32_t> steady_;
    std::vector<std::uint32_t> during_reload_;
};

int fail(const std::string& message) {
    std::fprintf(stderr, "bench-classify-scale: %s\n", message.c_str());
    return 1;
}

int run(int profile_seconds) {
    std::mt19937 rng(kSeed);
    const std::vector<CidrEntry> cidr = make_cidr_entries(rng);
    const std::vector<Subject> subjects = make_subjects();
    const std::vector<HeaderCheck> checks = make_header_checks(rng);
    const std::vector<Transaction> transactions = make_transactions(rng, cidr, subjects, checks);

    testing::TempDir dir;
    dir.write("tables/devices.cidr", cidr_file(cidr));
    dir.write("tables/cert-subjects", subjects_file(subjects));
    dir.write("tables/header_checks.pcre", header_checks_file(checks));
    const std::string config_path = dir.write("paas-milter.toml", std::string(kConfig));

    // 2. Loading: the first load, then reloads while that snapshot is alive.
    const auto load_start = Clock::now();
    auto loaded = load_config(config_path);
    const auto load_time = Clock::now() - load_start;
    if (!loaded) return fail(loaded.error().to_string());
    std::shared_ptr<const Config> config = std::move(*loaded);
    std::vector<std::string> rule_names;
    for (const Rule& rule : config->rules) rule_names.push_back(rule.name);
    if (profile_seconds > 0) {  // only classify(), for `perf record`
        const auto ns = time_classify(*config, transactions, std::chrono::seconds(profile_seconds));
        std::printf("classify(): %zu samples, p50 %.2f us, p99 %.2f us\n", ns.size(),
                    percentile_us(ns, 0.5), percentile_us(ns, 0.99));
        // By decision: which transactions cost what.
        std::vector<std::vector<std::uint32_t>> by_rule(config->rules.size() + 1);
        for (std::size_t i = 0; i < ns.size(); ++i) {
            const Decision d = classify(*config, transactions[i % transactions.size()]);
            by_rule[d.rule ? static_cast<std::size_t>(d.rule - config->rules.data())
                           : config->rules.size()]
                .push_back(ns[i]);
        }
        for (std::size_t r = 0; r < by_rule.size(); ++r) {
            std::printf(
                "  %-20s %6.1f %%  p50 %.2f us  p99 %.2f us\n",
                r < rule_names.size() ? rule_names[r].c_str() : "(none)",
                100.0 * static_cast<double>(by_rule[r].size()) / static_cast<double>(ns.size()),
                percentile_us(by_rule[r], 0.5), percentile_us(by_rule[r], 0.99));
        }
        return 0;
    }

    std::vector<double> reload_ms;
    std::vector<double> release_ms;
    for (int i = 0; i < 3; ++i) {
        const auto start = Clock::now();
        auto again = load_config(config_path);
        reload_ms.push_back(to_ms(Clock::now() - start));
        if (!again) return fail(again.error().to_string());
        const auto release_start = Clock::now();
        again->reset();  // the last reference: the whole snapshot is freed here
        release_ms.push_back(to_ms(Clock::now() - release_start));
    }
    std::sort(reload_ms.begin(), reload_ms.end());
    std::sort(release_ms.begin(), release_ms.end());

    // The baseline, and agreement with it.
    NaiveHeaderChecks naive_headers;
    if (!naive_headers.compile(checks)) return 1;
    const NaiveClassifier naive(cidr, subjects, naive_headers);
    std::array<int, 7> per_rule{};  // by rule index, last: no rule
    std::vector<std::uint32_t> naive_ns;
    for (int i = 0; i < kCheckedTransactions; ++i) {
        const Transaction tx = transactions[static_cast<std::size_t>(i)];
        const auto t0 = Clock::now();
        const NaiveDecision expected = naive.classify(tx);
        naive_ns.push_back(elapsed_ns(t0, Clock::now()));
        const Decision got = classify(*config, tx);
        const std::string rule = got.rule ? got.rule->name : "";
        const std::string route = got.route ? got.route->name : "";
        if (rule != expected.rule || route != expected.route) {
            return fail(fmt::format(
                "classifier and naive scan disagree on transaction {} (client {}, subject "
                "\"{}\"): rule \"{}\" route \"{}\" vs. rule \"{}\" route \"{}\"",
                i, tx.client_addr, tx.cert_subject, rule, route, expected.rule, expected.route));
        }
        per_rule[got.rule ? static_cast<std::size_t>(got.rule - config->rules.data())
                          : per_rule.size() - 1]++;
    }

    // 1. Steady state, one thread.
    time_classify(*config, transactions, std::chrono::milliseconds(300));  // warm-up
    const std::vector<std::uint32_t> steady = time_classify(*config, transactions, kSteadyDuration);

    // 3. Reload under traffic: the traffic thread alone for a while (its steady state), then
    // kReloads reloads from another thread, each as the daemon's reloader does it.
    ConfigSnapshot snapshot;
    snapshot.set(config);
    Traffic traffic(snapshot, transactions);
    std::atomic<bool> stop{false};
    std::atomic<int> reloading{0};
    std::thread worker([&] { traffic.run(stop, reloading); });
    std::this_thread::sleep_for(kSteadyDuration);
    std::vector<double> reload_under_traffic_ms;
    bool reload_failed = false;
    for (int i = 0; i < kReloads && !reload_failed; ++i) {
        reloading.store(1, std::memory_order_release);
        const auto start = Clock::now();
        {
            auto fresh = load_config(config_path);
            if (!fresh) {
                reload_failed = true;
            } else {
                auto old = snapshot.get();
                snapshot.set(std::move(*fresh));
            }  // `old` dies here unless a message still holds it
        }
        reload_under_traffic_ms.push_back(to_ms(Clock::now() - start));
        reloading.store(0, std::memory_order_release);
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    stop.store(true);
    worker.join();
    if (reload_failed) return fail("a reload under traffic failed");
    config.reset();
    std::sort(reload_under_traffic_ms.begin(), reload_under_traffic_ms.end());

    // Component figures: each big table alone against its naive scan, over the same keys,
    // each in its own pass (warm, as classify() above).
    std::vector<std::uint32_t> table_ns[3];
    std::vector<std::uint32_t> naive_table_ns[3];
    {
        const auto cidr_table =
            open_table("cidr:" + (dir.path() / "tables/devices.cidr").string(), KeyKind::ip);
        const auto subject_table =
            open_table("texthash:" + (dir.path() / "tables/cert-subjects").string(), KeyKind::text);
        const auto header_table = open_table(
            "pcre:" + (dir.path() / "tables/header_checks.pcre").string(), KeyKind::header);
        if (!cidr_table || !subject_table || !header_table) return fail("cannot open a table");
        const std::span<const Transaction> sample(transactions.data(), kCheckedTransactions);
        std::vector<std::vector<std::string>> lines;  // unfolded header lines per message
        for (const Transaction& tx : sample) {
            auto& message = lines.emplace_back();
            for (const HeaderField& h : tx.headers) {
                std::string line = h.name + ": ";
                for (char c : h.value) {
                    if (c != '\r' && c != '\n') line += c;
                }
                message.push_back(std::move(line));
            }
        }
        const auto subject_key = [](const Transaction& tx) -> const std::string& {
            return tx.cert_subject.empty() ? tx.sender : tx.cert_subject;
        };
        const auto time_each = [&](std::vector<std::uint32_t>& out, auto&& op) {
            for (int pass = 0; pass < 2; ++pass) {  // the first pass warms up
                out.clear();
                std::size_t found = 0;
                for (std::size_t i = 0; i < sample.size(); ++i) {
                    const auto t0 = Clock::now();
                    found += op(i);
                    const auto t1 = Clock::now();
                    out.push_back(elapsed_ns(t0, t1));
                }
                g_sink += found;
            }
        };
        time_each(table_ns[0], [&](std::size_t i) {
            return (*cidr_table)->lookup(sample[i].client_addr).has_value();
        });
        time_each(naive_table_ns[0], [&](std::size_t i) {
            return naive_cidr_lookup(cidr, sample[i].client_addr) != nullptr;
        });
        time_each(table_ns[1], [&](std::size_t i) {
            return (*subject_table)->lookup(subject_key(sample[i])).has_value();
        });
        time_each(naive_table_ns[1], [&](std::size_t i) {
            return naive_subject_lookup(subjects, subject_key(sample[i])) != nullptr;
        });
        time_each(table_ns[2], [&](std::size_t i) {
            std::size_t found = 0;
            for (const std::string& line : lines[i])
                found += (*header_table)->lookup(line).has_value();
            return found;
        });
        time_each(naive_table_ns[2], [&](std::size_t i) {
            std::size_t found = 0;
            for (const std::string& line : lines[i]) found += naive_headers.lookup(line) != nullptr;
            return found;
        });
        for (const Transaction& tx : sample) {
            const bool in_table = (*cidr_table)->lookup(tx.client_addr).has_value();
            if (in_table != (naive_cidr_lookup(cidr, tx.client_addr) != nullptr)) {
                return fail("trie and linear scan disagree on " + tx.client_addr);
            }
        }
    }

    // Report.
    const double p50 = percentile_us(steady, 0.50);
    const double p99 = percentile_us(steady, 0.99);
    const double naive_p50 = percentile_us(naive_ns, 0.50);
    const double naive_p99 = percentile_us(naive_ns, 0.99);
    const double load_ms = to_ms(load_time);
    const double reload_median_ms = reload_ms[reload_ms.size() / 2];
    const double traffic_p99 = percentile_us(traffic.steady(), 0.99);
    const double reload_p99 = percentile_us(traffic.during_reload(), 0.99);

    std::printf(
        "bench-classify-scale: %d cidr entries (IPv4 + IPv6), %d certificate subjects "
        "(texthash:), %d header regexes (pcre:), 6 rules; %d transactions\n",
        kCidrEntries, kSubjects, kHeaderRegexes, kTransactions);
    std::printf("  decisions in the checked sample of %d:", kCheckedTransactions);
    for (std::size_t r = 0; r + 1 < per_rule.size(); ++r) {
        std::printf(" %s %d,", r < rule_names.size() ? rule_names[r].c_str() : "?", per_rule[r]);
    }
    std::printf(" none %d\n", per_rule.back());
    std::printf("  classify(): %zu samples, p50 %.2f us, p90 %.2f us, p99 %.2f us, p99.9 %.2f us\n",
                steady.size(), p50, percentile_us(steady, 0.90), p99, percentile_us(steady, 0.999));
    std::printf("  naive classifier: %zu samples, p50 %.1f us, p99 %.1f us\n", naive_ns.size(),
                naive_p50, naive_p99);
    std::printf(
        "  load %.1f ms; reloads with the first snapshot alive: %.1f / %.1f / %.1f ms; "
        "releasing a snapshot: %.1f ms (median)\n",
        load_ms, reload_ms[0], reload_ms[1], reload_ms[2], release_ms[release_ms.size() / 2]);
    std::printf(
        "  traffic thread: %zu samples steady (p50 %.2f, p99 %.2f, max %.0f us), %zu "
        "during %d reloads (p50 %.2f, p99 %.2f, max %.0f us); reloads under traffic "
        "%.0f-%.0f ms\n",
        traffic.steady().size(), percentile_us(traffic.steady(), 0.5), traffic_p99,
        max_us(traffic.steady()), traffic.during_reload().size(), kReloads,
        percentile_us(traffic.during_reload(), 0.5), reload_p99, max_us(traffic.during_reload()),
        reload_under_traffic_ms.front(), reload_under_traffic_ms.back());
    const char* kTableNames[] = {"cidr: lookup (100k entries)", "texthash: lookup (10k subjects)",
                                 "pcre: lookups, all headers of a message (1k regexes)"};
    for (int t = 0; t < 3; ++t) {
        std::printf("  %-55s p50 %8.2f us, p99 %8.2f us; naive scan p50 %9.1f us, p99 %9.1f us\n",
                    kTableNames[t], percentile_us(table_ns[t], 0.5),
                    percentile_us(table_ns[t], 0.99), percentile_us(naive_table_ns[t], 0.5),
                    percentile_us(naive_table_ns[t], 0.99));
    }

    const std::string scale = "(100k cidr, 10k subjects, 1k regex)";
    result_line("classify p50 " + scale, p50, "us", naive_p50, "< 2 us", p50 < 2);
    result_line("classify p99 " + scale, p99, "us", naive_p99, "< 20 us", p99 < 20);
    result_line("load config " + scale, load_ms, "ms", std::nullopt, "< 1000 ms", load_ms < 1000);
    result_line("reload config, old snapshot alive " + scale, reload_median_ms, "ms", load_ms,
                "< 1000 ms", reload_median_ms < 1000);
    result_line("classify p99 during reload vs steady " + scale, reload_p99, "us", traffic_p99,
                "ratio <= 2", reload_p99 <= 2 * traffic_p99);
    return 0;
}

}  // namespace
}  // namespace paasmilter::bench

// --profile SECONDS: load, then only classify() in a loop (for perf record).
int main(int argc, char** argv) {
    const std::string_view option = argc == 3 ? argv[1] : "";
    if (argc != 1 && option != "--profile") {
        std::fprintf(stderr, "usage: %s [--profile SECONDS]\n", argv[0]);
        return 2;
    }
    return paasmilter::bench::run(argc == 3 ? std::atoi(argv[2]) : 0);
}
