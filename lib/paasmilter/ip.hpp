// IPv4/IPv6 addresses and CIDR networks as cidr_table(5) understands them.
//
// IPv4 is its own family (32 bits), never folded into IPv6: Postfix matches an IPv4 client
// against IPv4 patterns only, and "::/0" does not match 192.0.2.7. An IPv4-mapped IPv6
// address ("::ffff:192.0.2.7") is normalised to IPv4, as Postfix's smtpd does.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "paasmilter/result.hpp"

namespace paasmilter {

enum class IpFamily : std::uint8_t { v4, v6 };

struct IpAddress {
    IpFamily family = IpFamily::v4;
    std::array<std::uint8_t, 16> bytes{};  // network order; IPv4 uses the first 4

    int bit_count() const { return family == IpFamily::v4 ? 32 : 128; }
    // Bit `index` counted from the most significant bit of the first byte.
    bool bit(int index) const { return (bytes[index / 8] >> (7 - index % 8)) & 1; }
    std::string to_string() const;

    friend bool operator==(const IpAddress&, const IpAddress&) = default;
};

// A CIDR block: the network address (host bits zero) and its prefix length.
struct IpNetwork {
    IpAddress address;
    int prefix_length = 0;

    bool contains(const IpAddress& candidate) const;
    std::string to_string() const;  // "192.0.2.0/24", "2001:db8::/32"

    friend bool operator==(const IpNetwork&, const IpNetwork&) = default;
};

// Parses "192.0.2.7" or "2001:db8::1" (inet_pton syntax, no brackets, no zone).
// "::ffff:a.b.c.d" comes back as IPv4. nullopt for anything else.
std::optional<IpAddress> parse_ip_address(std::string_view text);

// Parses a cidr_table(5) pattern: "addr/len", a bare "addr" (= /32 or /128), and the
// bracketed IPv6 forms "[addr]/len", "[addr/len]", "[addr]". Rejects bad addresses,
// out-of-range lengths and host bits set below the prefix. An IPv4-mapped network with
// a prefix of at least 96 becomes the IPv4 network it covers (clients are normalised
// to IPv4, so the IPv6 form could never match). Errors carry only a message.
Result<IpNetwork> parse_ip_network(std::string_view text);

}  // namespace paasmilter
