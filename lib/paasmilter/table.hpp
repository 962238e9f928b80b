// Lookup tables in Postfix's own file formats, so operators can keep thousands of
// devices in one file they already know how to write:
//   cidr:/path      cidr_table(5)   (client addresses only; longest-prefix trie, first-match
//   semantics) regexp:/path    regexp_table(5) (evaluated with PCRE2) pcre:/path      pcre_table(5)
//   (PCRE2) texthash:/path  "key value" lines, access(5)-style search order for addresses
// plus inline lists written directly in the TOML configuration.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/result.hpp"

namespace paasmilter {

// What a table's keys are; decides how inline entries and texthash lookups work.
enum class KeyKind {
    ip,       // client address ("192.0.2.7", "2001:db8::1"); cidr allowed
    address,  // envelope address ("user@example.com", "" for the null sender)
    text,     // certificate CN/DN, SASL login, fingerprint: case-insensitive exact or regex
    header,   // one header line "Name: value"; regexp/pcre only
};

struct TableMatch {
    std::string value;  // the right-hand side; empty for inline entries, which have none
    std::string where;  // "file:line" (or "inline:<label>") of the entry that matched
};

class Table {
  public:
    virtual ~Table() = default;
    // First matching entry in table order (Postfix semantics), nullopt when nothing matches.
    virtual std::optional<TableMatch> lookup(std::string_view key) const = 0;
    // "cidr:/etc/paas-milter/printers.cidr" or "inline" — for logs and `paas-milter query`.
    virtual const std::string& describe() const = 0;
    // Every right-hand side with its "file:line", so the config loader can check that
    // each names a route (or is OK/DUNNO) before the table is used.
    virtual void for_each_result(const std::function<void(const std::string& value,
                                                          const std::string& where)>& fn) const = 0;
};

// One inline entry from the TOML file, with its location for error messages.
struct InlineEntry {
    std::string pattern;  // "192.0.2.0/24", "user@example.com", "/^Subject: x/i", ...
    std::string file;
    int line = 0;
};

// Opens "type:/path". Errors name the file and line of the offending entry.
Result<std::unique_ptr<Table>> open_table(std::string_view spec, KeyKind kind);

// Builds a table from inline entries: for KeyKind::ip CIDR blocks or addresses; for
// address/text exact keys (case-insensitive) or "/regex/flags" in regexp_table syntax;
// for header "/regex/flags" only.
Result<std::unique_ptr<Table>> make_inline_table(const std::vector<InlineEntry>& entries,
                                                 KeyKind kind, std::string label);

// True when `spec` looks like a table reference ("cidr:/x", "pcre:/x", ...), as opposed to an
// inline pattern. Inline IPv6 ("2001:db8::/32") and regexes ("/x/") are not references.
bool is_table_reference(std::string_view spec);

}  // namespace paasmilter
