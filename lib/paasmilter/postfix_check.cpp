#include "paasmilter/postfix_check.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>

#include "paasmilter/ip.hpp"
#include "paasmilter/regex.hpp"
#include "paasmilter/text.hpp"

namespace paasmilter {

const char* to_string(WiringIssue issue) {
    switch (issue) {
        case WiringIssue::milter_not_listed:
            return "milter_not_listed";
        case WiringIssue::milter_not_last:
            return "milter_not_last";
        case WiringIssue::milter_libmilter_syntax:
            return "milter_libmilter_syntax";
        case WiringIssue::milter_chroot_path:
            return "milter_chroot_path";
        case WiringIssue::socket_outside_chroot:
            return "socket_outside_chroot";
        case WiringIssue::default_action_accept:
            return "default_action_accept";
        case WiringIssue::header_check_missing:
            return "header_check_missing";
        case WiringIssue::header_check_mismatch:
            return "header_check_mismatch";
        case WiringIssue::route_unused:
            return "route_unused";
        case WiringIssue::transport_map_missing:
            return "transport_map_missing";
        case WiringIssue::transport_map_mismatch:
            return "transport_map_mismatch";
    }
    return "?";
}

namespace {

constexpr std::string_view kBlanks = " \t\r\n";
constexpr std::string_view kListSeparators = ", \t\r\n";

std::string_view trim(std::string_view text) {
    const auto first = text.find_first_not_of(kBlanks);
    if (first == std::string_view::npos) return {};
    return text.substr(first, text.find_last_not_of(kBlanks) - first + 1);
}

bool is_blank(char c) {
    return kBlanks.find(c) != std::string_view::npos;
}

// Whitespace-separated fields.
std::vector<std::string_view> fields_of(std::string_view line) {
    std::vector<std::string_view> fields;
    size_t i = 0;
    while (i < line.size()) {
        while (i < line.size() && is_blank(line[i])) ++i;
        const size_t start = i;
        while (i < line.size() && !is_blank(line[i])) ++i;
        if (i > start) fields.push_back(line.substr(start, i - start));
    }
    return fields;
}

// Lines of postconf output; a line starting with whitespace continues the previous one
// (`postconf -Mf` folds long entries that way).
std::vector<std::string> logical_lines(std::string_view text) {
    std::vector<std::string> lines;
    size_t start = 0;
    while (start < text.size()) {
        size_t end = text.find('\n', start);
        if (end == std::string_view::npos) end = text.size();
        std::string_view line = text.substr(start, end - start);
        start = end + 1;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        const std::string_view content = trim(line);
        if (content.empty() || content.front() == '#') continue;
        if (is_blank(line.front()) && !lines.empty()) {
            lines.back() += ' ';
            lines.back() += content;
        } else {
            lines.emplace_back(content);
        }
    }
    return lines;
}

// "name = value" -> {name, value}; nullopt without '='.
std::optional<std::pair<std::string_view, std::string_view>> name_value(std::string_view line) {
    const auto equals = line.find('=');
    if (equals == std::string_view::npos) return std::nullopt;
    return std::pair{trim(line.substr(0, equals)), trim(line.substr(equals + 1))};
}

// --- where the milter listens and where Postfix connects -----------------------------------

struct Endpoint {
    enum class Kind { inet, unix_path, other };
    Kind kind = Kind::other;
    std::string host;  // lowercase, without brackets; "" = every address (libmilter only)
    std::string port;
    std::string path;
};

std::string normal_host(std::string_view host) {
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
        host = host.substr(1, host.size() - 2);
    }
    if (auto address = parse_ip_address(host)) return address->to_string();
    return ascii_lowercase(host);
}

// libmilter's syntax, as milter.socket is written: inet:PORT@HOST, inet6:PORT@HOST,
// unix:/path, local:/path.
Endpoint libmilter_endpoint(std::string_view socket) {
    Endpoint endpoint;
    const auto colon = socket.find(':');
    if (colon == std::string_view::npos) return endpoint;
    const std::string_view transport = socket.substr(0, colon);
    const std::string_view rest = socket.substr(colon + 1);
    if (transport == "inet" || transport == "inet6") {
        endpoint.kind = Endpoint::Kind::inet;
        const auto at = rest.find('@');
        endpoint.port = std::string(trim(rest.substr(0, at)));
        if (at != std::string_view::npos) endpoint.host = normal_host(trim(rest.substr(at + 1)));
    } else if (transport == "unix" || transport == "local") {
        endpoint.kind = Endpoint::Kind::unix_path;
        endpoint.path = std::string(rest);
    }
    return endpoint;
}

// Postfix's syntax, as smtpd_milters is written: inet:HOST:PORT, inet:[IPV6]:PORT,
// unix:PATH, local:PATH. An inet endpoint with '@' is libmilter's syntax: kind other.
Endpoint postfix_endpoint(std::string_view name) {
    Endpoint endpoint;
    const auto colon = name.find(':');
    if (colon == std::string_view::npos) return endpoint;
    const std::string_view transport = name.substr(0, colon);
    const std::string_view rest = name.substr(colon + 1);
    if (transport == "inet") {
        if (rest.find('@') != std::string_view::npos) return endpoint;
        endpoint.kind = Endpoint::Kind::inet;
        if (const auto close = rest.find("]:");
            !rest.empty() && rest.front() == '[' && close != std::string_view::npos) {
            endpoint.host = normal_host(rest.substr(0, close + 1));
            endpoint.port = std::string(rest.substr(close + 2));
        } else if (const auto last = rest.rfind(':'); last != std::string_view::npos) {
            endpoint.host = normal_host(rest.substr(0, last));
            endpoint.port = std::string(rest.substr(last + 1));
        } else {
            endpoint.host = "localhost";  // Postfix's default host
            endpoint.port = std::string(rest);
        }
    } else if (transport == "unix" || transport == "local") {
        endpoint.kind = Endpoint::Kind::unix_path;
        endpoint.path = std::string(rest);
    }
    return endpoint;
}

bool is_loopback(std::string_view host) {
    if (host == "localhost") return true;
    const auto address = parse_ip_address(host);
    if (!address) return false;
    if (address->family == IpFamily::v4) return address->bytes[0] == 127;
    return *address == *parse_ip_address("::1");
}

bool is_wildcard(std::string_view host) {
    return host.empty() || host == "0.0.0.0" || host == "::" || host == "*";
}

// Does Postfix connecting to `to` reach the milter listening on `at`?
bool same_inet(const Endpoint& at, const Endpoint& to) {
    if (at.kind != Endpoint::Kind::inet || to.kind != Endpoint::Kind::inet) return false;
    if (at.port != to.port) return false;
    if (is_wildcard(at.host) || at.host == to.host) return true;
    // "localhost" resolves to a loopback address; accept either spelling.
    return (at.host == "localhost" || to.host == "localhost") && is_loopback(at.host) &&
           is_loopback(to.host);
}

// How Postfix writes an inet endpoint: inet:HOST:PORT, IPv6 in brackets; a milter listening
// on every address is reached on loopback.
std::string postfix_inet(const Endpoint& endpoint) {
    std::string host = endpoint.host;
    if (host.empty() || host == "0.0.0.0" || host == "*") host = "127.0.0.1";
    if (host == "::") host = "::1";
    if (host.find(':') != std::string::npos) host = "[" + host + "]";
    return fmt::format("inet:{}:{}", host, endpoint.port);
}

std::string normal_path(std::string_view path) {
    std::string out = std::filesystem::path(path).lexically_normal().string();
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    return out;
}

// The file a Postfix unix:PATH names: chrooted processes see queue_directory as "/", and
// every Postfix daemon runs in queue_directory, so a relative path is relative to it.
std::string resolve_postfix_path(std::string_view path, bool chroot, const std::string& queue) {
    if (chroot || path.empty() || path.front() != '/') {
        return normal_path(queue + "/" + std::string(path));
    }
    return normal_path(path);
}

bool is_under(const std::string& path, const std::string& directory) {
    return path.size() > directory.size() + 1 && path.starts_with(directory) &&
           path[directory.size()] == '/';
}

// One entry of smtpd_milters: "inet:host:port" or "{ inet:host:port, name=value ... }".
struct MilterEntry {
    std::string text;  // as written
    std::string name;  // the endpoint
    std::optional<std::string> default_action;
};

MilterEntry milter_entry(std::string_view token) {
    MilterEntry entry{std::string(token), std::string(token), std::nullopt};
    if (token.size() < 2 || token.front() != '{' || token.back() != '}') return entry;
    const std::vector<std::string> parts = split_postfix_list(token.substr(1, token.size() - 2));
    if (parts.empty()) return entry;
    entry.name = parts.front();
    for (size_t i = 1; i < parts.size(); ++i) {
        const auto attribute = name_value(parts[i]);
        if (attribute && attribute->first == "default_action") {
            entry.default_action = ascii_lowercase(attribute->second);
        }
    }
    return entry;
}

// `value` with `old_entry`'s endpoint replaced by `replacement` (inside its braces when the
// entry has per-milter settings), or `replacement` appended when `old_entry` is null.
std::string replace_entry(const std::string& value, const MilterEntry* old_entry,
                          const std::string& replacement) {
    if (!old_entry)
        return trim(value).empty() ? replacement : std::string(trim(value)) + ", " + replacement;
    std::string new_text = old_entry->text;
    if (const auto at = new_text.find(old_entry->name); at != std::string::npos) {
        new_text.replace(at, old_entry->name.size(), replacement);
    }
    std::string out = value;
    if (const auto at = out.find(old_entry->text); at != std::string::npos) {
        out.replace(at, old_entry->text.size(), new_text);
    }
    return std::string(trim(out));
}

// One smtpd_milters value and the smtpd services that use it.
struct MilterSource {
    std::string setting;  // "main.cf smtpd_milters", "master.cf service submission/inet ..."
    std::string value;
    const PostfixSmtpdService* owner = nullptr;  // the service of an -o override
    std::vector<const PostfixSmtpdService*> services;
    bool chroot_unknown = false;  // master.cf unknown: one pseudo-service of either kind
    std::vector<MilterEntry> entries;
};

std::string service_label(const PostfixSmtpdService& service) {
    return service.name + "/" + service.type;
}

// How to write a setting's new value in the operator's file.
std::string how_to_write(const MilterSource& source, const std::string& value) {
    if (!source.owner) return fmt::format("smtpd_milters = {} in main.cf", value);
    return fmt::format("-o smtpd_milters={} on master.cf service {}", value,
                       service_label(*source.owner));
}

class WiringChecker {
  public:
    WiringChecker(const Config& config, const PostfixFacts& facts)
        : config_(config),
          facts_(facts),
          queue_(normal_path(trim(facts.queue_directory).empty() ? "/var/spool/postfix"
                                                                 : trim(facts.queue_directory))),
          milter_(libmilter_endpoint(config.socket)) {
        if (milter_.kind == Endpoint::Kind::unix_path && milter_.path.starts_with("/")) {
            socket_path_ = normal_path(milter_.path);
        }
    }

