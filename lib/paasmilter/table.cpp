#include "paasmilter/table.hpp"
#include "paasmilter/text.hpp"
#include "paasmilter/unique_fd.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <system_error>
#include <unordered_map>
#include <utility>

#include "paasmilter/ip.hpp"
#include "paasmilter/prefix_trie.hpp"
#include "paasmilter/regex.hpp"

namespace paasmilter {
namespace {

constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();

constexpr std::string_view kSupportedTypes = "cidr:, pcre:, regexp:, texthash:";

// Every Postfix table type, so that "hash:/x" or "ldap:/x" is recognised as a table
// reference and gets a clear error instead of being taken as an inline pattern.
constexpr std::array<std::string_view, 31> kPostfixTableTypes = {
    "btree",     "cdb",    "cidr",   "dbm",      "environ",  "fail",     "hash",    "inline",
    "internal",  "ldap",   "lmdb",   "memcache", "mongodb",  "mysql",    "netinfo", "nis",
    "nisplus",   "pcre",   "pgsql",  "pipemap",  "proxy",    "randmap",  "regexp",  "sdbm",
    "socketmap", "sqlite", "static", "tcp",      "texthash", "unionmap", "unix",
};

// ---------------------------------------------------------------------------------------
// Text helpers. Postfix folds case in ASCII only; so do we for exact keys.

bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}
bool is_alnum(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
char to_lower(char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

std::string_view trim_left(std::string_view text) {
    while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
    return text;
}
std::string_view trim(std::string_view text) {
    text = trim_left(text);
    while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
    return text;
}

void lowercase_into(std::string& out, std::string_view text) {
    out.resize(text.size());
    std::transform(text.begin(), text.end(), out.begin(), to_lower);
}
std::string lowercase(std::string_view text) {
    std::string out;
    lowercase_into(out, text);
    return out;
}

// Calls probe(lowercased text): in a buffer on the stack for the usual short keys
// (certificate names, logins), so that a lookup allocates nothing.
template <class Probe>
void probe_lowercase(std::string_view text, Probe&& probe) {
    std::array<char, 256> local;
    if (text.size() <= local.size()) {
        std::transform(text.begin(), text.end(), local.begin(), to_lower);
        probe(std::string_view(local.data(), text.size()));
        return;
    }
    probe(lowercase(text));
}

std::string location(std::string_view file, int line) {
    char number[16];
    const int digits = std::snprintf(number, sizeof number, "%d", line);
    std::string out;
    out.reserve(file.size() + 1 + static_cast<std::size_t>(digits));
    out.append(file);
    out += ':';
    out.append(number, static_cast<std::size_t>(digits));
    return out;
}

// "word rest of line" -> {"word", "rest of line"}.
std::pair<std::string_view, std::string_view> split_word(std::string_view text) {
    text = trim_left(text);
    std::size_t end = 0;
    while (end < text.size() && !is_space(text[end])) ++end;
    return {text.substr(0, end), trim(text.substr(end))};
}

// Postfix's test for "if"/"endif": the word, case-insensitive, not followed by [A-Za-z0-9].
bool starts_with_keyword(std::string_view text, std::string_view keyword) {
    if (text.size() < keyword.size()) return false;
    for (std::size_t i = 0; i < keyword.size(); ++i) {
        if (to_lower(text[i]) != keyword[i]) return false;
    }
    return text.size() == keyword.size() || !is_alnum(text[keyword.size()]);
}

// Postfix negation prefix: any number of '!' (each one toggles), then optional blanks.
bool take_negation(std::string_view& text) {
    bool negated = false;
    while (!text.empty() && text.front() == '!') {
        negated = !negated;
        text.remove_prefix(1);
    }
    text = trim_left(text);
    return negated;
}

Error located(Error error, const std::string& file, int line) {
    error.file = file;
    error.line = line;
    return error;
}

struct TransparentHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view text) const noexcept {
        return std::hash<std::string_view>{}(text);
    }
};
// Lowercased key -> entry index. Heterogeneous lookup: no std::string per probe.
using KeyIndex = std::unordered_map<std::string, std::uint32_t, TransparentHash, std::equal_to<>>;

// Lowercased key -> entry index for big texthash: tables: one flat open-addressing array of
// (hash, key, index) slots over one arena of key text, at most half full. A lookup reads
// one slot (rarely two) and one key, where a node-based map reads a bucket, a node and the
// key's own allocation: three cache misses in a 10,000-entry table.
class FlatKeyIndex {
  public:
    // The index stored for `key`; `index` is stored when there was none (and returned).
    std::uint32_t emplace(std::string_view key, std::uint32_t index) {
        if ((count_ + 1) * 2 > slots_.size()) grow();
        const std::uint64_t hash = hash_of(key);
        for (std::size_t k = hash & mask_;; k = (k + 1) & mask_) {
            Slot& slot = slots_[k];
            if (slot.index == kNone) {
                slot = Slot{static_cast<std::uint32_t>(hash),
                            static_cast<std::uint32_t>(arena_.size()),
                            static_cast<std::uint32_t>(key.size()), index};
                arena_.append(key);
                ++count_;
                return index;
            }
            if (matches(slot, hash, key)) return slot.index;
        }
    }
    // kNone when absent.
    std::uint32_t find(std::string_view key) const {
        if (count_ == 0) return kNone;
        const std::uint64_t hash = hash_of(key);
        for (std::size_t k = hash & mask_;; k = (k + 1) & mask_) {
            const Slot& slot = slots_[k];
            if (slot.index == kNone) return kNone;
            if (matches(slot, hash, key)) return slot.index;
        }
    }

  private:
    struct Slot {
        std::uint32_t hash = 0;  // low half of the key's hash
        std::uint32_t offset = 0;
        std::uint32_t length = 0;
        std::uint32_t index = kNone;  // kNone: empty
    };

