// Classification throughput with a 5,000-entry cidr table (IPv4 and IPv6), regexp
// certificate tables and a header rule, against a naive linear scan over the same 5,000
// entries measured in the same run, plus the cost of loading that configuration.
// Prints figures only: timings differ between machines, so nothing is asserted about them
// (not a meson test). The one check is that the trie and the scan agree on every address.
#include <arpa/inet.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "naive_cidr.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/table.hpp"
#include "temp_dir.hpp"

namespace paasmilter::bench {
namespace {

constexpr int kEntries = 5000;
constexpr int kTransactions = 4096;
constexpr std::uint32_t kSeed = 20261123;  // fixed: every run measures the same work
constexpr auto kMinDuration = std::chrono::seconds(1);

using Clock = std::chrono::steady_clock;

// Results feed this so the optimiser cannot drop the work being timed.
volatile std::size_t g_sink = 0;

// Half IPv4 (mostly single devices, some small subnets), half IPv6 under 2001:db8::/32;
// a few DUNNO exceptions, as real device tables have.
std::vector<CidrEntry> make_entries(std::mt19937& rng) {
    std::vector<CidrEntry> entries;
    std::uniform_int_distribution<int> byte(0, 255);
    constexpr int kV4Prefixes[] = {32, 32, 32, 32, 30, 28, 24};
    constexpr int kV6Prefixes[] = {128, 128, 64, 56, 48};
    constexpr const char* kRoutes[] = {"acs-smtp", "exchange-online"};
    for (int i = 0; i < kEntries; ++i) {
        CidrEntry entry;
        if (i % 2 == 0) {
            entry.family = AF_INET;
            entry.bytes = {10, static_cast<std::uint8_t>(byte(rng)),
                           static_cast<std::uint8_t>(byte(rng)),
                           static_cast<std::uint8_t>(byte(rng))};
            entry.prefix = kV4Prefixes[rng() % std::size(kV4Prefixes)];
        } else {
            entry.family = AF_INET6;
            entry.bytes = {0x20, 0x01, 0x0d, 0xb8};
            for (int k = 4; k < 16; ++k) entry.bytes[k] = static_cast<std::uint8_t>(byte(rng));
            entry.prefix = kV6Prefixes[rng() % std::size(kV6Prefixes)];
        }
        clear_host_bits(entry.bytes, entry.prefix);
        entry.value = i % 97 == 0 ? "DUNNO" : kRoutes[rng() % 2];
        entries.push_back(std::move(entry));
    }
    return entries;
}

std::string cidr_file(const std::vector<CidrEntry>& entries) {
    std::string out;  // no comment lines: entry i is on line i + 1
    for (const CidrEntry& e : entries) {
        out += to_text(e.family, e.bytes) + "/" + std::to_string(e.prefix) + " " + e.value + "\n";
    }
    return out;
}

std::string subjects_file() {
    std::string out;
    for (int site = 0; site < 20; ++site) {
        out += "/^scanner-[0-9]+\\.site" + std::to_string(site) +
               "\\.contoso\\.test$/  exchange-online\n";
    }
    out += "/^printer-[0-9]+\\.contoso\\.test$/  acs-smtp\n";
    return out;
}

constexpr std::string_view kConfig = R"toml(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.acs-smtp]
action = "relay"

[routes.exchange-online]
action = "relay"

[routes.blocked]
action = "reject"

[[rules]]
name = "broken-firmware"
header = ["/^X-Mailer: OldScan Firmware 1\\./"]
route = "blocked"

[[rules]]
name = "devices"
client_addr = ["cidr:devices.cidr"]

[[rules]]
name = "certificates"
cert_issuer = ["regexp:issuers.regexp"]
cert_subject = ["regexp:subjects.regexp"]
route = "exchange-online"
)toml";

// Half the clients are inside some entry (a host in its network), half random addresses
// (mostly misses, the scan's worst case); a third carry a certificate; every message has
// five headers, one in a hundred from the broken firmware.
std::vector<Transaction> make_transactions(std::mt19937& rng,
                                           const std::vector<CidrEntry>& entries) {
    std::vector<Transaction> out;
    std::uniform_int_distribution<int> byte(0, 255);
    for (int i = 0; i < kTransactions; ++i) {
        Transaction tx;
        const CidrEntry& base = entries[rng() % entries.size()];
        std::array<std::uint8_t, 16> bytes = base.bytes;
        const int bits = base.family == AF_INET ? 32 : 128;
        const bool inside = rng() % 2 == 0;
        for (int bit = inside ? base.prefix : 8; bit < bits; ++bit) {
            if (rng() % 2) bytes[bit / 8] ^= static_cast<std::uint8_t>(0x80u >> (bit % 8));
        }
        tx.client_addr = to_text(base.family, bytes);
        if (i % 3 == 0) {
            // One draw per statement: operands of + are unsequenced, and the set must not
            // depend on the compiler.
            const char* kind = rng() % 2 ? "scanner-" : "desk-";
            const std::string number = std::to_string(rng() % 1000);
            const std::string site = std::to_string(rng() % 25);
            tx.cert_subject = kind + number + ".site" + site + ".contoso.test";
            tx.cert_issuer = "Contoso Device CA " + std::to_string(rng() % 3);
        }
        tx.sender = "device" + std::to_string(i) + "@contoso.com";
        tx.recipients = {"someone@example.net"};
        tx.headers = {
            {"From", tx.sender},
            {"To", "someone@example.net"},
            {"Subject", "Scanned document " + std::to_string(rng())},
            {"Message-ID", "<" + std::to_string(rng()) + "@contoso.com>"},
            {"X-Mailer", i % 100 == 0 ? "OldScan Firmware 1.4" : "ScanStation 5.2"},
        };
        out.push_back(std::move(tx));
    }
    return out;
}

// Repeats `batch` (which does `batch_size` operations) for at least kMinDuration after one
// warm-up batch; returns operations per second.
template <class Batch>
double per_second(std::size_t batch_size, Batch&& batch) {
    batch();
    std::size_t done = 0;
    const auto start = Clock::now();
    std::chrono::duration<double> elapsed{};
    do {
        batch();
        done += batch_size;
        elapsed = Clock::now() - start;
    } while (elapsed < kMinDuration);
    return static_cast<double>(done) / elapsed.count();
}

int run() {
    std::mt19937 rng(kSeed);
    const std::vector<CidrEntry> entries = make_entries(rng);
    const std::vector<Transaction> transactions = make_transactions(rng, entries);

    testing::TempDir dir;
    const std::string cidr_path = dir.write("devices.cidr", cidr_file(entries));
    dir.write("subjects.regexp", subjects_file());
    dir.write("issuers.regexp", "/^Contoso Device CA( [0-9]+)?$/  OK\n");
    const std::string config_path = dir.write("paas-milter.toml", std::string(kConfig));

    auto loaded = load_config(config_path);
    if (!loaded) {
        std::fprintf(stderr, "bench-classify: %s\n", loaded.error().to_string().c_str());
        return 1;
    }
    const Config& config = **loaded;
    auto table = open_table("cidr:" + cidr_path, KeyKind::ip);
    if (!table) {
        std::fprintf(stderr, "bench-classify: %s\n", table.error().to_string().c_str());
        return 1;
    }

    // Same answers, or the comparison is meaningless.
    std::size_t hits = 0;
    for (const Transaction& tx : transactions) {
        const auto trie = (*table)->lookup(tx.client_addr);
        const CidrEntry* scan = naive_cidr_lookup(entries, tx.client_addr);
        const bool same =
            trie ? scan && trie->value == scan->value &&
                       trie->where.ends_with(fmt::format(":{}", scan - entries.data() + 1))
                 : scan == nullptr;
        if (!same) {
            std::fprintf(stderr, "bench-classify: trie and linear scan disagree on %s\n",
                         tx.client_addr.c_str());
            return 1;
        }
        hits += trie.has_value();
    }

    const double loads = per_second(1, [&] {
        auto again = load_config(config_path);
        g_sink = g_sink + again.ok();
    });
    const double classified = per_second(transactions.size(), [&] {
        for (const Transaction& tx : transactions) {
            g_sink = g_sink + reinterpret_cast<std::uintptr_t>(classify(config, tx).route);
        }
    });
    const double trie_lookups = per_second(transactions.size(), [&] {
        for (const Transaction& tx : transactions) {
            g_sink = g_sink + (*table)->lookup(tx.client_addr).has_value();
        }
    });
    const double scans = per_second(transactions.size(), [&] {
        for (const Transaction& tx : transactions) {
            g_sink = g_sink +
                     reinterpret_cast<std::uintptr_t>(naive_cidr_lookup(entries, tx.client_addr));
        }
    });

    std::printf(
        "bench-classify: %d cidr entries (IPv4 + IPv6), %d transactions "
        "(%zu in the table), 2 regexp certificate tables, 1 header rule\n",
        kEntries, kTransactions, hits);
    std::printf("  load_config, %d-entry cidr table:     %10.2f ms per load\n", kEntries,
                1000.0 / loads);
    std::printf("  classify() (all rules):              %10.0f classifications/s\n", classified);
    std::printf("  cidr table lookup alone (trie):      %10.0f lookups/s\n", trie_lookups);
    std::printf("  baseline: naive linear scan:         %10.0f classifications/s\n", scans);
    std::printf("  ratio classify() / baseline:         %10.1fx\n", classified / scans);
    std::printf("  ratio trie lookup / baseline:        %10.1fx\n", trie_lookups / scans);
    return 0;
}

}  // namespace
}  // namespace paasmilter::bench

int main() {
    return paasmilter::bench::run();
}
