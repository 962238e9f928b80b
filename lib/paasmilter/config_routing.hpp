// The configuration keys of external-only routing and of the address rewrite maps (internal
// to the configuration loader, lib/paasmilter/config.cpp).
#pragma once

#include <string>
#include <string_view>

#include <toml++/toml.h>

#include "paasmilter/config.hpp"
#include "paasmilter/config_reader.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

// [milter] internal_domains, internal_table: the internal recipients of every external_only
// route that names none of its own (config.internal_recipients).
Result<void> load_milter_routing(ConfigReader& reader, const toml::table& milter, Config& config);

// [routes.NAME] external_only, internal_domains, internal_table (relay routes),
// sender_rewrite, recipient_rewrite (relay and api routes). Called once route.action,
// route.transport and route.api are known, after load_milter_routing.
Result<void> load_route_routing(ConfigReader& reader, const toml::table& table,
                                const std::string& context, const Config& config, Route& route);

// A relay route's transport = "transport:nexthop" goes into generated Postfix and Sendmail
// configuration (postfix-config, sendmail-config): a transport name of letters, digits, '_',
// '.', '-', and a next hop as transport(5) allows it (a list separated by commas or spaces,
// lmtp:unix:/path, a scoped IPv6 address) but without a line break, quote, '#' or '\' that
// could end a generated line or comment.
bool transport_is_well_formed(std::string_view transport);

}  // namespace paasmilter
