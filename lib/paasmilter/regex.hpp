// A compiled PCRE2 pattern (never std::regex: too slow, and no UTF-8 safety).
//
// Patterns are compiled with PCRE2_UTF | PCRE2_MATCH_INVALID_UTF, so subjects that are not
// valid UTF-8 (header bytes, certificate names) are matched safely instead of failing.
// match() is const and may be called concurrently on one Regex from many threads.
#pragma once

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "paasmilter/result.hpp"

namespace paasmilter {

// Compile options, named after the pcre_table(5) flags. Case-insensitive by default, as
// in Postfix tables.
struct RegexOptions {
    bool caseless = true;          // PCRE2_CASELESS
    bool multiline = false;        // PCRE2_MULTILINE: ^ and $ also at embedded newlines
    bool dotall = false;           // PCRE2_DOTALL: . also matches a newline
    bool extended = false;         // PCRE2_EXTENDED: whitespace and # comments ignored
    bool anchored = false;         // PCRE2_ANCHORED
    bool dollar_end_only = false;  // PCRE2_DOLLAR_ENDONLY: $ never before a final newline
    bool ungreedy = false;         // PCRE2_UNGREEDY
};

// `text` itself when it is valid UTF-8; otherwise a copy in `storage` in which every byte
// that is not part of a valid sequence is replaced by U+FFFD. PCRE2 (MATCH_INVALID_UTF)
// never lets a pattern item match an invalid byte, so without this a Latin-1 "Störung"
// would stop /^Subject:.*ALERT/ from matching. Tables sanitise a key once per lookup.
std::string_view valid_utf8(std::string_view text, std::string& storage);

class Regex {
  public:
    // Errors name the pattern, PCRE2's message and the offset in the pattern.
    static Result<Regex> compile(std::string_view pattern, const RegexOptions& options = {});

    // true/false for a match or not; nullopt when PCRE2 gave up (match or depth limit),
    // so that callers do not mistake a failure for "did not match" under negation.
    std::optional<bool> try_match(std::string_view subject) const;
    // A failed match counts as no match.
    bool matches(std::string_view subject) const { return try_match(subject).value_or(false); }

    const std::string& pattern() const { return pattern_; }
    bool jit_compiled() const { return jit_compiled_; }

  private:
    struct CodeDeleter {
        void operator()(pcre2_code* code) const noexcept { pcre2_code_free(code); }
    };
    using CodePtr = std::unique_ptr<pcre2_code, CodeDeleter>;

    Regex(CodePtr code, std::string pattern, bool jit_compiled)
        : code_(std::move(code)), pattern_(std::move(pattern)), jit_compiled_(jit_compiled) {}

    CodePtr code_;
    std::string pattern_;
    bool jit_compiled_ = false;
};

// Literal text that every match of a pattern contains, so that a table trying many patterns
// on one key can skip those whose text is absent: `factors` are ANDed, the strings of one
// factor ORed (every match contains, for each factor, at least one of its strings). Strings
// are ASCII, lowercased, at most kMaxRequiredLiteral bytes; compare them with LiteralMatcher,
// which folds the key the way PCRE2 folds case. Conservative: syntax this does not follow
// (extended mode, \Q...\E, option settings, verbs, conditionals, back references, ...) gives
// no factors, never a wrong one. `pattern` must be one Regex::compile accepted.
struct RequiredLiterals {
    std::vector<std::vector<std::string>> factors;
};
inline constexpr std::size_t kMaxRequiredLiteral = 32;
RequiredLiterals required_literals(std::string_view pattern, const RegexOptions& options);

// Which of many literal strings occur in a text, in one pass over it. Each literal is
// anchored by one of its 4-byte windows (the one fewest literals share); the scan hashes
// the text's every 4-byte window into a bitmap of those anchors, each position on its own,
// so the CPU overlaps them (about 2 cycles a byte, where an automaton's chain of
// dependent loads takes 5 or more), and checks a literal in full only where its anchor
// turned up.
//
// Matching ignores ASCII case and reads U+212A KELVIN SIGN as 'k' and U+017F LATIN SMALL
// LETTER LONG S as 's': the only characters PCRE2 (UTF, caseless) takes for ASCII ones,
// so that a literal required by a caseless pattern is found whenever the pattern can
// match. It may also report a literal where the text differs in a byte other than a
// letter's case ('@' for '`', ...): a filter, not a verdict.
class LiteralMatcher {
  public:
    static constexpr std::size_t kMinLength = 4;