    static std::uint64_t hash_of(std::string_view key) {
        return std::hash<std::string_view>{}(key);
    }
    bool matches(const Slot& slot, std::uint64_t hash, std::string_view key) const {
        return slot.hash == static_cast<std::uint32_t>(hash) && slot.length == key.size() &&
               std::string_view(arena_).substr(slot.offset, slot.length) == key;
    }
    void grow() {
        std::vector<Slot> old = std::move(slots_);
        slots_.assign(old.empty() ? 16 : old.size() * 2, Slot{});
        mask_ = slots_.size() - 1;
        for (const Slot& slot : old) {
            if (slot.index == kNone) continue;
            const std::string_view key(arena_.data() + slot.offset, slot.length);
            std::size_t k = hash_of(key) & mask_;
            while (slots_[k].index != kNone) k = (k + 1) & mask_;
            slots_[k] = slot;
        }
    }

    std::vector<Slot> slots_;
    std::size_t mask_ = 0;
    std::size_t count_ = 0;
    std::string arena_;
};

// Right-hand sides and locations of a big table's entries, each distinct value and file kept
// once: a 100,000-line table holds a handful of route names and one path, not 100,000
// copies of each, so it loads and frees faster and a lookup touches one small entry. The
// "file:line" text is spelled out only for the entry asked for.
class EntryFacts {
  public:
    struct Ref {
        std::uint32_t value = 0;
        std::uint32_t file = 0;
        int line = 0;  // 0: the file string is the whole location ("inline:label")
    };

    Ref add(std::string_view value, std::string_view file, int line) {
        Ref ref{intern(values_, value_index_, value), 0, line};
        if (files_.empty() || files_.back() != file) files_.emplace_back(file);
        ref.file = static_cast<std::uint32_t>(files_.size() - 1);
        return ref;
    }
    const std::string& value(const Ref& ref) const { return values_[ref.value]; }
    std::string where(const Ref& ref) const {
        return ref.line > 0 ? location(files_[ref.file], ref.line) : files_[ref.file];
    }
    TableMatch match(const Ref& ref) const { return TableMatch{value(ref), where(ref)}; }
    // Once every entry is in: the index that deduplicates values is no longer needed.
    void finish() { KeyIndex().swap(value_index_); }

  private:
    static std::uint32_t intern(std::vector<std::string>& strings, KeyIndex& index,
                                std::string_view text) {
        if (const auto it = index.find(text); it != index.end()) return it->second;
        const auto id = static_cast<std::uint32_t>(strings.size());
        strings.emplace_back(text);
        index.emplace(std::string(text), id);
        return id;
    }

