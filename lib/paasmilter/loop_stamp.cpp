#include "paasmilter/loop_stamp.hpp"

#include <algorithm>
#include <charconv>

#include <fmt/format.h>

#include "paasmilter/crypto.hpp"

namespace paasmilter {

namespace {

// Versions the signed text: a later format signs something else and never verifies as this.
constexpr std::string_view kDomain = "paas-milter-loop-1";
constexpr size_t kSignatureChars = 43;  // base64url of 32 bytes, no padding
constexpr int kMaxHop = 999;

bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

std::string_view trim(std::string_view text) {
    while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
    while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
    return text;
}

std::vector<std::string_view> split(std::string_view text, char separator) {
    std::vector<std::string_view> parts;
    for (;;) {
        const size_t at = text.find(separator);
        parts.push_back(text.substr(0, at));
        if (at == std::string_view::npos) return parts;
        text.remove_prefix(at + 1);
    }
}

bool is_base64url(std::string_view text) {
    return std::all_of(text.begin(), text.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '-' || c == '_';
    });
}

std::optional<LoopStamp> parse_stamp(std::string_view text) {
    LoopStamp stamp;
    bool seen_gw = false, seen_route = false, seen_hop = false, seen_sig = false;
    for (std::string_view part : split(text, ';')) {
        part = trim(part);
        const size_t equals = part.find('=');
        if (equals == std::string_view::npos) return std::nullopt;
        const std::string_view key = trim(part.substr(0, equals));
        const std::string_view value = trim(part.substr(equals + 1));
        auto take = [](bool& seen) {
            if (seen) return false;
            seen = true;
            return true;
        };
        if (key == "gw") {
            if (!take(seen_gw) || !valid_loop_name(value)) return std::nullopt;
            stamp.gateway = value;
        } else if (key == "route") {
            if (!take(seen_route) || !valid_loop_name(value)) return std::nullopt;
            stamp.route = value;
        } else if (key == "hop") {
            if (!take(seen_hop) || value.empty() || value.size() > 3 || value.front() == '0' ||
                !std::all_of(value.begin(), value.end(),
                             [](char c) { return c >= '0' && c <= '9'; }))
                return std::nullopt;
            auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), stamp.hop);
            if (ec != std::errc() || end != value.data() + value.size()) return std::nullopt;
        } else if (key == "sig") {
            if (!take(seen_sig) || value.size() != kSignatureChars || !is_base64url(value))
                return std::nullopt;
            stamp.signature = value;
        } else {
            return std::nullopt;
        }
    }
    if (!seen_gw || !seen_route || !seen_hop || !seen_sig) return std::nullopt;
    return stamp;
}

Result<std::string> signature(const LoopSettings& settings, std::string_view gateway,
                              std::string_view route, int hop, std::string_view message_id) {
    const std::string text =
        fmt::format("{}\n{}\n{}\n{}\n{}", kDomain, gateway, route, hop, message_id);
    auto mac = hmac_sha256(settings.secret, text);
    if (!mac) return mac.error();
    return base64url_encode(*mac);
}

// Compares every byte whatever the first difference: the time taken says nothing about how
// much of a forged signature was right.
bool constant_time_equal(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    unsigned char difference = 0;
    for (size_t i = 0; i < a.size(); ++i) difference |= static_cast<unsigned char>(a[i] ^ b[i]);
    return difference == 0;
}

}  // namespace

const char* to_string(LoopAction action) {
    switch (action) {
        case LoopAction::pass:
            return "pass";
        case LoopAction::reject:
            return "reject";
        case LoopAction::tempfail:
            return "tempfail";
        case LoopAction::hold:
            return "hold";
    }
    return "?";
}

bool valid_loop_name(std::string_view name) {
    return !name.empty() && name.size() <= 255 && std::all_of(name.begin(), name.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '.' || c == '_' || c == '-';
    });
}

std::string format_loop_stamp(const LoopStamp& stamp) {
    return fmt::format("gw={}; route={}; hop={}; sig={}", stamp.gateway, stamp.route, stamp.hop,
                       stamp.signature);
}

std::optional<std::vector<LoopStamp>> parse_loop_field(std::string_view value) {
    std::vector<LoopStamp> stamps;
    for (std::string_view part : split(value, ',')) {
        auto stamp = parse_stamp(trim(part));
        if (!stamp) return std::nullopt;
        stamps.push_back(std::move(*stamp));
    }
    return stamps;
}

std::string loop_message_id(std::string_view raw_message_id) {
    std::string out;
    for (char c : raw_message_id)
        if (!is_space(c)) out += c;
    return out;
}

Result<LoopStamp> sign_loop_stamp(const LoopSettings& settings, std::string_view route, int hop,
                                  std::string_view message_id) {
    if (!valid_loop_name(settings.gateway_id) || !valid_loop_name(route))
        return make_error("loop stamp: gateway id or route name not usable in a stamp");
    if (hop < 1 || hop > kMaxHop) return make_error("loop stamp: hop out of range");
    auto sig = signature(settings, settings.gateway_id, route, hop, message_id);
    if (!sig) return sig.error();
    return LoopStamp{settings.gateway_id, std::string(route), hop, std::move(*sig)};
}

bool verify_loop_stamp(const LoopSettings& settings, const LoopStamp& stamp,
                       std::string_view message_id) {
    if (settings.secret.empty()) return false;
    auto expected = signature(settings, stamp.gateway, stamp.route, stamp.hop, message_id);
    return expected && constant_time_equal(*expected, stamp.signature);
}

LoopCheck check_loop_stamps(const LoopSettings& settings,
                            const std::vector<std::optional<std::string>>& fields,
                            std::string_view raw_message_id) {
    LoopCheck check;
    check.message_id = loop_message_id(raw_message_id);
    for (size_t i = 0; i < fields.size(); ++i) {
        std::optional<std::vector<LoopStamp>> stamps;
        if (i < kMaxLoopFields && fields[i] && fields[i]->size() <= kMaxLoopFieldBytes)
            stamps = parse_loop_field(*fields[i]);
        const bool valid =
            stamps && std::all_of(stamps->begin(), stamps->end(), [&](const auto& s) {
                return verify_loop_stamp(settings, s, check.message_id);
            });
        if (!valid) {
            check.forged_fields.insert(check.forged_fields.begin(), static_cast<int>(i + 1));
            continue;
        }
        // Rewritten in the canonical form: no folding or stray white space goes on to a
        // service (ACS wants a header value on one line).
        std::string kept;
        for (const auto& stamp : *stamps) {
            if (!kept.empty()) kept += ", ";
            kept += format_loop_stamp(stamp);
        }
        check.kept_fields.push_back(std::move(kept));
        for (auto& stamp : *stamps) {
            // The same stamp twice (a field duplicated on the way) is one hop.
            const bool seen = std::any_of(
                check.valid.begin(), check.valid.end(),
                [&](const LoopStamp& other) { return other.signature == stamp.signature; });
            if (!seen) check.valid.push_back(std::move(stamp));
        }
    }
    return check;
}

std::string describe_loop_stamps(const std::vector<LoopStamp>& stamps) {
    std::string out;
    for (const auto& stamp : stamps) {
        if (!out.empty()) out += ", ";
        out += stamp.gateway + "/" + stamp.route;
    }
    return out;
}

}  // namespace paasmilter
