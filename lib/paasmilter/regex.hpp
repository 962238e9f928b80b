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

#include <memory>
#include <optional>
#include <string>
#include <string_view>

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

}  // namespace paasmilter
