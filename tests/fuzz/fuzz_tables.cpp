// Fuzz target for the table parsers and lookups: the input is a table source file, opened
// as cidr:, regexp:, pcre: and texthash: with every key kind; every table that loads is
// then queried with fixed keys and keys taken from the input's own lines, so that entries
// and keys meet often enough to reach the matching paths (if-blocks, negation, access(5)
// search order).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "paasmilter/table.hpp"

namespace paasmilter::fuzz {
namespace {

constexpr std::size_t kMaxLineKeys = 16;

constexpr std::string_view kTypes[] = {"cidr:", "regexp:", "pcre:", "texthash:"};
constexpr KeyKind kKinds[] = {KeyKind::ip, KeyKind::address, KeyKind::text, KeyKind::header};

// Keys every table sees: each address family, the IPv4-mapped form, the null sender,
// access(5)-style addresses, a header line and invalid UTF-8.
const std::vector<std::string>& fixed_keys() {
    static const std::vector<std::string> keys = {
        "",
        "192.0.2.7",
        "10.1.2.3",
        "172.16.5.9",
        "2001:db8::1",
        "2001:db8:10::7",
        "::ffff:192.0.2.7",
        "::1",
        "not-an-address",
        "user@example.com",
        "<User@Sub.Example.COM>",
        "<>",
        "postmaster",
        "erp@contoso.com",
        "Subject: [ALERT] disk full",
        "scanner-1.contoso.test",
        std::string("a\0b", 3),
        "\xff\xfe\xc0\x80",
    };
    return keys;
}

std::string_view trim(std::string_view text) {
    const auto blank = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
    while (!text.empty() && blank(text.front())) text.remove_prefix(1);
    while (!text.empty() && blank(text.back())) text.remove_suffix(1);
    return text;
}

// From each of the first lines: the line, its first word (a texthash key or a cidr
// pattern) without "if"/"!" and, for cidr patterns, without brackets and "/len" — the
// network address itself, which the entry matches.
std::vector<std::string> keys_from(std::string_view input) {
    std::vector<std::string> keys = fixed_keys();
    std::size_t lines = 0;
    while (!input.empty() && lines++ < kMaxLineKeys) {
        const auto end = std::min(input.find('\n'), input.size());
        std::string_view line = trim(input.substr(0, end));
        input.remove_prefix(std::min(end + 1, input.size()));
        keys.emplace_back(line);
        if (line.starts_with("if ")) line = trim(line.substr(3));
        while (!line.empty() && line.front() == '!') line.remove_prefix(1);
        const std::string_view word = line.substr(0, line.find_first_of(" \t"));
        keys.emplace_back(word);
        std::string address;
        for (char c : word.substr(0, word.find('/'))) {
            if (c != '[' && c != ']') address += c;
        }
        keys.push_back(std::move(address));
    }
    return keys;
}

void exercise(const Table& table, const std::vector<std::string>& keys) {
    std::set<std::pair<std::string, std::string>> results;
    table.for_each_result([&](const std::string& value, const std::string& where) {
        check(!where.empty(), "a table result without a location");
        results.emplace(value, where);
    });
    check(!table.describe().empty(), "a table without a description");
    for (const std::string& key : keys) {
        const auto match = table.lookup(key);
        if (!match) continue;
        // A lookup can only return one of the table's own entries.
        check(results.count({match->value, match->where}) == 1,
              "lookup returned an entry for_each_result does not list");
    }
}

TempDir& scratch() {
    static TempDir dir;
    return dir;
}

}  // namespace
}  // namespace paasmilter::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace paasmilter;
    using namespace paasmilter::fuzz;
    const std::string_view input = as_text(data, size);
    const std::string path = scratch().write("table", std::string(input));
    const std::vector<std::string> keys = keys_from(input);
    for (const std::string_view type : kTypes) {
        for (const KeyKind kind : kKinds) {
            auto table = open_table(std::string(type) + path, kind);
            if (!table) {
                check(!table.error().to_string().empty(), "an error without a message");
                continue;
            }
            exercise(**table, keys);
        }
    }
    return 0;
}
