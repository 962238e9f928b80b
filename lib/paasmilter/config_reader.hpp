// Typed access to a parsed TOML configuration, with errors that name the file, the line and
// the key. Shared by the parts of the configuration loader (internal to lib/).
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "paasmilter/config.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

class ServiceRegistry;

class ConfigReader {
  public:
    explicit ConfigReader(std::string path)
        : path_(std::move(path)), base_dir_(std::filesystem::path(path_).parent_path()) {}

    const std::string& path() const { return path_; }
    // Relative file names in the configuration are relative to its directory.
    const std::filesystem::path& base_dir() const { return base_dir_; }
    // "cidr:tables/x.cidr" is relative to the configuration file's directory.
    std::string resolve(const std::string& spec) const {
        auto colon = spec.find(':');
        std::string type = spec.substr(0, colon + 1);
        std::filesystem::path file = spec.substr(colon + 1);
        if (file.is_relative()) file = base_dir_ / file;
        return type + file.lexically_normal().string();
    }
    // Valid but risky settings found so far ("file:line: key: why").
    std::vector<std::string>& warnings() { return warnings_; }

    Error error_at(const toml::node& node, std::string message) const {
        return make_error(std::move(message), path_, static_cast<int>(node.source().begin.line));
    }
    Error error_at(const toml::key& key, std::string message) const {
        return make_error(std::move(message), path_, static_cast<int>(key.source().begin.line));
    }
    // An error at a "file:line" location as stored in Route::where or a TableMatch.
    static Error error_at_where(const std::string& where, std::string message) {
        auto colon = where.rfind(':');
        if (colon == std::string::npos) return make_error(std::move(message), where);
        return make_error(std::move(message), where.substr(0, colon),
                          std::atoi(where.c_str() + colon + 1));
    }
    std::string where(const toml::node& node) const {
        return fmt::format("{}:{}", path_, node.source().begin.line);
    }

    Result<void> check_keys(const toml::table& table, std::initializer_list<std::string_view> known,
                            std::string_view context) const {
        for (auto&& [key, node] : table) {
            if (std::find(known.begin(), known.end(), key.str()) == known.end()) {
                std::string name = context.empty() ? std::string(key.str())
                                                   : fmt::format("{}.{}", context, key.str());
                return error_at(key, fmt::format("unknown key \"{}\"", name));
            }
        }
        return {};
    }

    Result<std::string> get_string(const toml::table& table, std::string_view key,
                                   std::string_view context, bool required,
                                   std::string fallback = {}) const {
        const toml::node* node = table.get(key);
        if (!node) {
            if (required) {
                return make_error(fmt::format("{}: missing key \"{}\"", context, key), path_,
                                  static_cast<int>(table.source().begin.line));
            }
            return fallback;
        }
        if (!node->is_string()) {
            return error_at(*node, fmt::format("{}.{}: expected a string", context, key));
        }
        return node->as_string()->get();
    }

    Result<std::vector<std::string>> get_string_list(const toml::table& table, std::string_view key,
                                                     const std::string& context) const {
        std::vector<std::string> out;
        const toml::node* node = table.get(key);
        if (!node) return out;
        const toml::array* array = node->as_array();
        if (!array)
            return error_at(*node, fmt::format("{}.{}: expected a list of strings", context, key));
        for (const toml::node& item : *array) {
            if (!item.is_string()) {
                return error_at(item, fmt::format("{}.{}: expected a string", context, key));
            }
            out.push_back(item.as_string()->get());
        }
        return out;
    }

    Result<int64_t> get_integer(const toml::table& table, std::string_view key,
                                const std::string& context, int64_t fallback, int64_t min,
                                int64_t max) const {
        const toml::node* node = table.get(key);
        if (!node) return fallback;
        if (!node->is_integer()) {
            return error_at(*node, fmt::format("{}.{}: expected an integer", context, key));
        }
        int64_t value = node->as_integer()->get();
        if (value < min || value > max) {
            return error_at(*node, fmt::format("{}.{}: {} is not between {} and {}", context, key,
                                               value, min, max));
        }
        return value;
    }

    Result<bool> get_bool(const toml::table& table, std::string_view key,
                          const std::string& context, bool fallback) const {
        const toml::node* node = table.get(key);
        if (!node) return fallback;
        if (!node->is_boolean()) {
            return error_at(*node, fmt::format("{}.{}: expected true or false", context, key));
        }
        return node->as_boolean()->get();
    }