    std::vector<std::string> values_;
    KeyIndex value_index_;
    std::vector<std::string> files_;
};

std::string_view kind_plural(KeyKind kind) {
    switch (kind) {
        case KeyKind::ip:
            return "client addresses";
        case KeyKind::address:
            return "envelope addresses";
        case KeyKind::text:
            return "names";
        case KeyKind::header:
            return "headers";
    }
    return "keys";
}

// ---------------------------------------------------------------------------------------
// Reading table source files.

std::string errno_text(int error) {
    return std::error_code(error, std::generic_category()).message();
}

Result<std::string> read_whole_file(const std::string& path, std::string_view spec) {
    UniqueFd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (file.get() < 0)
        return make_error("cannot open " + std::string(spec) + ": " + errno_text(errno));
    std::string content;
    char chunk[65536];
    for (;;) {
        const ssize_t got = ::read(file.get(), chunk, sizeof chunk);
        if (got == 0) break;
        if (got < 0) {
            if (errno == EINTR) continue;
            return make_error("cannot read " + std::string(spec) + ": " + errno_text(errno));
        }
        content.append(chunk, static_cast<std::size_t>(got));
    }
    return content;
}

struct LogicalLine {
    std::string text;  // trimmed; continuation lines appended with their leading blanks
    int line = 0;      // first physical line
};

// The syntax shared by Postfix table sources: blank lines and lines whose first non-blank
// character is '#' are ignored; a line starting with whitespace continues the previous
// logical line. CRLF line ends and a missing final newline are accepted.
Result<std::vector<LogicalLine>> logical_lines(std::string_view content, const std::string& path) {
    constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";
    if (content.substr(0, kUtf8Bom.size()) == kUtf8Bom) content.remove_prefix(kUtf8Bom.size());

    std::vector<LogicalLine> lines;
    int line_number = 0;
    std::size_t start = 0;
    while (start < content.size()) {
        std::size_t end = content.find('\n', start);
        if (end == std::string_view::npos) end = content.size();
        std::string_view physical = content.substr(start, end - start);
        start = end + 1;
        ++line_number;

        if (!physical.empty() && physical.back() == '\r') physical.remove_suffix(1);
        if (physical.find('\0') != std::string_view::npos) {
            return make_error("line contains a NUL byte", path, line_number);
        }
        const std::string_view content_text = trim(physical);
        if (content_text.empty() || content_text.front() == '#') continue;
        if (is_space(physical.front())) {
            if (lines.empty()) {
                return make_error(
                    "line starts with whitespace, but there is no previous line to continue", path,
                    line_number);
            }
            lines.back().text.append(physical);
        } else {
            lines.push_back(LogicalLine{std::string(physical), line_number});
        }
    }
    for (auto& line : lines) line.text = std::string(trim(line.text));
    return lines;
}

// ---------------------------------------------------------------------------------------
// regexp_table(5) / pcre_table(5) patterns: "/body/flags", any non-alphanumeric delimiter.

enum class Dialect { regexp, pcre };

struct PatternSpec {
    std::string body;
    RegexOptions options;
    bool want_match = true;  // false for "!/pattern/"
};

// Parses an optionally negated delimited pattern with flags at the front of `text` and
// advances `text` past it. Flags end at whitespace or at '!' (the second pattern of the
// old "/one/!/two/" form).
Result<PatternSpec> take_pattern(std::string_view& text, Dialect dialect) {
    PatternSpec spec;
    spec.want_match = !take_negation(text);
    if (text.empty()) return make_error("missing /pattern/");
    const char delimiter = text.front();
    if (is_alnum(delimiter) || delimiter == '\\') {
        return make_error("expected /pattern/, found " + quoted(text));
    }
    std::size_t end = 1;
    while (end < text.size() && text[end] != delimiter) {
        if (text[end] == '\\' && end + 1 < text.size()) ++end;  // an escaped delimiter
        ++end;
    }
    if (end >= text.size()) {
        return make_error("no closing delimiter '" + std::string(1, delimiter) + "' in " +
                          quoted(text));
    }
    spec.body = std::string(text.substr(1, end - 1));
    text.remove_prefix(end + 1);

    // Postfix flags toggle; only "i" is on by default.
    bool newline_sensitive = false;  // regexp "m": POSIX REG_NEWLINE
    while (!text.empty() && !is_space(text.front()) && text.front() != '!') {
        const char flag = text.front();
        text.remove_prefix(1);
        RegexOptions& o = spec.options;
        if (flag == 'i') {
            o.caseless = !o.caseless;
        } else if (dialect == Dialect::regexp && flag == 'm') {
            newline_sensitive = !newline_sensitive;
        } else if (dialect == Dialect::regexp && flag == 'x') {
            return make_error(
                "flag 'x' (POSIX basic regular expression syntax) is not supported: regexp: "
                "patterns are always extended regular expressions");
        } else if (dialect == Dialect::pcre && flag == 'm') {
            o.multiline = !o.multiline;
        } else if (dialect == Dialect::pcre && flag == 's') {
            o.dotall = !o.dotall;
        } else if (dialect == Dialect::pcre && flag == 'x') {
            o.extended = !o.extended;
        } else if (dialect == Dialect::pcre && flag == 'A') {
            o.anchored = !o.anchored;
        } else if (dialect == Dialect::pcre && flag == 'E') {
            o.dollar_end_only = !o.dollar_end_only;
        } else if (dialect == Dialect::pcre && flag == 'U') {
            o.ungreedy = !o.ungreedy;
        } else if (dialect == Dialect::pcre && flag == 'X') {
            // PCRE_EXTRA (unknown escapes are errors) is always on in PCRE2.
        } else {
            return make_error(
                "unknown flag '" + std::string(1, flag) + "' after " +
                (dialect == Dialect::regexp ? "regexp" : "pcre") + " pattern " +
                quoted(std::string(1, delimiter) + spec.body + std::string(1, delimiter)) +
                (dialect == Dialect::regexp ? " (valid: i, m)"
                                            : " (valid: i, m, s, x, A, E, U, X)"));
        }
    }
    if (dialect == Dialect::regexp) {
        // POSIX semantics: without REG_NEWLINE '.' matches a newline and '$' matches only at
        // the very end; with it, '^'/'$' match at line breaks and '.' stops at them.
        spec.options.multiline = newline_sensitive;
        spec.options.dotall = !newline_sensitive;
        spec.options.dollar_end_only = !newline_sensitive;
    }
    return spec;
}

// A regexp/pcre right-hand side must be literal: we do not implement $1 substitution.
// "$$" is Postfix's escape for a literal '$'.
Result<std::string> literal_result(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
        const char next = i + 1 < text.size() ? text[i + 1] : '\0';
        if (text[i] == '$' && next == '$') {
            out += '$';
            ++i;
        } else if (text[i] == '$' && ((next >= '0' && next <= '9') || next == '{' || next == '(')) {
            return make_error("result " + quoted(text) +
                              " uses $-substitution, which is not supported: results must be "
                              "literal (write $$ for a '$')");
        } else {
            out += text[i];
        }
    }
    return out;
}

// ---------------------------------------------------------------------------------------
// access(5) search order for an envelope address.

std::string_view strip_angle_brackets(std::string_view address) {
    if (address.size() >= 2 && address.front() == '<' && address.back() == '>') {
        address = address.substr(1, address.size() - 2);
    }
    return address;
}

// Calls visit(candidate) for each key to try for `address`, best first, until visit
// returns true. Candidates are views into `buffer` (the lowercased address), so no
// allocation happens per candidate. For "User@X.Y.Z":
//   "user@x.y.z", ["@x.y.z"], "x.y.z", "y.z", ".y.z", "z", ".z", "user@"
// "@domain" (that domain only) is an inline-list form, not an access(5) one. A parent
// domain is tried bare (parent_domain_matches_subdomains) and with a leading dot. The
// null sender is looked up as "<>" (smtpd_null_access_lookup_key).
template <class Visit>
void visit_address_keys(std::string& buffer, std::string_view address, bool with_at_domain,
                        Visit&& visit) {
    lowercase_into(buffer, strip_angle_brackets(address));
    if (buffer.empty()) {
        visit(std::string_view("<>"));
        return;
    }
    const std::size_t at = buffer.rfind('@');
    if (at == std::string::npos) {
        // A bare local part ("postmaster"): itself, then "postmaster@".
        buffer += '@';
        const std::string_view with_at = buffer;
        if (visit(with_at.substr(0, with_at.size() - 1))) return;
        visit(with_at);
        return;
    }
    const std::string_view full = buffer;
    if (visit(full)) return;
    const std::string_view domain = full.substr(at + 1);
    if (!domain.empty()) {
        if (with_at_domain && visit(full.substr(at))) return;
        if (visit(domain)) return;
        // Address literals ("[192.0.2.1]") have no parent domains.
        if (domain.front() != '[') {
            for (std::size_t dot = domain.find('.'); dot != std::string_view::npos;
                 dot = domain.find('.', dot + 1)) {
                const std::string_view parent = domain.substr(dot + 1);
                if (parent.empty()) break;
                if (visit(parent)) return;
                if (visit(domain.substr(dot))) return;
            }
        }
    }
    if (at > 0) visit(full.substr(0, at + 1));
}