    // `literals`: (lowercase ASCII string of kMinLength bytes or more, id) pairs; strings
    // and ids may repeat. nullopt when there are none, or one is too short.
    static std::optional<LiteralMatcher> build(
        const std::vector<std::pair<std::string, std::uint32_t>>& literals);

    // Calls report(id) for every occurrence of every literal in `text` (an id may come
    // several times, in no particular order), and maybe for a few more (see above).
    template <class Report>
    void for_each_match(std::string_view text, Report&& report) const {
        // The text as it is; then, only if it holds KELVIN SIGN or LONG S, again with them
        // spelled 'k' and 's' (an occurrence in the first pass is one in the second).
        if (!scan(text, report)) return;
        std::string storage;
        const std::string_view folded = folded_non_ascii(text, storage);
        if (folded.data() != text.data()) scan(folded, report);
    }

  private:
    static constexpr int kBitmapBits = 16;
    static constexpr std::uint32_t kFoldCase = 0x20202020u;

    struct Literal {
        std::string text;  // each byte | 0x20
        std::uint32_t ids_begin = 0;
        std::uint32_t ids_end = 0;
    };
    struct Anchor {
        std::uint32_t literal;
        std::uint32_t offset;  // of the anchor window in the literal
    };
    struct Bucket {
        std::uint32_t gram = 0;
        std::uint32_t begin = 0;  // anchors_[begin, end): literals anchored by this gram
        std::uint32_t end = 0;
    };

    LiteralMatcher() = default;

    // Reports the literals in `text`; returns whether it has non-ASCII bytes.
    template <class Report>
    bool scan(std::string_view text, Report& report) const {
        const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
        const std::size_t size = text.size();
        std::uint64_t high_bits = 0;
        for (std::size_t i = next_anchor(bytes, size, 0, high_bits); i < size;
             i = next_anchor(bytes, size, i + 1, high_bits)) {
            const Bucket* bucket = find_bucket(gram_at(bytes + i));
            if (!bucket) continue;  // another gram with the same bit
            for (std::uint32_t a = bucket->begin; a < bucket->end; ++a) {
                const Anchor& anchor = anchors_[a];
                const Literal& literal = literals_[anchor.literal];
                if (anchor.offset > i || i - anchor.offset + literal.text.size() > size) continue;
                if (!equal_folded(bytes + i - anchor.offset, literal.text)) continue;
                for (std::uint32_t k = literal.ids_begin; k < literal.ids_end; ++k) report(ids_[k]);
            }
        }
        return (high_bits & 0x8080808080808080u) != 0;
    }

    static std::uint32_t gram_at(const unsigned char* p) {
        std::uint32_t gram;
        std::memcpy(&gram, p, sizeof gram);
        return gram | kFoldCase;
    }
    static std::uint32_t bit_of(std::uint32_t gram) {
        return (gram * 0x9E3779B1u) >> (32 - kBitmapBits);
    }
    static bool equal_folded(const unsigned char* text, const std::string& literal) {
        for (std::size_t k = 0; k < literal.size(); ++k) {
            if ((text[k] | 0x20) != static_cast<unsigned char>(literal[k])) return false;
        }
        return true;
    }
    // `text`, or a copy in `storage` with KELVIN SIGN and LONG S spelled 'k' and 's'.
    static std::string_view folded_non_ascii(std::string_view text, std::string& storage);
    // The first position from `from` on whose 4-byte window has its bit set, or `size`;
    // ORs the bytes it reads into `high_bits`. Out of line: the hot loop.
    std::size_t next_anchor(const unsigned char* bytes, std::size_t size, std::size_t from,
                            std::uint64_t& high_bits) const;
    const Bucket* find_bucket(std::uint32_t gram) const;

    std::vector<std::uint64_t> bitmap_;
    std::vector<Bucket> buckets_;  // open addressing by gram; end == 0: empty
    std::vector<Anchor> anchors_;
    std::vector<Literal> literals_;
    std::vector<std::uint32_t> ids_;
};

}  // namespace paasmilter