    std::vector<WiringWarning> run() {
        build_sources();
        check_socket_reach();
        check_listing();
        check_last_for_external_only();
        check_non_smtpd();
        check_default_action();
        check_header_checks();
        check_transport_maps();
        return std::move(warnings_);
    }

  private:
    void warn(WiringIssue kind, std::string message) {
        warnings_.push_back({kind, std::move(message)});
    }

    void build_sources() {
        MilterSource main{"main.cf smtpd_milters", facts_.smtpd_milters, nullptr, {}, false, {}};
        if (facts_.smtpd_services.empty()) main.chroot_unknown = true;
        for (const PostfixSmtpdService& service : facts_.smtpd_services) {
            if (!service.smtpd_milters) main.services.push_back(&service);
        }
        sources_.push_back(std::move(main));
        for (const PostfixSmtpdService& service : facts_.smtpd_services) {
            if (!service.smtpd_milters) continue;
            sources_.push_back(
                {fmt::format("master.cf service {} (-o smtpd_milters)", service_label(service)),
                 *service.smtpd_milters,
                 &service,
                 {&service},
                 false,
                 {}});
        }
        for (MilterSource& source : sources_) {
            for (const std::string& token : split_postfix_list(source.value)) {
                source.entries.push_back(milter_entry(token));
            }
        }
    }