// ---------------------------------------------------------------------------------------
// cidr: tables.
//
// Rules are kept in file order. Positive rules go into the prefix trie keyed by their rule
// index; a lookup collects every rule whose prefix covers the address (at most one node
// per address bit) and keeps the lowest index whose enclosing if-blocks also hold
// (checking an if-block is one prefix comparison per nesting level). Negated rules
// cannot live in a trie (they match everything outside a prefix), so they are kept in a
// separate ascending list and checked linearly, but only those listed before the best
// positive candidate. Tables are mostly positive rules, so a lookup stays O(address bits).

struct CidrCondition {
    IpNetwork network;
    bool negated = false;

    // As in Postfix, a pattern of the other address family never matches, negated or not.
    bool holds(const IpAddress& address) const {
        return address.family == network.address.family && network.contains(address) != negated;
    }
};

class CidrTable final : public Table {
  public:
    CidrTable(std::string description, bool has_results)
        : description_(std::move(description)), has_results_(has_results) {}

    // Returns the new block's index, to pass as `enclosing_if` of the rules inside it.
    std::uint32_t add_if(CidrCondition condition, std::uint32_t enclosing_if) {
        if_blocks_.push_back(IfBlock{condition, enclosing_if});
        return static_cast<std::uint32_t>(if_blocks_.size() - 1);
    }

    // `line` 0: `file` is the whole location.
    void add_rule(CidrCondition condition, std::uint32_t enclosing_if, std::string_view value,
                  std::string_view file, int line) {
        const auto index = static_cast<std::uint32_t>(rules_.size());
        if (condition.negated) {
            negated_rules_.push_back(index);
        } else {
            trie_.insert(condition.network, index);
        }
        rules_.push_back(Rule{condition, enclosing_if});
        rule_facts_.push_back(facts_.add(value, file, line));
    }
    void finish() {
        trie_.finish();
        facts_.finish();
    }

    std::optional<TableMatch> lookup(std::string_view key) const override {
        const auto address = parse_ip_address(key);
        if (!address) return std::nullopt;

        std::uint32_t best = kNone;
        if (if_blocks_.empty()) {
            best = trie_.lowest_match(*address);
        } else {
            trie_.for_each_match(*address, [&](std::uint32_t index) {
                if (index < best && if_blocks_hold(rules_[index].enclosing_if, *address)) {
                    best = index;
                }
            });
        }
        for (const std::uint32_t index : negated_rules_) {
            if (index >= best) break;
            const Rule& rule = rules_[index];
            if (rule.condition.holds(*address) && if_blocks_hold(rule.enclosing_if, *address)) {
                best = index;
                break;
            }
        }
        if (best == kNone) return std::nullopt;
        return facts_.match(rule_facts_[best]);
    }

    const std::string& describe() const override { return description_; }

    void for_each_result(
        const std::function<void(const std::string&, const std::string&)>& fn) const override {
        if (!has_results_) return;
        for (const EntryFacts::Ref& facts : rule_facts_)
            fn(facts_.value(facts), facts_.where(facts));
    }

  private:
    struct IfBlock {
        CidrCondition condition;
        std::uint32_t enclosing_if;  // kNone at top level
    };
    struct Rule {
        CidrCondition condition;
        std::uint32_t enclosing_if;
    };

    bool if_blocks_hold(std::uint32_t block, const IpAddress& address) const {
        for (; block != kNone; block = if_blocks_[block].enclosing_if) {
            if (!if_blocks_[block].condition.holds(address)) return false;
        }
        return true;
    }

    std::string description_;
    bool has_results_;
    std::vector<Rule> rules_;
    // By rule, apart from rules_: a lookup reads only this, and a 100,000-entry table's
    // array of 12-byte entries stays in the CPU's cache where 48-byte rules would not.
    std::vector<EntryFacts::Ref> rule_facts_;
    std::vector<IfBlock> if_blocks_;
    std::vector<std::uint32_t> negated_rules_;  // ascending rule indexes
    PrefixTrie trie_;
    EntryFacts facts_;
};

Result<std::unique_ptr<Table>> build_cidr_table(const std::vector<LogicalLine>& lines,
                                                const std::string& path, std::string spec) {
    auto table = std::make_unique<CidrTable>(std::move(spec), true);
    struct OpenIf {
        std::uint32_t block;
        int line;
    };
    std::vector<OpenIf> open_ifs;
    const auto current_if = [&] { return open_ifs.empty() ? kNone : open_ifs.back().block; };

    for (const LogicalLine& line : lines) {
        std::string_view text = line.text;
        if (starts_with_keyword(text, "endif")) {
            if (!trim(text.substr(5)).empty()) {
                return make_error("unexpected text after endif", path, line.line);
            }
            if (open_ifs.empty()) return make_error("endif without matching if", path, line.line);
            open_ifs.pop_back();
            continue;
        }
        const bool is_if = starts_with_keyword(text, "if");
        if (is_if) text = trim_left(text.substr(2));
        const bool negated = take_negation(text);
        const auto [pattern, rest] = split_word(text);
        if (pattern.empty()) return make_error("missing address pattern", path, line.line);
        auto network = parse_ip_network(pattern);
        if (!network) return located(network.error(), path, line.line);
        const CidrCondition condition{*network, negated};

        if (is_if) {
            if (!rest.empty()) {
                return make_error("unexpected text " + quoted(rest) +
                                      " after if pattern (a line starting with whitespace "
                                      "continues the previous line: do not indent inside if)",
                                  path, line.line);
            }
            open_ifs.push_back(OpenIf{table->add_if(condition, current_if()), line.line});
            continue;
        }
        if (rest.empty()) {
            return make_error("missing result after " + quoted(pattern), path, line.line);
        }
        table->add_rule(condition, current_if(), rest, path, line.line);
    }
    if (!open_ifs.empty()) {
        return make_error("if without matching endif", path, open_ifs.back().line);
    }
    table->finish();
    return std::unique_ptr<Table>(std::move(table));
}

