#include "paasmilter/regex.hpp"

#include <algorithm>
#include <cstring>
#include <unordered_map>

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
    // Header lines are mostly ASCII: eight bytes at a time until a non-ASCII one.
    constexpr std::uint64_t kHighBits = 0x8080808080808080u;
    for (std::uint64_t word = 0; i + sizeof word <= text.size(); i += sizeof word) {
        std::memcpy(&word, text.data() + i, sizeof word);
        if (word & kHighBits) break;
    }
    while (i < text.size() && static_cast<unsigned char>(text[i]) < 0x80) ++i;
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

// ---------------------------------------------------------------------------------------
// Required literals: a small recursive-descent reading of PCRE2 syntax that keeps runs of
// literal characters every match must pass through, and gives up on anything else.

namespace {

using Factor = std::vector<std::string>;  // any one of these strings

bool is_ascii_alnum(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
char ascii_lower(char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

// For a choice between alternatives: the factor whose shortest string is longest.
const Factor* best_single_factor(const std::vector<Factor>& factors) {
    const Factor* best = nullptr;
    std::size_t best_shortest = 0;
    for (const Factor& factor : factors) {
        std::size_t shortest = std::string::npos;
        for (const std::string& text : factor) shortest = std::min(shortest, text.size());
        if (!best || shortest > best_shortest ||
            (shortest == best_shortest && factor.size() < best->size())) {
            best = &factor;
            best_shortest = shortest;
        }
    }
    return best;
}

class LiteralParser {
  public:
    explicit LiteralParser(std::string_view pattern) : p_(pattern) {}

    std::vector<Factor> parse() {
        std::vector<Factor> factors = alternation();
        if (failed_ || i_ != p_.size()) return {};
        return factors;
    }

  private:
    static constexpr int kNoQuantifier = -1;

    char peek(std::size_t ahead = 0) const {
        return i_ + ahead < p_.size() ? p_[i_ + ahead] : '\0';
    }
    bool at_end() const { return i_ >= p_.size(); }

    // Branches up to an unmatched ')' or the end. One branch: its factors. Several: one
    // factor, the union of one factor from each, or none if a branch has none.
    std::vector<Factor> alternation() {
        std::vector<std::vector<Factor>> branches;
        for (;;) {
            branches.push_back(sequence());
            if (failed_ || peek() != '|') break;
            ++i_;
        }
        if (failed_) return {};
        if (branches.size() == 1) return std::move(branches.front());
        Factor any;
        for (const auto& branch : branches) {
            const Factor* factor = best_single_factor(branch);
            if (!factor) return {};
            any.insert(any.end(), factor->begin(), factor->end());
        }
        std::sort(any.begin(), any.end());
        any.erase(std::unique(any.begin(), any.end()), any.end());
        return {std::move(any)};
    }

    // Items up to '|', ')' or the end; every literal run and every group factor is required.
    std::vector<Factor> sequence() {
        std::vector<Factor> factors;
        std::string run;
        const auto end_run = [&] {
            if (!run.empty()) factors.push_back({run.substr(0, kMaxRequiredLiteral)});
            run.clear();
        };
        while (!at_end() && !failed_) {
            const char c = peek();
            if (c == '|' || c == ')') break;
            if (c == '(') {
                end_run();
                std::vector<Factor> inner = group();
                if (failed_) break;
                if (quantifier() != 0) {
                    for (Factor& factor : inner) factors.push_back(std::move(factor));
                }
                continue;
            }
            if (c == '\\') {
                const char next = peek(1);
                if (next == '\0') {
                    failed_ = true;
                    break;
                }
                if (!is_ascii_alnum(next)) {  // an escaped metacharacter: itself
                    i_ += 2;
                    literal(next, run, end_run);
                    continue;
                }
                // One-character atoms and assertions; everything else (\x, \Q, \p, back
                // references, \g, \k, \c, \N{...}, ...) is beyond this reading.
                if (std::string_view("dDsSwWhHvVRXbBAzZGKaefnrtN").find(next) ==
                        std::string_view::npos ||
                    (next == 'N' && peek(2) == '{')) {
                    failed_ = true;
                    break;
                }
                i_ += 2;
                end_run();
                quantifier();
                continue;
            }
            if (c == '[') {
                end_run();
                skip_class();
                quantifier();
                continue;
            }
            if (c == '.' || c == '^' || c == '$') {
                ++i_;
                end_run();
                quantifier();
                continue;
            }
            if (c == '*' || c == '+' || c == '?' || c == '{') {
                failed_ = true;  // a quantifier with nothing before it, or an unusual brace
                break;
            }
            if (static_cast<unsigned char>(c) >= 0x80) {  // one UTF-8 character: an atom
                ++i_;
                while (!at_end() && (static_cast<unsigned char>(peek()) & 0xC0) == 0x80) ++i_;
                end_run();
                quantifier();
                continue;
            }
            ++i_;
            literal(c, run, end_run);
        }
        end_run();
        return factors;
    }

    // A literal character just read: part of the run unless a quantifier makes it optional;
    // a quantifier ends the run (what follows may repeat it).
    template <class EndRun>
    void literal(char c, std::string& run, EndRun&& end_run) {
        const int min = quantifier();
        if (min == kNoQuantifier) {
            run += ascii_lower(c);
            return;
        }
        if (min > 0) run += ascii_lower(c);
        end_run();
    }

    // Reads a quantifier, if any, with its lazy/possessive suffix; returns its minimum, or
    // kNoQuantifier.
    int quantifier() {
        int min = kNoQuantifier;
        const char c = peek();
        if (c == '*' || c == '?') {
            min = 0;
            ++i_;
        } else if (c == '+') {
            min = 1;
            ++i_;
        } else if (c == '{') {
            // {n}, {n,}, {n,m}, {,m} (PCRE2 >= 10.43), blanks allowed. Anything else here
            // would be literal text to PCRE2; rather than model that, give up.
            std::size_t j = i_ + 1;
            int value = 0;
            bool digits_before_comma = false;
            bool comma = false;
            while (j < p_.size() && p_[j] != '}') {
                const char d = p_[j];
                if (d >= '0' && d <= '9') {
                    if (!comma) {
                        digits_before_comma = true;
                        value = std::min(value * 10 + (d - '0'), 1 << 20);
                    }
                } else if (d == ',') {
                    comma = true;
                } else if (d != ' ' && d != '\t') {
                    failed_ = true;
                    return kNoQuantifier;
                }
                ++j;
            }
            if (j >= p_.size()) {
                failed_ = true;
                return kNoQuantifier;
            }
            i_ = j + 1;
            min = digits_before_comma ? value : 0;
        } else {
            return kNoQuantifier;
        }
        if (peek() == '+' || peek() == '?') ++i_;
        return min;
    }

    // '(' ... ')': the factors a match of the group must contain; none for lookaround.
    std::vector<Factor> group() {
        ++i_;  // '('
        bool keep = true;
        if (peek() == '*') {  // verbs, (*positive_lookahead:...), start-of-pattern options
            failed_ = true;
            return {};
        }
        if (peek() == '?') {
            const char kind = peek(1);
            if (kind == ':' || kind == '>' || kind == '|') {
                i_ += 2;
            } else if (kind == '=' || kind == '!') {
                i_ += 2;
                keep = false;
            } else if (kind == '<' && (peek(2) == '=' || peek(2) == '!')) {
                i_ += 3;
                keep = false;
            } else if (kind == '<' || kind == '\'' || (kind == 'P' && peek(2) == '<')) {
                // A named group: skip the name.
                const char close = kind == '\'' ? '\'' : '>';
                const std::size_t end = p_.find(close, i_);
                if (end == std::string_view::npos) {
                    failed_ = true;
                    return {};
                }
                i_ = end + 1;
            } else {
                failed_ = true;  // option settings, comments, conditionals, recursion, ...
                return {};
            }
        }
        std::vector<Factor> inner = alternation();
        if (failed_ || peek() != ')') {
            failed_ = true;
            return {};
        }
        ++i_;
        if (!keep) return {};
        return inner;
    }

    // '[' ... ']', with a leading '^', a leading ']', escapes and [:name:] inside.
    void skip_class() {
        ++i_;
        if (peek() == '^') ++i_;
        if (peek() == ']') ++i_;
        while (!at_end()) {
            const char c = peek();
            if (c == '\\') {
                if (peek(1) == 'Q' || peek(1) == 'E') break;  // failed below
                i_ += 2;
            } else if (c == '[' && (peek(1) == ':' || peek(1) == '.' || peek(1) == '=')) {
                const char kind = peek(1);
                const std::size_t end = p_.find(std::string{kind, ']'}, i_ + 2);
                if (end == std::string_view::npos) break;
                i_ = end + 2;
            } else if (c == ']') {
                ++i_;
                return;
            } else {
                ++i_;
            }
        }
        failed_ = true;
    }

    std::string_view p_;
    std::size_t i_ = 0;
    bool failed_ = false;
};

}  // namespace

RequiredLiterals required_literals(std::string_view pattern, const RegexOptions& options) {
    if (options.extended) return {};  // blanks and # comments would not be literal
    return RequiredLiterals{LiteralParser(pattern).parse()};
}

std::string_view LiteralMatcher::folded_non_ascii(std::string_view text, std::string& storage) {
    constexpr std::string_view kLongS = "\xC5\xBF";       // U+017F
    constexpr std::string_view kKelvin = "\xE2\x84\xAA";  // U+212A
    if (text.find(kLongS) == std::string_view::npos &&
        text.find(kKelvin) == std::string_view::npos) {
        return text;
    }
    storage.clear();
    storage.reserve(text.size());
    for (std::size_t i = 0; i < text.size();) {
        if (text.substr(i, kLongS.size()) == kLongS) {
            storage += 's';
            i += kLongS.size();
        } else if (text.substr(i, kKelvin.size()) == kKelvin) {
            storage += 'k';
            i += kKelvin.size();
        } else {
            storage += text[i++];
        }
    }
    return storage;
}

std::size_t LiteralMatcher::next_anchor(const unsigned char* bytes, std::size_t size,
                                        std::size_t from, std::uint64_t& high_bits) const {
    const std::uint64_t* const bitmap = bitmap_.data();
    const auto marked = [bitmap](std::uint32_t gram) {
        const std::uint32_t bit = bit_of(gram);
        return (bitmap[bit >> 6] >> (bit & 63) & 1) != 0;
    };
    std::uint64_t seen = 0;
    std::size_t i = from;
    // Four windows from each 8-byte load, tested independently.
    for (; i + sizeof(std::uint64_t) <= size; i += 4) {
        std::uint64_t word;
        std::memcpy(&word, bytes + i, sizeof word);
        seen |= word;
        word |= std::uint64_t{kFoldCase} << 32 | kFoldCase;
        const bool m0 = marked(static_cast<std::uint32_t>(word));
        const bool m1 = marked(static_cast<std::uint32_t>(word >> 8));
        const bool m2 = marked(static_cast<std::uint32_t>(word >> 16));
        const bool m3 = marked(static_cast<std::uint32_t>(word >> 24));
        if (m0 | m1 | m2 | m3) [[unlikely]] {
            high_bits |= seen;
            return i + (m0 ? 0 : m1 ? 1 : m2 ? 2 : 3);
        }
    }
    for (; i < size; ++i) {
        seen |= bytes[i];
        if (i + sizeof(std::uint32_t) <= size && marked(gram_at(bytes + i))) {
            high_bits |= seen;
            return i;
        }
    }
    high_bits |= seen;
    return size;
}

const LiteralMatcher::Bucket* LiteralMatcher::find_bucket(std::uint32_t gram) const {
    const std::size_t mask = buckets_.size() - 1;
    for (std::size_t k = (gram * 0x85EBCA6Bu) & mask;; k = (k + 1) & mask) {
        const Bucket& bucket = buckets_[k];
        if (bucket.end == 0) return nullptr;
        if (bucket.gram == gram) return &bucket;
    }
}

std::optional<LiteralMatcher> LiteralMatcher::build(
    const std::vector<std::pair<std::string, std::uint32_t>>& literals) {
    if (literals.empty()) return std::nullopt;
    LiteralMatcher m;
    // Distinct literals, each with its ids.
    std::vector<std::pair<std::string, std::uint32_t>> sorted;
    sorted.reserve(literals.size());
    for (const auto& [text, id] : literals) {
        if (text.size() < kMinLength) return std::nullopt;
        std::string folded = text;
        for (char& c : folded) c = static_cast<char>(c | 0x20);
        sorted.emplace_back(std::move(folded), id);
    }
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
    for (std::size_t i = 0; i < sorted.size(); ++i) {
        if (i == 0 || sorted[i].first != sorted[i - 1].first) {
            const auto begin = static_cast<std::uint32_t>(m.ids_.size());
            m.literals_.push_back(Literal{sorted[i].first, begin, begin});
        }
        m.ids_.push_back(sorted[i].second);
        m.literals_.back().ids_end = static_cast<std::uint32_t>(m.ids_.size());
    }

    // Each literal's anchor: the window the fewest literals contain.
    const auto window = [](const std::string& text, std::size_t at) {
        return gram_at(reinterpret_cast<const unsigned char*>(text.data()) + at);
    };
    std::unordered_map<std::uint32_t, std::uint32_t> sharing;
    for (const Literal& literal : m.literals_) {
        std::vector<std::uint32_t> grams;
        for (std::size_t at = 0; at + kMinLength <= literal.text.size(); ++at) {
            grams.push_back(window(literal.text, at));
        }
        std::sort(grams.begin(), grams.end());
        grams.erase(std::unique(grams.begin(), grams.end()), grams.end());
        for (const std::uint32_t gram : grams) ++sharing[gram];
    }
    std::vector<std::pair<std::uint32_t, Anchor>> anchors;  // (gram, anchor)
    for (std::uint32_t l = 0; l < m.literals_.size(); ++l) {
        const std::string& text = m.literals_[l].text;
        std::size_t best = 0;
        for (std::size_t at = 1; at + kMinLength <= text.size(); ++at) {
            if (sharing[window(text, at)] < sharing[window(text, best)]) best = at;
        }
        anchors.push_back({window(text, best), Anchor{l, static_cast<std::uint32_t>(best)}});
    }
    std::sort(anchors.begin(), anchors.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });

    // The bitmap, and the grams' buckets (a table at most half full).
    m.bitmap_.assign((std::size_t{1} << kBitmapBits) / 64, 0);
    std::size_t bucket_count = 16;
    while (bucket_count < anchors.size() * 2) bucket_count *= 2;
    m.buckets_.resize(bucket_count);
    for (std::size_t i = 0; i < anchors.size();) {
        const std::uint32_t gram = anchors[i].first;
        const auto begin = static_cast<std::uint32_t>(m.anchors_.size());
        for (; i < anchors.size() && anchors[i].first == gram; ++i) {
            m.anchors_.push_back(anchors[i].second);
        }
        const std::uint32_t bit = bit_of(gram);
        m.bitmap_[bit >> 6] |= std::uint64_t{1} << (bit & 63);
        std::size_t k = (gram * 0x85EBCA6Bu) & (bucket_count - 1);
        while (m.buckets_[k].end != 0) k = (k + 1) & (bucket_count - 1);
        m.buckets_[k] = Bucket{gram, begin, static_cast<std::uint32_t>(m.anchors_.size())};
    }
    return m;
}

}  // namespace paasmilter