    bool socket_is_unix() const { return !socket_path_.empty(); }

    // Does this entry reach the milter for a service with this chroot setting?
    bool reaches(const MilterEntry& entry, bool chroot) const {
        const Endpoint endpoint = postfix_endpoint(entry.name);
        if (milter_.kind == Endpoint::Kind::inet) return same_inet(milter_, endpoint);
        if (socket_is_unix()) {
            return endpoint.kind == Endpoint::Kind::unix_path &&
                   resolve_postfix_path(endpoint.path, chroot, queue_) == socket_path_;
        }
        // A relative libmilter path: relative to the milter's working directory, unknown.
        return endpoint.kind == milter_.kind && endpoint.path == milter_.path;
    }

    bool reaches_any_chroot(const MilterEntry& entry) const {
        return reaches(entry, false) || reaches(entry, true);
    }

    // The entry this source uses to reach the milter for `service` (null: pseudo-service).
    const MilterEntry* reaching_entry(const MilterSource& source,
                                      const PostfixSmtpdService* service) const {
        for (const MilterEntry& entry : source.entries) {
            if (service ? reaches(entry, service->chroot) : reaches_any_chroot(entry)) {
                return &entry;
            }
        }
        return nullptr;
    }

    // The unix: form of the socket for services with these chroot settings.
    std::string postfix_unix_form(bool any_chroot, bool any_plain) const {
        if (!is_under(socket_path_, queue_)) return "unix:" + socket_path_;
        const std::string relative = socket_path_.substr(queue_.size() + 1);
        if (any_chroot && any_plain) return "unix:" + relative;  // relative: valid in both
        if (any_chroot) return "unix:/" + relative;
        return "unix:" + socket_path_;
    }

    std::string postfix_form(const MilterSource& source) const {
        if (milter_.kind == Endpoint::Kind::inet) return postfix_inet(milter_);
        if (!socket_is_unix()) return config_.socket;
        // master.cf unknown: the relative form, valid with and without chroot.
        bool any_chroot = source.chroot_unknown, any_plain = source.chroot_unknown;
        for (const PostfixSmtpdService* service : source.services) {
            (service->chroot ? any_chroot : any_plain) = true;
        }
        return postfix_unix_form(any_chroot, any_plain);
    }

    // A unix socket outside queue_directory, and a chrooted smtpd that should use it.
    void check_socket_reach() {
        if (!socket_is_unix() || is_under(socket_path_, queue_)) return;
        for (const MilterSource& source : sources_) {
            const bool names_socket =
                std::any_of(source.entries.begin(), source.entries.end(),
                            [&](const MilterEntry& entry) { return reaches(entry, false); });
            if (source.owner && !names_socket) continue;  // a service that wants no milter
            for (const PostfixSmtpdService* service : source.services) {
                if (!service->chroot) continue;
                const std::string inside = queue_ + "/paas-milter/" +
                                           std::filesystem::path(socket_path_).filename().string();
                warn(WiringIssue::socket_outside_chroot,
                     fmt::format("milter.socket \"{}\" is outside queue_directory {}, but "
                                 "master.cf runs smtpd service {} chrooted there (chroot column "
                                 "y), so smtpd cannot reach the socket: set milter.socket = "
                                 "\"unix:{}\" in {} and smtpd_milters = unix:/{} in main.cf, or "
                                 "set the chroot column of {} to n",
                                 config_.socket, queue_, service_label(*service), inside,
                                 config_.path, inside.substr(queue_.size() + 1),
                                 service_label(*service)));
                outside_chroot_reported_ = true;
                return;
            }
        }
    }

