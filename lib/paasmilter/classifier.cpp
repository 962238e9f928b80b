#include "paasmilter/classifier.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace paasmilter {

std::string common_name_from_dn(std::string_view dn) {
    // Sendmail writes "/C=US/O=Contoso/CN=printer-42"; the CN is the last "/CN=" component.
    auto pos = dn.rfind("/CN=");
    if (pos == std::string_view::npos) return {};
    std::string_view rest = dn.substr(pos + 4);
    return std::string(rest.substr(0, rest.find('/')));
}

std::string strip_angle_brackets(std::string_view address) {
    auto trim = [](std::string_view s) {
        while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
        while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
        return s;
    };
    address = trim(address);
    if (address.size() >= 2 && address.front() == '<' && address.back() == '>') {
        address = trim(address.substr(1, address.size() - 2));
    }
    return std::string(address);
}

namespace {

constexpr std::string_view kDunno = "DUNNO";

// The first source of a condition that matches `key` (DUNNO counts as not found).
std::optional<ConditionHit> lookup(const Condition& condition, std::string_view key) {
    for (const auto& table : condition.sources) {
        auto match = table->lookup(key);
        if (!match || match->value == kDunno) continue;
        return ConditionHit{condition.field, std::string(key), table->describe(),
                            std::move(match->where), std::move(match->value)};
    }
    return std::nullopt;
}

// Postfix sends a certificate's CN; Sendmail the whole DN, which we try first, then its CN.
std::optional<ConditionHit> lookup_certificate_name(const Condition& condition,
                                                    const std::string& name) {
    if (name.empty()) return std::nullopt;
    if (auto hit = lookup(condition, name)) return hit;
    if (name.front() == '/') {
        std::string cn = common_name_from_dn(name);
        if (!cn.empty()) return lookup(condition, cn);
    }
    return std::nullopt;
}

// The first '\r' or '\n' in [cursor, end), or end. Eight bytes at a time: header values are
// short, so a call per value costs more than the scan.
const char* find_line_break(const char* cursor, const char* end) {
    constexpr std::uint64_t kOnes = 0x0101010101010101u;
    constexpr std::uint64_t kHighs = 0x8080808080808080u;
    const auto has_byte = [](std::uint64_t word, unsigned char byte) {
        const std::uint64_t x = word ^ (kOnes * byte);
        return ((x - kOnes) & ~x & kHighs) != 0;  // some byte of x is zero
    };
    for (std::uint64_t word = 0; end - cursor >= 8; cursor += 8) {
        std::memcpy(&word, cursor, sizeof word);
        if (has_byte(word, '\r') || has_byte(word, '\n')) break;
    }
    while (cursor < end && *cursor != '\r' && *cursor != '\n') ++cursor;
    return cursor;
}

// "Name: value" into `line` (its buffer reused from header to header), unfolded (RFC 5322
// 2.2.3) so that a pattern sees the header as one line.
void unfold_header_line(const HeaderField& header, std::string& line) {
    line.assign(header.name);
    line += ": ";
    const char* cursor = header.value.data();
    const char* const end = cursor + header.value.size();
    while (cursor < end) {
        const char* const stop = find_line_break(cursor, end);
        line.append(cursor, stop);
        cursor = stop == end ? end : stop + 1;
    }
}

std::optional<ConditionHit> evaluate(const Condition& condition, const Rule& rule,
                                     const Transaction& tx) {
    switch (condition.field) {
        case Field::client_addr:
            if (tx.client_addr.empty()) return std::nullopt;
            return lookup(condition, tx.client_addr);
        case Field::client_name:
            if (tx.client_name.empty()) return std::nullopt;
            return lookup(condition, tx.client_name);
        case Field::cert_subject:
            return lookup_certificate_name(condition, tx.cert_subject);
        case Field::cert_issuer:
            return lookup_certificate_name(condition, tx.cert_issuer);
        case Field::cert_fingerprint:
            if (tx.cert_fingerprint.empty()) return std::nullopt;
            return lookup(condition, tx.cert_fingerprint);
        case Field::auth:
            if (tx.auth_user.empty()) return std::nullopt;
            return lookup(condition, tx.auth_user);
        case Field::sender:
            return lookup(condition, tx.sender);
        case Field::recipient: {
            if (tx.recipients.empty()) return std::nullopt;
            std::optional<ConditionHit> first;
            for (const auto& recipient : tx.recipients) {
                auto hit = lookup(condition, recipient);
                if (rule.recipient_match == RecipientMatch::any && hit) return hit;
                if (rule.recipient_match == RecipientMatch::all && !hit) return std::nullopt;
                if (!first) first = std::move(hit);
            }
            return first;
        }
        case Field::header: {
            std::string line;
            line.reserve(256);
            for (const auto& header : tx.headers) {
                unfold_header_line(header, line);
                if (auto hit = lookup(condition, line)) return hit;
            }
            return std::nullopt;
        }
    }
    return std::nullopt;
}

}  // namespace

Decision classify(const Config& config, const Transaction& tx) {
    Decision decision;
    std::vector<ConditionHit> hits;  // of the rule being tried; its buffer reused
    for (const auto& rule : config.rules) {
        hits.clear();
        bool all_hold = true;
        for (const auto& condition : rule.conditions) {
            auto hit = evaluate(condition, rule, tx);
            if (!hit) {
                all_hold = false;
                break;
            }
            hits.push_back(std::move(*hit));
        }
        if (!all_hold) continue;
        decision.rule = &rule;
        decision.hits = std::move(hits);
        // A table result that names a route overrides the rule's route, as an access
        // table's action does; the load-time checks guarantee one of them exists.
        for (const auto& hit : decision.hits) {
            if (const Route* route = config.find_route(hit.result)) {
                decision.route = route;
                break;
            }
        }
        if (!decision.route) decision.route = config.find_route(rule.route);
        return decision;
    }
    if (!config.default_route.empty()) {
        decision.route = config.find_route(config.default_route);
        decision.default_route = decision.route != nullptr;
    }
    return decision;
}

std::optional<SenderChoice> map_sender(const SenderMap& map, const Transaction& tx) {
    static const Rule kNoRule;  // the fields of a sender map never look at recipients
    for (const auto& condition : map.conditions) {
        if (auto hit = evaluate(condition, kNoRule, tx)) {
            std::string address = hit->result;
            return SenderChoice{std::move(address), std::move(*hit)};
        }
    }
    return std::nullopt;
}

}  // namespace paasmilter