// ---------------------------------------------------------------------------------------
// regexp: and pcre: tables: a flat list evaluated in file order. An if-block is one entry
// that knows where its block ends, so a failed condition skips the block in one step.
//
// A thousand header checks tried one by one cost a thousand PCRE2 calls per header, so a
// table of more than a few entries also keeps a literal prefilter. Most patterns need some
// literal text in any match ("/^From:.*@spam\.example/" needs "spam.example"); one pass of
// a multi-literal matcher over the key finds the entries whose text is there. An entry
// whose first pattern must match (not "!/.../") and whose text is absent cannot hold, so
// it is skipped without running PCRE2; all other entries, and every if, stay "always"
// candidates. The walk visits candidates in file order, so the first match and the
// if-block skips are exactly those of the plain walk.

struct RegexCondition {
    Regex regex;
    bool want_match;
    RequiredLiterals literals;  // of `regex`, for the prefilter

    // nullopt when PCRE2 gave up on this key: neither the pattern nor its negation holds.
    std::optional<bool> holds(std::string_view key) const {
        const auto matched = regex.try_match(key);
        if (!matched) return std::nullopt;
        return *matched == want_match;
    }
};

// Entry indexes the prefilter found for one key: a few, so kept inline up to a point.
class CandidateList {
  public:
    void push_back(std::uint32_t index) {
        if (overflow_.empty() && size_ < inline_.size()) {
            inline_[size_++] = index;
            return;
        }
        if (overflow_.empty()) overflow_.assign(inline_.begin(), inline_.begin() + size_);
        overflow_.push_back(index);
        ++size_;
    }
    // Sorted, without repeats; call once, after the last push_back.
    std::span<const std::uint32_t> sorted_unique() {
        std::uint32_t* begin = overflow_.empty() ? inline_.data() : overflow_.data();
        std::sort(begin, begin + size_);
        size_ = static_cast<std::size_t>(std::unique(begin, begin + size_) - begin);
        return {begin, size_};
    }

  private:
    // Left uninitialised: only [0, size_) is ever read, and zeroing it would cost more than
    // the rest of a typical lookup's bookkeeping.
    std::array<std::uint32_t, 16> inline_;
    std::vector<std::uint32_t> overflow_;  // all of them once inline_ is full
    std::size_t size_ = 0;
};

class RegexTable final : public Table {
  public:
    struct Entry {
        bool is_if = false;
        RegexCondition first;
        std::optional<RegexCondition> second;  // legacy "/one/!/two/ result"
        std::uint32_t block_end = kNone;       // is_if: index of the first entry after endif
        std::string value;
        std::string where;
        bool filtered = false;  // skipped unless the prefilter found its literal text
    };

    // Below this many entries the plain walk costs about what the matcher's pass does.
    static constexpr std::size_t kPrefilterMinEntries = 8;

    explicit RegexTable(std::string description) : description_(std::move(description)) {}

    std::uint32_t add(Entry entry) {
        entries_.push_back(std::move(entry));
        return static_cast<std::uint32_t>(entries_.size() - 1);
    }
    std::uint32_t size() const { return static_cast<std::uint32_t>(entries_.size()); }
    void set_block_end(std::uint32_t if_entry, std::uint32_t end) {
        entries_[if_entry].block_end = end;
    }

    // Builds the prefilter once every entry is in. Each filtered entry contributes one
    // factor of its first pattern: the one whose strings the fewest other entries share
    // (so a table of "/^Subject:.*word/" lines is filtered by the words, not by
    // "subject:"), then the longest. Strings shorter than the matcher takes ("/\bsex\b/")
    // leave the entry unfiltered, unless another factor qualifies.
    void build_prefilter() {
        if (entries_.size() < kPrefilterMinEntries) return;
        std::unordered_map<std::string, std::uint32_t, TransparentHash, std::equal_to<>> sharing;
        for (const Entry& entry : entries_) {
            std::vector<std::string_view> seen;
            for (const auto& factor : entry.first.literals.factors) {
                for (const std::string& text : factor) {
                    if (std::find(seen.begin(), seen.end(), text) != seen.end()) continue;
                    seen.push_back(text);
                    ++sharing[text];
                }
            }
        }
        std::vector<std::pair<std::string, std::uint32_t>> literals;
        std::vector<std::uint32_t> always;
        for (std::uint32_t i = 0; i < entries_.size(); ++i) {
            Entry& entry = entries_[i];
            const std::vector<std::string>* best = nullptr;
            std::pair<std::uint64_t, std::size_t> best_cost{};  // (sharing, -shortest)
            if (entry.first.want_match) {
                for (const auto& factor : entry.first.literals.factors) {
                    std::uint64_t shared = 0;
                    std::size_t shortest = std::numeric_limits<std::size_t>::max();
                    for (const std::string& text : factor) {
                        shared += sharing.find(text)->second;
                        shortest = std::min(shortest, text.size());
                    }
                    if (shortest < LiteralMatcher::kMinLength) continue;
                    const auto cost =
                        std::make_pair(shared, std::numeric_limits<std::size_t>::max() - shortest);
                    if (!best || cost < best_cost) {
                        best = &factor;
                        best_cost = cost;
                    }
                }
            }
            entry.filtered = best != nullptr;
            if (entry.filtered) {
                for (const std::string& text : *best) literals.emplace_back(text, i);
            }
            if (!entry.filtered || entry.is_if) always.push_back(i);
        }
        for (Entry& entry : entries_) {  // no longer needed
            entry.first.literals = {};
            if (entry.second) entry.second->literals = {};
        }
        auto matcher = LiteralMatcher::build(literals);
        if (!matcher) {
            for (Entry& entry : entries_) entry.filtered = false;
            return;
        }
        prefilter_.emplace(Prefilter{std::move(*matcher), std::move(always)});
    }

