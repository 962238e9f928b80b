// Addresses as a route sees them: which recipients are internal (external_only routes), the
// route-specific pseudo-domain that makes Postfix send one recipient through the route's
// transport, and the per-route domain rewrite maps (sender_rewrite, recipient_rewrite).
//
// External-only routing, as tried on Postfix 3.7 (README "External-only routes"): at end of
// message the milter deletes each external recipient R (smfi_delrcpt) and adds it again as
// R in the route's pseudo-domain (smfi_addrcpt_par, with "ORCPT=rfc822;R" so that DSNs and
// the next hop name the original). transport_maps sends the pseudo-domain to the route's
// transport:nexthop, and smtp_generic_maps on that transport gives the recipient its own
// address back on the wire. Internal recipients are not touched.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "paasmilter/table.hpp"

namespace paasmilter {

// Every route's pseudo-domain ends in this (.invalid never resolves, RFC 2606).
inline constexpr std::string_view kRoutePseudoDomain = "paas-route.invalid";

// "acs-smtp" -> "acs-smtp.paas-route.invalid": the domain a route's rerouted recipients get.
std::string route_pseudo_domain(std::string_view route_name);

// Whether `name` can be a route's label in its pseudo-domain: one DNS label (letters, digits,
// '-', not first or last, at most 63 characters). Dots are refused: "b.a" and "a" would make
// the same pseudo-address of two different recipients.
bool valid_route_label(std::string_view name);

// `address` (without angle brackets, as the client wrote it) in the route's pseudo-domain:
//   user@example.net       -> user@example.net.ROUTE.paas-route.invalid
//   "john doe"@example.net -> "john doe"@example.net.ROUTE.paas-route.invalid
//   user@[192.0.2.1]       -> "user@[192.0.2.1]"@ROUTE.paas-route.invalid
// (Postfix refuses "[192.0.2.1].ROUTE..." as bad address syntax, so an address literal goes
// into a quoted local part.) nullopt when the address cannot be carried: no domain, a domain
// with a trailing dot or too long for a host name with the suffix, an address literal with
// a quoted local part, or any character outside printable ASCII or UTF-8 the MTA accepted.
std::optional<std::string> encode_route_address(std::string_view address,
                                                std::string_view route_name);

// Whether `address` is in some route's pseudo-domain: a client must never be able to name
// one (it would reach the route's transport without being classified).
bool is_route_pseudo_address(std::string_view address);

// RFC 3461 xtext: '+', '=', and bytes outside 33..126 as "+XX".
std::string xtext_encode(std::string_view text);

// The ESMTP arguments for the re-added recipient: the client's NOTIFY= and ORCPT= as they
// were (from `rcpt_esmtp`, the RCPT parameters separated by spaces), else
// "ORCPT=rfc822;<xtext of address>".
std::string reroute_esmtp_args(std::string_view address, std::string_view rcpt_esmtp);

// Which recipients are internal for an external_only route: domains listed in the
// configuration ("contoso.com" that domain, ".contoso.com" its subdomains) and, optionally,
// a table the operator already keeps for Postfix (relay_domains, virtual maps).
struct InternalRecipients {
    std::vector<std::string> domains;    // lower case; ".example.com" means subdomains
    std::shared_ptr<const Table> table;  // texthash:/regexp:/pcre: (address) or cidr:
    bool table_is_cidr = false;          // keyed by the IP of address-literal domains
    std::string where;                   // "file:line" of the setting, for messages

    bool empty() const { return domains.empty() && !table; }
    // A recipient without a domain is local, so internal. Otherwise: its domain in
    // `domains`, or a table entry that is not DUNNO for the address (texthash: access(5)
    // order, so the domain and its parents too; regexp/pcre: the address, then its domain;
    // cidr: the IP of an address literal).
    bool contains(std::string_view address) const;
};

// One domain rewrite map (the seed connector's "contoso.local=contoso.com"): exact domains,
// compared case-insensitively; the local part is kept as written.
struct DomainMap {
    std::vector<std::pair<std::string, std::string>> entries;  // from (lower case) -> to

    bool empty() const { return entries.empty(); }
    const std::string* find(std::string_view domain) const;
    // `address` (bare or in angle brackets) with its domain rewritten; nullopt: not in the map.
    std::optional<std::string> rewrite(std::string_view address) const;
    // rewrite(address), or `address` unchanged.
    std::string apply(std::string_view address) const;
};

struct AddressRewrite {
    DomainMap sender;     // envelope sender, From:, Sender:, Reply-To:
    DomainMap recipient;  // envelope recipients, To:, Cc:
    bool empty() const { return sender.empty() && recipient.empty(); }
};

// The service reports recipients as it got them (rewritten); the MTA knows them as the
// client sent them. Returns those of `originals` whose rewritten form is in `reported`
// (case-insensitively), in the order of `originals`.
std::vector<std::string> original_recipients(const std::vector<std::string>& reported,
                                             const std::vector<std::string>& originals,
                                             const DomainMap& recipient_rewrite);

}  // namespace paasmilter