    void check_listing() {
        bool reached = false;
        bool explained = false;
        for (const MilterSource& source : sources_) {
            if (source.services.empty() && !source.chroot_unknown) continue;  // nobody uses it
            const std::string form = postfix_form(source);
            // libmilter's inet:PORT@HOST (or inet6:) given to Postfix.
            for (const MilterEntry& entry : source.entries) {
                if (!is_libmilter_form_of_milter(entry.name)) continue;
                warn(WiringIssue::milter_libmilter_syntax,
                     fmt::format("{} names \"{}\", libmilter's syntax for milter.socket = \"{}\"; "
                                 "Postfix writes inet:HOST:PORT and cannot connect to it: write {}",
                                 source.setting, entry.name, config_.socket,
                                 how_to_write(source, replace_entry(source.value, &entry, form))));
                explained = true;
            }
            if (source.chroot_unknown) {
                reached |= reaching_entry(source, nullptr) != nullptr;
                continue;
            }
            std::vector<const PostfixSmtpdService*> missed;
            const MilterEntry* flipped = nullptr;
            for (const PostfixSmtpdService* service : source.services) {
                if (reaching_entry(source, service)) {
                    reached = true;
                    continue;
                }
                for (const MilterEntry& entry : source.entries) {
                    if (socket_is_unix() && reaches(entry, !service->chroot)) {
                        flipped = &entry;
                        missed.push_back(service);
                        break;
                    }
                }
            }
            if (!flipped) continue;
            explained = true;
            if (outside_chroot_reported_) continue;  // the socket itself must move
            const PostfixSmtpdService& first = *missed.front();
            const std::string seen_as =
                resolve_postfix_path(postfix_endpoint(flipped->name).path, first.chroot, queue_);
            warn(WiringIssue::milter_chroot_path,
                 fmt::format("{} names \"{}\", but master.cf runs smtpd service {} {}, where "
                             "that is {}, not milter.socket's {}: write {}",
                             source.setting, flipped->name, service_label(first),
                             first.chroot ? fmt::format("chrooted in {}", queue_)
                                          : std::string("without chroot"),
                             seen_as, socket_path_,
                             how_to_write(source, replace_entry(source.value, flipped, form))));
        }
        if (reached || explained) return;
        const MilterSource& main = sources_.front();
        warn(WiringIssue::milter_not_listed,
             fmt::format(
                 "main.cf smtpd_milters ({}) does not name milter.socket = \"{}\", so "
                 "Postfix never asks paas-milter and no mail is routed: write {}",
                 trim(main.value).empty() ? std::string("empty")
                                          : fmt::format("\"{}\"", trim(main.value)),
                 config_.socket,
                 how_to_write(main, replace_entry(main.value, nullptr, postfix_form(main)))));
    }

    // external_only routes re-add at end of message the recipients the milter saw at RCPT;
    // a milter after it that refuses one of them is never heard of, and that recipient would
    // come back through the route. So paas-milter must be the last milter.
    void check_last_for_external_only() {
        const bool external_only =
            std::any_of(config_.routes.begin(), config_.routes.end(),
                        [](const auto& named) { return named.second.external_only; });
        if (!external_only) return;
        for (const MilterSource& source : sources_) {
            for (size_t i = 0; i + 1 < source.entries.size(); ++i) {
                if (!reaches_any_chroot(source.entries[i])) continue;
                warn(WiringIssue::milter_not_last,
                     fmt::format("{} lists \"{}\" after paas-milter (\"{}\"); with "
                                 "external_only routes paas-milter must be the last milter, "
                                 "or a recipient a later milter refuses comes back through the "
                                 "route: list paas-milter last",
                                 source.setting, source.entries.back().name,
                                 source.entries[i].name));
                break;
            }
        }
    }

    bool is_libmilter_form_of_milter(std::string_view name) const {
        if (milter_.kind != Endpoint::Kind::inet) return false;
        if (!name.starts_with("inet:") && !name.starts_with("inet6:")) return false;
        if (name.find('@') == std::string_view::npos) return false;
        return same_inet(milter_, [&] {
            Endpoint as_libmilter = libmilter_endpoint(name);
            if (as_libmilter.host.empty()) as_libmilter.host = "0.0.0.0";
            return as_libmilter;
        }());
    }

    // non_smtpd_milters is optional; when it names the milter in libmilter's syntax, say so.
    void check_non_smtpd() {
        for (const std::string& token : split_postfix_list(facts_.non_smtpd_milters)) {
            const MilterEntry entry = milter_entry(token);
            if (!is_libmilter_form_of_milter(entry.name)) continue;
            warn(WiringIssue::milter_libmilter_syntax,
                 fmt::format(
                     "main.cf non_smtpd_milters names \"{}\", libmilter's syntax for "
                     "milter.socket = \"{}\"; Postfix writes inet:HOST:PORT and cannot "
                     "connect to it: write non_smtpd_milters = {} in main.cf",
                     entry.name, config_.socket,
                     replace_entry(facts_.non_smtpd_milters, &entry, postfix_inet(milter_))));
        }
    }