    std::optional<TableMatch> lookup(std::string_view key) const override {
        std::string storage;
        if (!prefilter_) return walk_all(valid_utf8(key, storage));

        // The prefilter reads the key as it is: its literals are ASCII, and making the key
        // valid UTF-8 (for PCRE2) keeps every valid character, so it finds the same text.
        // Most keys run no regex at all, and skip that pass.
        CandidateList found;
        prefilter_->matcher.for_each_match(key, [&](std::uint32_t i) { found.push_back(i); });
        bool sanitised = false;
        const auto evaluate_entry = [&](const Entry& entry) {
            if (!sanitised) {
                key = valid_utf8(key, storage);
                sanitised = true;
            }
            return evaluate(entry, key);
        };
        const std::span<const std::uint32_t> hits = found.sorted_unique();
        const std::vector<std::uint32_t>& always = prefilter_->always;
        auto a = always.begin();
        auto h = hits.begin();
        for (;;) {
            const std::uint32_t next_always = a != always.end() ? *a : kNone;
            const std::uint32_t next_hit = h != hits.end() ? *h : kNone;
            const std::uint32_t i = std::min(next_always, next_hit);
            if (i == kNone) return std::nullopt;
            const bool hit = i == next_hit;
            if (i == next_always) ++a;
            if (hit) ++h;
            const Entry& entry = entries_[i];
            const bool holds = (hit || !entry.filtered) && evaluate_entry(entry);
            if (entry.is_if) {
                if (!holds) {  // skip the block: no candidate inside it may be tried
                    a = std::lower_bound(a, always.end(), entry.block_end);
                    h = std::lower_bound(h, hits.end(), entry.block_end);
                }
            } else if (holds) {
                return TableMatch{entry.value, entry.where};
            }
        }
    }

    const std::string& describe() const override { return description_; }

    void for_each_result(
        const std::function<void(const std::string&, const std::string&)>& fn) const override {
        for (const Entry& entry : entries_) {
            if (!entry.is_if) fn(entry.value, entry.where);
        }
    }

  private:
    struct Prefilter {
        LiteralMatcher matcher;             // literal text -> entry index
        std::vector<std::uint32_t> always;  // ascending: unfiltered entries and every if
    };

    static bool evaluate(const Entry& entry, std::string_view key) {
        bool holds = entry.first.holds(key).value_or(false);
        if (holds && entry.second) holds = entry.second->holds(key).value_or(false);
        return holds;
    }

    // Every entry in file order: small tables, or no prefilter could be built.
    std::optional<TableMatch> walk_all(std::string_view key) const {
        std::uint32_t i = 0;
        while (i < entries_.size()) {
            const Entry& entry = entries_[i];
            const bool holds = evaluate(entry, key);
            if (entry.is_if) {
                i = holds ? i + 1 : entry.block_end;
            } else if (holds) {
                return TableMatch{entry.value, entry.where};
            } else {
                ++i;
            }
        }
        return std::nullopt;
    }

    std::string description_;
    std::vector<Entry> entries_;
    std::optional<Prefilter> prefilter_;
};

Result<RegexCondition> compile_condition(const PatternSpec& spec) {
    auto regex = Regex::compile(spec.body, spec.options);
    if (!regex) return regex.error();
    return RegexCondition{std::move(*regex), spec.want_match,
                          required_literals(spec.body, spec.options)};
}

// Parses and compiles the pattern at the front of `text`; errors get file:line.
Result<RegexCondition> take_condition(std::string_view& text, Dialect dialect,
                                      const std::string& path, int line) {
    auto spec = take_pattern(text, dialect);
    if (!spec) return located(spec.error(), path, line);
    auto condition = compile_condition(*spec);
    if (!condition) return located(condition.error(), path, line);
    return condition;
}

Result<std::unique_ptr<Table>> build_regex_table(const std::vector<LogicalLine>& lines,
                                                 const std::string& path, std::string spec,
                                                 Dialect dialect) {
    auto table = std::make_unique<RegexTable>(std::move(spec));
    struct OpenIf {
        std::uint32_t entry;
        int line;
    };
    std::vector<OpenIf> open_ifs;

    for (const LogicalLine& line : lines) {
        std::string_view text = line.text;
        if (starts_with_keyword(text, "endif")) {
            if (!trim(text.substr(5)).empty()) {
                return make_error("unexpected text after endif", path, line.line);
            }
            if (open_ifs.empty()) return make_error("endif without matching if", path, line.line);
            table->set_block_end(open_ifs.back().entry, table->size());
            open_ifs.pop_back();
            continue;
        }
        if (starts_with_keyword(text, "if")) {
            text = trim_left(text.substr(2));
            auto condition = take_condition(text, dialect, path, line.line);
            if (!condition) return condition.error();
            if (!trim(text).empty()) {
                return make_error("unexpected text " + quoted(trim(text)) +
                                      " after if pattern (a line starting with whitespace "
                                      "continues the previous line: do not indent inside if)",
                                  path, line.line);
            }
            RegexTable::Entry entry{true, std::move(*condition), std::nullopt, kNone, {}, {},
                                    false};
            open_ifs.push_back(OpenIf{table->add(std::move(entry)), line.line});
            continue;
        }
        if (is_alnum(text.front())) {
            return make_error(
                "expected \"/pattern/ result\", \"if /pattern/\" or \"endif\", found " +
                    quoted(text),
                path, line.line);
        }
        auto first = take_condition(text, dialect, path, line.line);
        if (!first) return first.error();
        std::optional<RegexCondition> second;
        if (!text.empty() && text.front() == '!') {
            auto condition = take_condition(text, dialect, path, line.line);
            if (!condition) return condition.error();
            second = std::move(*condition);
        }
        const std::string_view result_text = trim(text);
        if (result_text.empty()) {
            return make_error("missing result after pattern", path, line.line);
        }
        if (!is_space(text.front())) {
            return make_error("unexpected " + quoted(text) + " after the second pattern", path,
                              line.line);
        }
        auto value = literal_result(result_text);
        if (!value) return located(value.error(), path, line.line);
        table->add(RegexTable::Entry{false, std::move(*first), std::move(second), kNone,
                                     std::move(*value), location(path, line.line), false});
    }
    if (!open_ifs.empty()) {
        return make_error("if without matching endif", path, open_ifs.back().line);
    }
    table->build_prefilter();
    return std::unique_ptr<Table>(std::move(table));
}

