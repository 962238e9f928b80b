#include "paasmilter/route_addresses.hpp"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

#include "paasmilter/text.hpp"

namespace paasmilter {

namespace {

std::string_view without_angle_brackets(std::string_view address) {
    if (address.size() >= 2 && address.front() == '<' && address.back() == '>') {
        address = address.substr(1, address.size() - 2);
    }
    return address;
}

// Control characters and DEL never belong in an address the MTA accepted; bytes >= 0x80
// (SMTPUTF8) are carried as they are.
bool printable(std::string_view text) {
    return std::none_of(text.begin(), text.end(),
                        [](unsigned char c) { return c < 0x20 || c == 0x7f; });
}

// Postfix's valid_hostname() limits (VALID_HOSTNAME_LEN, VALID_LABEL_LEN).
constexpr size_t kMaxHostnameLength = 255;

bool dot_atom(std::string_view local) {
    if (local.empty()) return false;
    return std::none_of(local.begin(), local.end(), [](unsigned char c) {
        return c <= ' ' || c == '"' || c == '\\' || c == '@' || c == '(' || c == ')' || c == ',' ||
               c == ';' || c == ':' || c == '<' || c == '>' || c == '[' || c == ']';
    });
}

}  // namespace

std::string route_pseudo_domain(std::string_view route_name) {
    return fmt::format("{}.{}", ascii_lowercase(route_name), kRoutePseudoDomain);
}

bool valid_route_label(std::string_view name) {
    if (name.empty() || name.size() > 63 || name.front() == '-' || name.back() == '-') return false;
    return std::all_of(name.begin(), name.end(),
                       [](unsigned char c) { return std::isalnum(c) || c == '-'; });
}

std::optional<std::string> encode_route_address(std::string_view address,
                                                std::string_view route_name) {
    address = without_angle_brackets(address);
    const size_t at = address.rfind('@');
    if (at == std::string_view::npos || at == 0 || !printable(address)) return std::nullopt;
    const std::string_view local = address.substr(0, at);
    std::string_view domain = address.substr(at + 1);
    // Postfix drops a trailing dot and delivers to the domain: route it the same way.
    if (domain.ends_with('.')) domain.remove_suffix(1);
    address = address.substr(0, at + 1 + domain.size());
    if (domain.empty() || domain.back() == '.' || domain.front() == '.') return std::nullopt;
    if (local.front() == '@') return std::nullopt;  // a source route
    const std::string suffix = route_pseudo_domain(route_name);
    if (domain.front() == '[') {
        // An address literal: Postfix's resolver refuses "[...]" followed by labels.
        if (domain.back() != ']' || !dot_atom(local)) return std::nullopt;
        return fmt::format("\"{}@{}\"@{}", local, domain, suffix);
    }
    if (domain.size() + 1 + suffix.size() > kMaxHostnameLength) return std::nullopt;
    if (domain.find_first_of("[]\"\\ ") != std::string_view::npos) return std::nullopt;
    return fmt::format("{}.{}", address, suffix);
}

bool is_route_pseudo_address(std::string_view address) {
    // Anywhere in the address, not only after the last '@': Postfix's percent hack
    // (user%host@localdomain) and bang paths (host!user) turn other parts into the domain.
    // And as the MTA's address parser will read it: RFC 5322 comments ("paas-route.(x)invalid"),
    // white space, quotes and backslashes ("paas-route\\.invalid") are dropped there, so
    // they are dropped here before looking (Sendmail routed such a disguise to the route).
    // Inside a quoted string, '(' is text, not a comment ("(x"@paas-route(y).invalid).
    std::string parsed;
    parsed.reserve(address.size());
    int comment_depth = 0;
    bool in_quotes = false;
    for (size_t i = 0; i < address.size(); ++i) {
        const char c = address[i];
        if (c == '\\') {
            if (i + 1 < address.size() && comment_depth == 0) parsed += address[i + 1];
            ++i;
        } else if (in_quotes) {
            if (c == '"') {
                in_quotes = false;
            } else {
                parsed += c;
            }
        } else if (c == '(') {
            ++comment_depth;
        } else if (c == ')') {
            if (comment_depth > 0) --comment_depth;
        } else if (comment_depth == 0) {
            if (c == '"') {
                in_quotes = true;
            } else if (c != ' ' && c != '\t') {
                parsed += c;
            }
        }
    }
    return ascii_lowercase(without_angle_brackets(parsed)).find(kRoutePseudoDomain) !=
               std::string::npos ||
           ascii_lowercase(address).find(kRoutePseudoDomain) != std::string::npos;
}

std::string xtext_encode(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (unsigned char c : text) {
        if (c < 33 || c > 126 || c == '+' || c == '=') {
            out += fmt::format("+{:02X}", static_cast<unsigned>(c));
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

std::string reroute_esmtp_args(std::string_view address, std::string_view rcpt_esmtp) {
    std::string notify, orcpt;
    size_t start = 0;
    while (start < rcpt_esmtp.size()) {
        size_t end = rcpt_esmtp.find(' ', start);
        if (end == std::string_view::npos) end = rcpt_esmtp.size();
        const std::string_view word = rcpt_esmtp.substr(start, end - start);
        const std::string name = ascii_lowercase(word.substr(0, word.find('=')));
        if (name == "notify" && notify.empty()) notify = std::string(word);
        if (name == "orcpt" && orcpt.empty()) orcpt = std::string(word);
        start = end + 1;
    }
    if (orcpt.empty()) {
        orcpt = "ORCPT=rfc822;" + xtext_encode(without_angle_brackets(address));
    }
    return notify.empty() ? orcpt : notify + " " + orcpt;
}

bool InternalRecipients::contains(std::string_view address) const {
    address = without_angle_brackets(address);
    const size_t at = address.rfind('@');
    // Unqualified: a local recipient, unless it is a bang path or a percent hack that
    // Postfix turns into a remote address (host!user, user%host).
    if (at == std::string_view::npos) return address.find_first_of("!%") == std::string_view::npos;
    std::string domain = ascii_lowercase(address.substr(at + 1));
    while (!domain.empty() && domain.back() == '.') domain.pop_back();
    for (const std::string& entry : domains) {
        if (entry.starts_with('.') ? domain.size() > entry.size() && domain.ends_with(entry)
                                   : domain == entry) {
            return true;
        }
    }
    if (!table) return false;
    auto internal = [](const std::optional<TableMatch>& match) -> std::optional<bool> {
        if (!match) return std::nullopt;
        return match->value != "DUNNO";
    };
    if (table_is_cidr) {
        if (domain.size() < 3 || domain.front() != '[' || domain.back() != ']') return false;
        std::string_view ip = std::string_view(domain).substr(1, domain.size() - 2);
        if (ip.starts_with("ipv6:")) ip.remove_prefix(5);
        return internal(table->lookup(ip)).value_or(false);
    }
    if (auto found = internal(table->lookup(address))) return *found;
    // regexp:/pcre: tables Postfix keys by domain (relay_domains) see the domain alone;
    // a texthash: lookup above already tried it (access(5) order).
    return internal(table->lookup(domain)).value_or(false);
}

const std::string* DomainMap::find(std::string_view domain) const {
    std::string key = ascii_lowercase(domain);
    while (!key.empty() && key.back() == '.') key.pop_back();
    for (const auto& [from, to] : entries) {
        if (from == key) return &to;
    }
    return nullptr;
}

std::optional<std::string> DomainMap::rewrite(std::string_view address) const {
    if (entries.empty()) return std::nullopt;
    const bool angle = address.size() >= 2 && address.front() == '<' && address.back() == '>';
    const std::string_view bare = without_angle_brackets(address);
    const size_t at = bare.rfind('@');
    if (at == std::string_view::npos) return std::nullopt;
    const std::string* to = find(bare.substr(at + 1));
    if (!to) return std::nullopt;
    std::string out = fmt::format("{}@{}", bare.substr(0, at), *to);
    return angle ? "<" + out + ">" : out;
}

std::string DomainMap::apply(std::string_view address) const {
    auto rewritten = rewrite(address);
    return rewritten ? *rewritten : std::string(address);
}

std::vector<std::string> original_recipients(const std::vector<std::string>& reported,
                                             const std::vector<std::string>& originals,
                                             const DomainMap& recipient_rewrite) {
    std::vector<std::string> out;
    for (const std::string& original : originals) {
        const std::string spelled = recipient_rewrite.apply(original);
        if (std::any_of(reported.begin(), reported.end(),
                        [&](const std::string& r) { return iequals(r, spelled); })) {
            out.push_back(original);
        }
    }
    return out;
}

}  // namespace paasmilter
