#include "paasmilter/regex.hpp"

namespace paasmilter {
namespace {

struct MatchDataDeleter {
    void operator()(pcre2_match_data* data) const noexcept { pcre2_match_data_free(data); }
};

// One match block per thread, reused for every pattern: matching only needs to know
// whether there is a match, and one ovector pair is enough for that (a smaller ovector
// than the pattern wants only makes pcre2_match return 0, still a match). Per-thread
// scratch keeps match() allocation-free and safe to call concurrently.
pcre2_match_data* thread_match_data() {
    thread_local const std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
        pcre2_match_data_create(1, nullptr));
    return data.get();
}

std::uint32_t compile_flags(const RegexOptions& options) {
    // MATCH_INVALID_UTF: invalid UTF-8 in a subject just never matches a character,
    // instead of making every match fail. NEVER_BACKSLASH_C: \C could split a character.
    std::uint32_t flags = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | PCRE2_NEVER_BACKSLASH_C;
    if (options.caseless) flags |= PCRE2_CASELESS;
    if (options.multiline) flags |= PCRE2_MULTILINE;
    if (options.dotall) flags |= PCRE2_DOTALL;
    if (options.extended) flags |= PCRE2_EXTENDED;
    if (options.anchored) flags |= PCRE2_ANCHORED;
    if (options.dollar_end_only) flags |= PCRE2_DOLLAR_ENDONLY;
    if (options.ungreedy) flags |= PCRE2_UNGREEDY;
    return flags;
}

// Length of the valid UTF-8 sequence starting at text[i], or 0 when it is invalid
// (stray continuation byte, truncated, overlong, surrogate, beyond U+10FFFF).
std::size_t utf8_sequence_length(std::string_view text, std::size_t i) {
    const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char lead = byte(i);
    if (lead < 0x80) return 1;
    std::size_t length = 0;
    if (lead >= 0xC2 && lead <= 0xDF) {
        length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        length = 3;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        length = 4;
    } else {
        return 0;
    }
    if (i + length > text.size()) return 0;
    for (std::size_t k = 1; k < length; ++k) {
        if ((byte(i + k) & 0xC0) != 0x80) return 0;
    }
    const unsigned char second = byte(i + 1);
    if (lead == 0xE0 && second < 0xA0) return 0;  // overlong
    if (lead == 0xED && second > 0x9F) return 0;  // UTF-16 surrogate
    if (lead == 0xF0 && second < 0x90) return 0;  // overlong
    if (lead == 0xF4 && second > 0x8F) return 0;  // above U+10FFFF
    return length;
}

}  // namespace

std::string_view valid_utf8(std::string_view text, std::string& storage) {
    std::size_t i = 0;
    std::size_t length = 0;
    while (i < text.size() && (length = utf8_sequence_length(text, i)) != 0) i += length;
    if (i == text.size()) return text;

    constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
    storage.assign(text.substr(0, i));
    while (i < text.size()) {
        length = utf8_sequence_length(text, i);
        if (length == 0) {
            storage.append(kReplacement);
            ++i;
        } else {
            storage.append(text.substr(i, length));
            i += length;
        }
    }
    return storage;
}

Result<Regex> Regex::compile(std::string_view pattern, const RegexOptions& options) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    CodePtr code(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                               compile_flags(options), &error_code, &error_offset, nullptr));
    if (!code) {
        PCRE2_UCHAR message[256];
        if (pcre2_get_error_message(error_code, message, sizeof message) < 0) {
            return make_error("bad regular expression \"" + std::string(pattern) +
                              "\": PCRE2 error " + std::to_string(error_code));
        }
        return make_error("bad regular expression \"" + std::string(pattern) +
                          "\": " + reinterpret_cast<const char*>(message) + " at offset " +
                          std::to_string(error_offset));
    }
    // JIT is an optimisation only: unsupported platforms or patterns fall back silently.
    const bool jit = pcre2_jit_compile(code.get(), PCRE2_JIT_COMPLETE) == 0;
    return Regex(std::move(code), std::string(pattern), jit);
}

std::optional<bool> Regex::try_match(std::string_view subject) const {
    pcre2_match_data* data = thread_match_data();
    if (data == nullptr) return std::nullopt;
    // An empty string_view may have a null data(), which older PCRE2 versions reject.
    const char* text = subject.empty() ? "" : subject.data();
    const auto run = [&](std::uint32_t options) {
        return pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(text), subject.size(), 0,
                           options, data, nullptr);
    };
    int rc = run(0);
    // The JIT's default 32 KiB stack can run out on deep backtracking where the
    // interpreter (heap-based) still succeeds.
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) rc = run(PCRE2_NO_JIT);
    if (rc >= 0) return true;
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    return std::nullopt;
}

}  // namespace paasmilter