// ---------------------------------------------------------------------------------------
// texthash: tables: "key value", keys folded to lowercase, access(5) search order.

class TextHashTable final : public Table {
  public:
    TextHashTable(std::string description, KeyKind kind)
        : description_(std::move(description)), kind_(kind) {}

    // Returns the index of an earlier entry with the same key, or kNone when added.
    std::uint32_t add(std::string key, std::string_view value, std::string_view file, int line) {
        const auto index = static_cast<std::uint32_t>(entries_.size());
        if (const std::uint32_t earlier = index_.emplace(key, index); earlier != index) {
            return earlier;
        }
        entries_.push_back(facts_.add(value, file, line));
        return kNone;
    }
    std::string where(std::uint32_t index) const { return facts_.where(entries_[index]); }
    void finish() { facts_.finish(); }

    std::optional<TableMatch> lookup(std::string_view key) const override {
        std::uint32_t found = kNone;
        const auto probe = [&](std::string_view candidate) {
            found = index_.find(candidate);
            return found != kNone;
        };
        std::string buffer;
        switch (kind_) {
            case KeyKind::ip:
                lookup_ip(buffer, key, probe);
                break;
            case KeyKind::address:
                visit_address_keys(buffer, key, false, probe);
                break;
            case KeyKind::text:
            case KeyKind::header:
                probe_lowercase(key, probe);
                break;
        }
        if (found == kNone) return std::nullopt;
        return facts_.match(entries_[found]);
    }

    const std::string& describe() const override { return description_; }

    void for_each_result(
        const std::function<void(const std::string&, const std::string&)>& fn) const override {
        for (const EntryFacts::Ref& entry : entries_) fn(facts_.value(entry), facts_.where(entry));
    }

  private:
    // access(5) for client addresses: the address, then for IPv4 "1.2.3", "1.2", "1".
    // IPv6 is looked up exactly. An IPv4-mapped address is looked up as IPv4.
    template <class Probe>
    static void lookup_ip(std::string& buffer, std::string_view key, Probe& probe) {
        const auto address = parse_ip_address(key);
        if (address && address->family == IpFamily::v4) {
            buffer = address->to_string();
        } else {
            lowercase_into(buffer, key);
        }
        if (probe(std::string_view(buffer))) return;
        if (!address || address->family != IpFamily::v4) return;
        std::string_view prefix = buffer;
        for (auto dot = prefix.rfind('.'); dot != std::string_view::npos; dot = prefix.rfind('.')) {
            prefix = prefix.substr(0, dot);
            if (probe(prefix)) return;
        }
    }

    std::string description_;
    KeyKind kind_;
    std::vector<EntryFacts::Ref> entries_;
    FlatKeyIndex index_;
    EntryFacts facts_;
};

Result<std::unique_ptr<Table>> build_texthash_table(const std::vector<LogicalLine>& lines,
                                                    const std::string& path, std::string spec,
                                                    KeyKind kind) {
    auto table = std::make_unique<TextHashTable>(std::move(spec), kind);
    for (const LogicalLine& line : lines) {
        const auto [key, value] = split_word(line.text);
        if (value.empty()) {
            return make_error("missing value after key " + quoted(key), path, line.line);
        }
        const std::uint32_t earlier = table->add(lowercase(key), value, path, line.line);
        if (earlier != kNone) {
            return make_error("duplicate key " + quoted(lowercase(key)) + " (first at " +
                                  table->where(earlier) + ")",
                              path, line.line);
        }
    }
    table->finish();
    return std::unique_ptr<Table>(std::move(table));
}

// ---------------------------------------------------------------------------------------
// Inline lists from the TOML file for address/text/header keys: exact keys in a hash map
// plus "/regex/flags" entries; the first listed entry that matches wins.

class InlinePatternTable final : public Table {
  public:
    InlinePatternTable(std::string label, KeyKind kind)
        : description_("inline:" + std::move(label)), kind_(kind) {}

    void add_exact(std::string key, std::string where) {
        // A repeated key keeps its first (lowest) index.
        index_.emplace(std::move(key), static_cast<std::uint32_t>(where_.size()));
        where_.push_back(std::move(where));
    }
    void add_regex(Regex regex, std::string where) {
        regexes_.push_back(
            IndexedRegex{static_cast<std::uint32_t>(where_.size()), std::move(regex)});
        where_.push_back(std::move(where));
    }

    std::optional<TableMatch> lookup(std::string_view key) const override {
        std::uint32_t best = kNone;
        if (!index_.empty()) {
            const auto probe = [&](std::string_view candidate) {
                if (const auto it = index_.find(candidate); it != index_.end()) {
                    best = std::min(best, it->second);
                }
                return best == 0;  // nothing can beat the first entry
            };
            if (kind_ == KeyKind::address) {
                std::string buffer;
                visit_address_keys(buffer, key, true, probe);
            } else {
                probe_lowercase(key, probe);
            }
        }
        std::string storage;
        if (!regexes_.empty() && regexes_.front().index < best) key = valid_utf8(key, storage);
        for (const IndexedRegex& entry : regexes_) {
            if (entry.index >= best) break;
            if (entry.regex.matches(key)) {
                best = entry.index;
                break;
            }
        }
        if (best == kNone) return std::nullopt;
        return TableMatch{std::string(), where_[best]};
    }

