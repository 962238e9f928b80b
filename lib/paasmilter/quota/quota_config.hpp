// The configuration of quotas: an API route's bucket keys and `on_quota`, and the values of
// the [quota] table (whose keys the loader in config.cpp checks). Internal to lib/.
#pragma once

#include <string>

#include <toml++/toml.h>

#include "paasmilter/config.hpp"
#include "paasmilter/config_reader.hpp"

namespace paasmilter {

// quota_messages_per_minute, quota_messages_per_hour, quota_recipients_per_day (each a
// positive integer; absent: no such bucket) and on_quota ("relay:ROUTE", "tempfail", "hold";
// default tempfail). Whether a relay target exists is checked with the other fallbacks.
Result<void> load_route_quota(ConfigReader& reader, const toml::table& table,
                              const std::string& context, ApiSettings& api);

// [quota]: store ("redis://HOST:PORT[/DB]"), password_file, fleet_size, key_prefix.
Result<QuotaSettings> load_quota_settings(ConfigReader& reader, const toml::table& table);

}  // namespace paasmilter