    void check_default_action() {
        const std::string global = ascii_lowercase(trim(facts_.milter_default_action));
        // Entries that name the milter count even when a chroot keeps them from reaching
        // it (reported above): once that is fixed, their default action applies.
        bool global_applies = false;
        bool any_named = false;
        std::set<const MilterEntry*> reported;
        for (const MilterSource& source : sources_) {
            const auto named =
                std::find_if(source.entries.begin(), source.entries.end(),
                             [&](const MilterEntry& entry) { return reaches_any_chroot(entry); });
            if (named == source.entries.end()) continue;
            const MilterEntry* entry = &*named;
            std::vector<const PostfixSmtpdService*> users = source.services;
            if (source.chroot_unknown) users.push_back(nullptr);
            for (const PostfixSmtpdService* service : users) {
                any_named = true;
                if (entry->default_action) {
                    if (*entry->default_action == "accept" && reported.insert(entry).second) {
                        warn(WiringIssue::default_action_accept,
                             fmt::format("{} gives the milter \"{}\": while paas-milter is down or "
                                         "times out, Postfix delivers mail unfiltered and "
                                         "unrouted; write {}",
                                         source.setting, entry->text,
                                         how_to_write(source, without_accept(source, *entry))));
                    }
                    continue;
                }
                if (service && service->milter_default_action) {
                    if (ascii_lowercase(trim(*service->milter_default_action)) == "accept") {
                        warn(WiringIssue::default_action_accept,
                             fmt::format("master.cf service {} sets -o milter_default_action="
                                         "accept: while paas-milter is down or times out, that "
                                         "smtpd delivers mail unfiltered and unrouted; write -o "
                                         "milter_default_action=tempfail (or drop the -o)",
                                         service_label(*service)));
                    }
                    continue;
                }
                global_applies = true;
            }
        }
        if (global == "accept" && (global_applies || !any_named)) {
            warn(WiringIssue::default_action_accept,
                 "main.cf milter_default_action = accept: while paas-milter is down or times "
                 "out, Postfix delivers mail unfiltered and unrouted; write "
                 "milter_default_action = tempfail in main.cf (clients retry later)");
        }
    }

    // The source's value with the entry's default_action=accept made tempfail.
    static std::string without_accept(const MilterSource& source, const MilterEntry& entry) {
        std::string fixed = entry.text;
        constexpr std::string_view kKey = "default_action=";
        if (const auto at = fixed.find(kKey); at != std::string::npos) {
            const auto value = at + kKey.size();
            const auto end = fixed.find_first_of(", \t}", value);
            fixed.replace(value, end == std::string::npos ? std::string::npos : end - value,
                          "tempfail");
        }
        std::string out(trim(source.value));
        if (const auto at = out.find(entry.text); at != std::string::npos) {
            out.replace(at, entry.text.size(), fixed);
        }
        return out;
    }

    void check_header_checks();
    void check_transport_maps();