    // A secret lives in its own file (mode 0600, outside the TOML that may be shared); the
    // file's content, trimmed, is the secret. Errors name the file, never its content.
    // A file the configuration names at `key`: relative to the configuration's directory, or
    // under systemd's credentials directory when it starts with "$CREDENTIALS_DIRECTORY/"
    // (LoadCredential=: secrets the service manager hands over, readable only by the service).
    Result<std::filesystem::path> secret_path(const toml::table& table, std::string_view key,
                                              const std::string& context) const {
        auto path = get_string(table, key, context, true);
        if (!path) return path.error();
        constexpr std::string_view kCredentials = "$CREDENTIALS_DIRECTORY/";
        if (path->starts_with(kCredentials)) {
            const char* directory = std::getenv("CREDENTIALS_DIRECTORY");
            if (!directory || !*directory) {
                return error_at(*table.get(key),
                                fmt::format("{}.{}: \"{}\" names $CREDENTIALS_DIRECTORY, which is "
                                            "not set (systemd sets it for a unit with "
                                            "LoadCredential=)",
                                            context, key, *path));
            }
            return std::filesystem::path(directory) / path->substr(kCredentials.size());
        }
        std::filesystem::path file = *path;
        if (file.is_relative()) file = base_dir_ / file;
        return file;
    }

    Result<std::string> read_secret_file(const toml::table& table, std::string_view key,
                                         const std::string& context) {
        auto resolved = secret_path(table, key, context);
        if (!resolved) return resolved.error();
        const std::filesystem::path& file = *resolved;
        std::ifstream in(file, std::ios::binary);
        if (!in) {
            return error_at(*table.get(key), fmt::format("{}.{}: cannot read {}: {}", context, key,
                                                         file.string(), std::strerror(errno)));
        }
        std::string secret((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        while (!secret.empty() && std::isspace(static_cast<unsigned char>(secret.back()))) {
            secret.pop_back();
        }
        while (!secret.empty() && std::isspace(static_cast<unsigned char>(secret.front()))) {
            secret.erase(secret.begin());
        }
        if (secret.empty()) {
            return error_at(*table.get(key),
                            fmt::format("{}.{}: {} is empty", context, key, file.string()));
        }
        warn_if_others_can_read(file, *table.get(key), context, key);
        return secret;
    }

    // Names the file and its mode, never its content. A file that cannot be stat()ed is
    // someone else's error (reading it, or the token request for a certificate).
    void warn_if_others_can_read(const std::filesystem::path& file, const toml::node& node,
                                 std::string_view context, std::string_view key) {
        struct stat status {};
        if (::stat(file.c_str(), &status) != 0 || (status.st_mode & (S_IRGRP | S_IROTH)) == 0)
            return;
        warnings_.push_back(fmt::format(
            "{}: {}.{}: {} is readable by {} (mode {:04o}); make it mode 0600, owned by the "
            "user paas-milter runs as",
            where(node), context, key, file.string(),
            (status.st_mode & S_IROTH) ? "others" : "its group", status.st_mode & 07777));
    }

    Result<FailurePolicy> get_policy(const toml::table& table, std::string_view key,
                                     const std::string& context, FailurePolicy fallback) const {
        auto text = get_string(table, key, context, false);
        if (!text) return text.error();
        if (text->empty()) return fallback;
        FailurePolicy policy;
        if (*text == "tempfail") {
            policy.kind = FailurePolicy::Kind::tempfail;
        } else if (*text == "hold") {
            policy.kind = FailurePolicy::Kind::hold;
        } else if (*text == "reject") {
            policy.kind = FailurePolicy::Kind::reject;
        } else if (text->starts_with("relay:") && text->size() > 6) {
            policy.kind = FailurePolicy::Kind::relay;
            policy.relay_route = text->substr(6);
        } else {
            return error_at(*table.get(key),
                            fmt::format("{}.{}: \"{}\" is not tempfail, hold, reject or "
                                        "relay:ROUTE",
                                        context, key, *text));
        }
        return policy;
    }

  private:
    std::string path_;
    std::filesystem::path base_dir_;
    std::vector<std::string> warnings_;
};

// Every key an `action = "api"` route may have, whatever its provider.
std::vector<std::string_view> api_route_keys();

// The keys of an `action = "api"` route (provider, credentials, conversion, policies,
// limits). With `services`, the route gets its HTTP client and token cache from it.
Result<std::shared_ptr<const ApiSettings>> load_api_settings(ConfigReader& reader,
                                                             ServiceRegistry* services,
                                                             const toml::table& table,
                                                             const std::string& context);

}  // namespace paasmilter