    const std::string& describe() const override { return description_; }

    // Inline entries have no right-hand side to check.
    void for_each_result(
        const std::function<void(const std::string&, const std::string&)>&) const override {}

  private:
    struct IndexedRegex {
        std::uint32_t index;
        Regex regex;
    };

    std::string description_;
    KeyKind kind_;
    KeyIndex index_;
    std::vector<IndexedRegex> regexes_;  // ascending index
    std::vector<std::string> where_;     // by entry index
};

// How an inline exact key is stored, matching the candidates of visit_address_keys.
std::string inline_exact_key(std::string_view pattern, KeyKind kind) {
    if (kind != KeyKind::address) return lowercase(pattern);
    const std::string_view address = strip_angle_brackets(pattern);
    return address.empty() ? std::string("<>") : lowercase(address);
}

bool is_db_type(std::string_view type) {
    return type == "hash" || type == "btree" || type == "lmdb" || type == "cdb" || type == "dbm" ||
           type == "sdbm";
}

std::string db_type_error(std::string_view type) {
    std::string_view format = "DBM";
    if (type == "hash" || type == "btree") format = "Berkeley DB";
    if (type == "lmdb") format = "LMDB";
    if (type == "cdb") format = "CDB";
    return std::string(type) + ": tables are " + std::string(format) +
           " files built by postmap; use texthash: on the source file instead";
}

}  // namespace

Result<std::unique_ptr<Table>> open_table(std::string_view spec, KeyKind kind) {
    const auto colon = spec.find(':');
    if (colon == std::string_view::npos || !is_table_reference(spec)) {
        return make_error(quoted(spec) +
                          " is not a table reference (type:path); supported types: " +
                          std::string(kSupportedTypes));
    }
    const std::string_view type = spec.substr(0, colon);
    const std::string path(spec.substr(colon + 1));
    if (is_db_type(type)) return make_error(db_type_error(type));
    if (type != "cidr" && type != "regexp" && type != "pcre" && type != "texthash") {
        return make_error("unsupported table type \"" + std::string(type) + ":\" in " +
                          quoted(spec) + "; supported types: " + std::string(kSupportedTypes));
    }
    if (path.empty()) return make_error("missing file name in " + quoted(spec));
    if (type == "cidr" && kind != KeyKind::ip) {
        return make_error(std::string(spec) + ": cidr: tables match client addresses only, not " +
                          std::string(kind_plural(kind)));
    }
    if (type == "texthash" && kind == KeyKind::header) {
        return make_error(std::string(spec) +
                          ": header patterns need a regexp: or pcre: table, not texthash:");
    }

    auto content = read_whole_file(path, spec);
    if (!content) return content.error();
    auto lines = logical_lines(*content, path);
    if (!lines) return lines.error();

    if (type == "cidr") return build_cidr_table(*lines, path, std::string(spec));
    if (type == "regexp")
        return build_regex_table(*lines, path, std::string(spec), Dialect::regexp);
    if (type == "pcre") return build_regex_table(*lines, path, std::string(spec), Dialect::pcre);
    return build_texthash_table(*lines, path, std::string(spec), kind);
}

Result<std::unique_ptr<Table>> make_inline_table(const std::vector<InlineEntry>& entries,
                                                 KeyKind kind, std::string label) {
    const auto where_of = [&](const InlineEntry& entry) {
        return entry.file.empty() ? "inline:" + label : location(entry.file, entry.line);
    };

    if (kind == KeyKind::ip) {
        auto table = std::make_unique<CidrTable>("inline:" + label, false);
        const std::string inline_label = "inline:" + label;
        for (const InlineEntry& entry : entries) {
            auto network = parse_ip_network(trim(entry.pattern));
            if (!network) return located(network.error(), entry.file, entry.line);
            table->add_rule(CidrCondition{*network, false}, kNone, "",
                            entry.file.empty() ? std::string_view(inline_label) : entry.file,
                            entry.file.empty() ? 0 : entry.line);
        }
        table->finish();
        return std::unique_ptr<Table>(std::move(table));
    }

    auto table = std::make_unique<InlinePatternTable>(label, kind);
    for (const InlineEntry& entry : entries) {
        std::string_view pattern = trim(entry.pattern);
        if (pattern.empty() || pattern.front() != '/') {
            if (kind == KeyKind::header) {
                return make_error("header patterns must be /regex/, found " + quoted(pattern),
                                  entry.file, entry.line);
            }
            table->add_exact(inline_exact_key(pattern, kind), where_of(entry));
            continue;
        }
        auto spec = take_pattern(pattern, Dialect::regexp);
        if (!spec) return located(spec.error(), entry.file, entry.line);
        if (!trim(pattern).empty()) {
            return make_error("unexpected text " + quoted(trim(pattern)) + " after /pattern/flags",
                              entry.file, entry.line);
        }
        auto regex = Regex::compile(spec->body, spec->options);
        if (!regex) return located(regex.error(), entry.file, entry.line);
        table->add_regex(std::move(*regex), where_of(entry));
    }
    return std::unique_ptr<Table>(std::move(table));
}

bool is_table_reference(std::string_view spec) {
    const auto colon = spec.find(':');
    if (colon == std::string_view::npos) return false;
    const std::string_view type = spec.substr(0, colon);
    return std::find(kPostfixTableTypes.begin(), kPostfixTableTypes.end(), type) !=
           kPostfixTableTypes.end();
}

}  // namespace paasmilter