    const Config& config_;
    const PostfixFacts& facts_;
    const std::string queue_;
    const Endpoint milter_;
    std::string socket_path_;  // an absolute unix socket path, normalised; else empty
    std::vector<MilterSource> sources_;
    bool outside_chroot_reported_ = false;
    std::vector<WiringWarning> warnings_;
};

// --- milter_header_checks: regexp_table(5) / pcre_table(5), evaluated as Postfix does --------

struct HeaderPattern {
    Regex regex;
    bool negated = false;
    bool matches(std::string_view subject) const { return regex.matches(subject) != negated; }
};

// "/body/flags" (any non-alphanumeric delimiter, '!' negates) at the front of `text`, as
// table.cpp reads it; nullopt when it does not parse or compile.
std::optional<HeaderPattern> take_pattern(std::string_view& text, bool pcre) {
    text = trim(text);
    bool negated = false;
    while (!text.empty() && text.front() == '!') {
        negated = !negated;
        text = trim(text.substr(1));
    }
    if (text.empty()) return std::nullopt;
    const char delimiter = text.front();
    if (std::isalnum(static_cast<unsigned char>(delimiter)) || delimiter == '\\') {
        return std::nullopt;
    }
    size_t end = 1;
    while (end < text.size() && text[end] != delimiter) {
        if (text[end] == '\\' && end + 1 < text.size()) ++end;
        ++end;
    }
    if (end >= text.size()) return std::nullopt;
    const std::string body(text.substr(1, end - 1));
    text.remove_prefix(end + 1);
    RegexOptions options;
    bool newline_sensitive = false;
    while (!text.empty() && !is_blank(text.front()) && text.front() != '!') {
        const char flag = text.front();
        text.remove_prefix(1);
        if (flag == 'i') {
            options.caseless = !options.caseless;
        } else if (flag == 'm') {
            newline_sensitive = !newline_sensitive;
        } else if (pcre && flag == 's') {
            options.dotall = !options.dotall;
        } else if (pcre && flag == 'x') {
            options.extended = !options.extended;
        } else if (pcre && flag == 'A') {
            options.anchored = !options.anchored;
        } else if (pcre && flag == 'E') {
            options.dollar_end_only = !options.dollar_end_only;
        } else if (pcre && flag == 'U') {
            options.ungreedy = !options.ungreedy;
        } else if (!(pcre && flag == 'X')) {
            return std::nullopt;
        }
    }
    if (pcre) {
        options.multiline = newline_sensitive;
    } else {  // POSIX: REG_NEWLINE or not
        options.multiline = newline_sensitive;
        options.dotall = !newline_sensitive;
        options.dollar_end_only = !newline_sensitive;
    }
    auto regex = Regex::compile(body, options);
    if (!regex) return std::nullopt;
    return HeaderPattern{std::move(*regex), negated};
}

struct HeaderCheckLine {
    enum class Kind { rule, if_block, endif };
    Kind kind = Kind::rule;
    std::vector<HeaderPattern> patterns;  // all must match ("/a/ !/b/ action")
    std::string action;
    int line = 0;
};

// Lines that do not parse are left out: Postfix itself would refuse the table, which is
// postfix check's business, not ours.
std::vector<HeaderCheckLine> parse_header_checks(std::string_view content, bool pcre) {
    std::vector<HeaderCheckLine> lines;
    int number = 0;
    size_t start = 0;
    std::vector<std::pair<std::string, int>> logical;
    while (start < content.size()) {
        size_t end = content.find('\n', start);
        if (end == std::string_view::npos) end = content.size();
        std::string_view physical = content.substr(start, end - start);
        start = end + 1;
        ++number;
        if (!physical.empty() && physical.back() == '\r') physical.remove_suffix(1);
        const std::string_view text = trim(physical);
        if (text.empty() || text.front() == '#') continue;
        if (is_blank(physical.front()) && !logical.empty()) {
            logical.back().first += ' ';
            logical.back().first += text;
        } else {
            logical.emplace_back(std::string(text), number);
        }
    }
    for (const auto& [full, line_number] : logical) {
        std::string_view text = full;
        HeaderCheckLine line;
        line.line = line_number;
        if (text == "endif" || (text.starts_with("endif") && is_blank(text[5]))) {
            line.kind = HeaderCheckLine::Kind::endif;
            lines.push_back(std::move(line));
            continue;
        }
        if (text.starts_with("if") && text.size() > 2 &&
            (is_blank(text[2]) || text[2] == '/' || text[2] == '!')) {
            text.remove_prefix(2);
            auto pattern = take_pattern(text, pcre);
            line.kind = HeaderCheckLine::Kind::if_block;
            // An if we cannot read never matches: its block is skipped.
            if (pattern) line.patterns.push_back(std::move(*pattern));
            lines.push_back(std::move(line));
            continue;
        }
        auto pattern = take_pattern(text, pcre);
        if (!pattern) continue;
        line.patterns.push_back(std::move(*pattern));
        if (!text.empty() && text.front() == '!') {
            auto second = take_pattern(text, pcre);
            if (!second) continue;
            line.patterns.push_back(std::move(*second));
        }
        line.action = std::string(trim(text));
        if (line.action.empty()) continue;
        lines.push_back(std::move(line));
    }
    return lines;
}

struct HeaderCheckMatch {
    std::string action;
    int line = 0;
};

std::optional<HeaderCheckMatch> first_match(const std::vector<HeaderCheckLine>& lines,
                                            std::string_view header) {
    int skipping = 0;  // depth of if blocks whose condition failed
    for (const HeaderCheckLine& line : lines) {
        switch (line.kind) {
            case HeaderCheckLine::Kind::endif:
                if (skipping > 0) --skipping;
                break;
            case HeaderCheckLine::Kind::if_block:
                if (skipping > 0 || line.patterns.empty() || !line.patterns[0].matches(header)) {
                    ++skipping;
                }
                break;
            case HeaderCheckLine::Kind::rule:
                if (skipping > 0) break;
                if (std::all_of(line.patterns.begin(), line.patterns.end(),
                                [&](const HeaderPattern& p) { return p.matches(header); })) {
                    return HeaderCheckMatch{line.action, line.line};
                }
                break;
        }
    }
    return std::nullopt;
}

std::string escape_pattern(std::string_view text) {
    std::string out;
    for (char c : text) {
        if (std::string_view("\\^$.|?*+()[]{}/").find(c) != std::string_view::npos) out += '\\';
        out += c;
    }
    return out;
}

// "transport:nexthop" equal as Postfix means them: the transport name exactly, the nexthop
// (a host name) without regard to case.
bool same_filter(std::string_view a, std::string_view b) {
    a = trim(a);
    b = trim(b);
    const auto colon_a = a.find(':');
    const auto colon_b = b.find(':');
    if (a.substr(0, colon_a) != b.substr(0, colon_b)) return false;
    const std::string_view next_a = colon_a == std::string_view::npos ? "" : a.substr(colon_a + 1);
    const std::string_view next_b = colon_b == std::string_view::npos ? "" : b.substr(colon_b + 1);
    return iequals(next_a, next_b);
}

std::string_view table_type(std::string_view spec) {
    return spec.substr(0, spec.find(':'));
}

void WiringChecker::check_header_checks() {
    struct Parsed {
        const PostfixTable* table;
        std::optional<std::vector<HeaderCheckLine>> lines;  // nullopt: not read
    };
    std::vector<Parsed> tables;
    for (const PostfixTable& table : facts_.header_checks_tables) {
        Parsed parsed{&table, std::nullopt};
        const std::string_view type = table_type(table.spec);
        if (table.content && (type == "pcre" || type == "regexp")) {
            parsed.lines = parse_header_checks(*table.content, type == "pcre");
        }
        tables.push_back(std::move(parsed));
    }
    // Where the operator adds a line: the first table file we read.
    std::string add_to;
    for (const Parsed& parsed : tables) {
        if (!parsed.lines) continue;
        const std::string_view spec = parsed.table->spec;
        const std::string_view path = spec.substr(spec.find(':') + 1);
        add_to =
            path.starts_with("{") ? fmt::format("the inline table {}", spec) : std::string(path);
        break;
    }

    for (const auto& [name, route] : config_.routes) {
        // external_only routes add no header: transport_maps routes their recipients.
        if (route.action != Action::relay || route.external_only) continue;
        const std::string header = config_.routing_header + ": " + route.header_value;
        const std::string filter =
            route.transport.empty() ? std::string("transport:nexthop") : route.transport;
        const std::string wanted =
            fmt::format("/^{}:\\s*{}$/ FILTER {}", escape_pattern(config_.routing_header),
                        escape_pattern(route.header_value), filter);
        const std::string transport_note =
            route.transport.empty()
                ? fmt::format(" (routes.{} has no transport: set one, then write that)", name)
                : std::string();
        if (trim(facts_.milter_header_checks).empty()) {
            warn(WiringIssue::header_check_missing,
                 fmt::format("route \"{}\" ({}): main.cf milter_header_checks is empty, so the "
                             "header \"{}\" the milter adds selects no transport and the mail "
                             "takes Postfix's default path: set milter_header_checks = "
                             "pcre:/etc/postfix/milter_header_checks in main.cf, with the line "
                             "{}{} (paas-milter header-checks prints them all)",
                             name, route.where, header, wanted, transport_note));
            continue;
        }
        std::optional<HeaderCheckMatch> match;
        const Parsed* matched_in = nullptr;
        bool unknown = false;
        for (const Parsed& parsed : tables) {
            if (!parsed.lines) {  // a table we could not read might hold the line
                unknown = true;
                break;
            }
            match = first_match(*parsed.lines, header);
            if (match) {
                matched_in = &parsed;
                break;
            }
        }
        if (unknown) continue;
        if (!match) {
            warn(WiringIssue::header_check_missing,
                 fmt::format(
                     "route \"{}\" ({}): no line of milter_header_checks ({}) matches "
                     "the header \"{}\" the milter adds, so its mail takes Postfix's "
                     "default path: add the line {} to {}{}",
                     name, route.where, trim(facts_.milter_header_checks), header, wanted,
                     add_to.empty() ? std::string("a pcre: table in milter_header_checks") : add_to,
                     transport_note));
            continue;
        }
        const auto [verb, argument] = [&] {
            const std::string_view action = match->action;
            const auto blank = action.find_first_of(kBlanks);
            return std::pair{action.substr(0, blank), blank == std::string_view::npos
                                                          ? std::string_view()
                                                          : trim(action.substr(blank))};
        }();
        const bool is_filter = iequals(verb, "FILTER");
        if (is_filter && (route.transport.empty() || same_filter(argument, route.transport))) {
            continue;
        }
        const std::string_view spec = matched_in->table->spec;
        const std::string_view path = spec.substr(spec.find(':') + 1);
        const std::string at = path.starts_with("{")
                                   ? fmt::format("{} (rule {})", spec, match->line)
                                   : fmt::format("{}:{}", path, match->line);
        warn(WiringIssue::header_check_mismatch,
             fmt::format("route \"{}\" ({}): the header \"{}\" the milter adds matches {} "
                         "\"{}\", not FILTER {} (routes.{}.transport), so its mail goes {}: "
                         "change that line to {}",
                         name, route.where, header, at, match->action, route.transport, name,
                         is_filter ? fmt::format("to {}", argument)
                                   : std::string("where that action sends it"),
                         wanted));
    }
}

// An external_only route's recipients are in its pseudo-domain: transport_maps must send that
// to the route's transport, or they take Postfix's default transport and bounce.
void WiringChecker::check_transport_maps() {
    for (const auto& [name, route] : config_.routes) {
        if (route.action != Action::relay || !route.external_only) continue;
        const std::string domain = route_pseudo_domain(name);
        const std::string sample = "user@example.net." + domain;
        const std::string wanted =
            fmt::format("/[.@]{}$/ {}", escape_pattern(domain), route.transport);
        if (trim(facts_.transport_maps).empty()) {
            warn(WiringIssue::transport_map_missing,
                 fmt::format("route \"{}\" ({}): external_only, but main.cf transport_maps is "
                             "empty, so its external recipients (in {}) take Postfix's default "
                             "transport and bounce: set transport_maps = "
                             "pcre:/etc/postfix/paas_route_transport with the line {} "
                             "(paas-milter postfix-config prints it)",
                             name, route.where, domain, wanted));
            continue;
        }
        std::optional<HeaderCheckMatch> match;
        const PostfixTable* matched_in = nullptr;
        bool unknown = false;
        for (const PostfixTable& table : facts_.transport_tables) {
            const std::string_view type = table_type(table.spec);
            if (!table.content || (type != "pcre" && type != "regexp")) {
                unknown = true;  // a hash: table, say, might have the line
                break;
            }
            match = first_match(parse_header_checks(*table.content, type == "pcre"), sample);
            if (match) {
                matched_in = &table;
                break;
            }
        }
        if (unknown) continue;
        if (!match) {
            warn(WiringIssue::transport_map_missing,
                 fmt::format("route \"{}\" ({}): external_only, but no line of transport_maps "
                             "({}) matches its pseudo-domain {}, so its external recipients "
                             "take Postfix's default transport and bounce: add the line {} "
                             "to a pcre: table listed first in transport_maps",
                             name, route.where, trim(facts_.transport_maps), domain, wanted));
            continue;
        }
        if (same_filter(match->action, route.transport)) continue;
        warn(WiringIssue::transport_map_mismatch,
             fmt::format("route \"{}\" ({}): transport_maps sends its pseudo-domain {} to "
                         "\"{}\" ({} line {}), not to {} (routes.{}.transport): change that "
                         "line to {}",
                         name, route.where, domain, match->action, matched_in->spec, match->line,
                         route.transport, name, wanted));
    }
}

}  // namespace

