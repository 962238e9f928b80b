// Helpers shared by the unit tests that load a configuration from TOML text and look at the
// configuration generators' output (postfix-config, sendmail-config).
#pragma once

#include <doctest/doctest.h>

#include <memory>
#include <string>

#include "paasmilter/config.hpp"
#include "temp_dir.hpp"

namespace paasmilter::testing {

inline bool has(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

// TEXT as paas-milter.toml in DIR, loaded; the test fails if it does not load.
inline std::shared_ptr<const Config> load(TempDir& dir, const std::string& text) {
    auto config = load_config(dir.write("paas-milter.toml", text));
    REQUIRE_MESSAGE(config.ok(), (config.ok() ? "" : config.error().to_string()));
    return *config;
}

// Why TEXT does not load ("" when it does).
inline std::string load_error(const std::string& text) {
    TempDir dir;
    auto config = load_config(dir.write("paas-milter.toml", text));
    return config ? std::string() : config.error().to_string();
}

// The block of a generator's `output` that starts with "# ==== TARGET ====".
inline std::string block(const std::string& output, const std::string& target) {
    const std::string start = "# ==== " + target + " ====\n";
    auto at = output.find(start);
    if (at == std::string::npos) return {};
    at += start.size();
    auto end = output.find("\n# ==== ", at);
    return output.substr(at, end == std::string::npos ? std::string::npos : end - at);
}

}  // namespace paasmilter::testing