std::vector<std::string> split_postfix_list(std::string_view value) {
    std::vector<std::string> out;
    std::string current;
    int depth = 0;
    for (char c : value) {
        if (depth == 0 && kListSeparators.find(c) != std::string_view::npos) {
            if (!current.empty()) out.push_back(std::move(current));
            current.clear();
            continue;
        }
        if (c == '{') ++depth;
        if (c == '}' && depth > 0) --depth;
        current += c;
    }
    if (!current.empty()) out.push_back(std::move(current));
    return out;
}

void apply_main_parameters(std::string_view postconf_output, PostfixFacts& facts) {
    for (const std::string& line : logical_lines(postconf_output)) {
        const auto parameter = name_value(line);
        if (!parameter) continue;
        const auto& [name, value] = *parameter;
        if (name == "queue_directory") {
            facts.queue_directory = std::string(value);
        } else if (name == "smtpd_milters") {
            facts.smtpd_milters = std::string(value);
        } else if (name == "non_smtpd_milters") {
            facts.non_smtpd_milters = std::string(value);
        } else if (name == "milter_default_action") {
            facts.milter_default_action = std::string(value);
        } else if (name == "milter_header_checks") {
            facts.milter_header_checks = std::string(value);
        } else if (name == "transport_maps") {
            facts.transport_maps = std::string(value);
        }
    }
}

std::vector<PostfixSmtpdService> parse_master_services(std::string_view postconf_m_output) {
    std::vector<PostfixSmtpdService> services;
    for (const std::string& line : logical_lines(postconf_m_output)) {
        const std::vector<std::string_view> fields = fields_of(line);
        if (fields.size() < 8) continue;
        std::string_view command = fields[7];
        if (const auto slash = command.rfind('/'); slash != std::string_view::npos) {
            command.remove_prefix(slash + 1);
        }
        if (command != "smtpd") continue;
        PostfixSmtpdService service;
        service.name = std::string(fields[0]);
        service.type = std::string(fields[1]);
        service.chroot = fields[4] == "y";
        services.push_back(std::move(service));
    }
    return services;
}

void apply_service_parameters(std::string_view postconf_p_output,
                              std::vector<PostfixSmtpdService>& services) {
    for (const std::string& line : logical_lines(postconf_p_output)) {
        const auto parameter = name_value(line);
        if (!parameter) continue;
        const std::string_view key = parameter->first;
        const auto last = key.rfind('/');
        if (last == std::string_view::npos || last == 0) continue;
        const auto middle = key.rfind('/', last - 1);
        if (middle == std::string_view::npos) continue;
        const std::string_view name = key.substr(0, middle);
        const std::string_view type = key.substr(middle + 1, last - middle - 1);
        const std::string_view setting = key.substr(last + 1);
        for (PostfixSmtpdService& service : services) {
            if (service.name != name || service.type != type) continue;
            if (setting == "smtpd_milters") service.smtpd_milters = std::string(parameter->second);
            if (setting == "milter_default_action") {
                service.milter_default_action = std::string(parameter->second);
            }
        }
    }
}

std::optional<std::string> inline_table_content(std::string_view spec) {
    const auto colon = spec.find(':');
    if (colon == std::string_view::npos) return std::nullopt;
    const std::string_view type = spec.substr(0, colon);
    if (type != "pcre" && type != "regexp") return std::nullopt;
    const std::string_view body = trim(spec.substr(colon + 1));
    if (body.size() < 2 || body.front() != '{' || body.back() != '}') return std::nullopt;
    std::string content;
    for (const std::string& rule : split_postfix_list(body.substr(1, body.size() - 2))) {
        if (rule.size() < 2 || rule.front() != '{' || rule.back() != '}') continue;
        content += trim(std::string_view(rule).substr(1, rule.size() - 2));
        content += '\n';
    }
    return content;
}

std::vector<WiringWarning> check_routes_used(const Config& config) {
    std::set<std::string, std::less<>> used;
    if (!config.default_route.empty()) used.insert(config.default_route);
    for (const Rule& rule : config.rules) {
        if (!rule.route.empty()) used.insert(rule.route);
        for (const Condition& condition : rule.conditions) {
            for (const auto& table : condition.sources) {
                table->for_each_result(
                    [&](const std::string& value, const std::string&) { used.insert(value); });
            }
        }
    }
    for (const auto& [name, route] : config.routes) {
        if (!route.api) continue;
        for (const FailurePolicy* policy :
             {&route.api->on_failure, &route.api->on_permanent_failure, &route.api->on_oversize}) {
            if (policy->kind == FailurePolicy::Kind::relay) used.insert(policy->relay_route);
        }
    }
    std::vector<WiringWarning> warnings;
    for (const auto& [name, route] : config.routes) {
        if (used.contains(name)) continue;
        warnings.push_back(
            {WiringIssue::route_unused,
             fmt::format("{}: routes.{}: no rule, table result, milter.default_route or API "
                         "fallback selects this route, so it is never used: add a rule with "
                         "route = \"{}\", or remove [routes.{}]",
                         route.where, name, name, name)});
    }
    return warnings;
}

std::vector<WiringWarning> check_postfix_wiring(const Config& config, const PostfixFacts& facts) {
    return WiringChecker(config, facts).run();
}

}  // namespace paasmilter
