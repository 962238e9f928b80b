#include "paasmilter/ip.hpp"
#include "paasmilter/text.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

namespace paasmilter {
namespace {

// Longest textual address inet_pton accepts ("ffff:...:255.255.255.255" is 45 chars).
constexpr std::size_t kMaxAddressText = 63;

bool is_v4_mapped(const std::array<std::uint8_t, 16>& bytes) {
    static constexpr std::uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return std::memcmp(bytes.data(), prefix, sizeof prefix) == 0;
}

IpAddress v4_from_mapped(const IpAddress& mapped) {
    IpAddress v4;
    v4.family = IpFamily::v4;
    std::copy_n(mapped.bytes.begin() + 12, 4, v4.bytes.begin());
    return v4;
}

// inet_pton on a string_view; the family follows Postfix: a ':' means IPv6.
std::optional<IpAddress> parse_exact(std::string_view text) {
    if (text.empty() || text.size() > kMaxAddressText) return std::nullopt;
    if (text.find('\0') != std::string_view::npos) return std::nullopt;
    char buffer[kMaxAddressText + 1];
    std::memcpy(buffer, text.data(), text.size());
    buffer[text.size()] = '\0';

    IpAddress address;
    address.family = text.find(':') == std::string_view::npos ? IpFamily::v4 : IpFamily::v6;
    const int af = address.family == IpFamily::v4 ? AF_INET : AF_INET6;
    if (inet_pton(af, buffer, address.bytes.data()) != 1) return std::nullopt;
    return address;
}

bool all_digits(std::string_view text) {
    return !text.empty() &&
           std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Clears every bit at or after `prefix_length`.
IpAddress masked(IpAddress address, int prefix_length) {
    for (int i = 0; i < 16; ++i) {
        const int keep = std::clamp(prefix_length - i * 8, 0, 8);
        address.bytes[i] &= static_cast<std::uint8_t>(0xff00u >> keep);
    }
    return address;
}

}  // namespace

std::string IpAddress::to_string() const {
    char buffer[INET6_ADDRSTRLEN];
    const int af = family == IpFamily::v4 ? AF_INET : AF_INET6;
    if (inet_ntop(af, bytes.data(), buffer, sizeof buffer) == nullptr) return "?";
    return buffer;
}

bool IpNetwork::contains(const IpAddress& candidate) const {
    if (candidate.family != address.family) return false;
    return masked(candidate, prefix_length) == address;
}

std::string IpNetwork::to_string() const {
    return address.to_string() + "/" + std::to_string(prefix_length);
}

std::optional<IpAddress> parse_ip_address(std::string_view text) {
    auto address = parse_exact(text);
    if (address && address->family == IpFamily::v6 && is_v4_mapped(address->bytes)) {
        return v4_from_mapped(*address);
    }
    return address;
}

Result<IpNetwork> parse_ip_network(std::string_view text) {
    const std::string_view original = text;
    std::string_view address_text = text;
    std::string_view length_text;
    bool has_length = false;

    // Brackets are optional in cidr tables: "[addr]/len", "[addr/len]" and "[addr]".
    if (!text.empty() && text.front() == '[') {
        const auto close = text.find(']');
        if (close == std::string_view::npos) {
            return make_error("missing ']' in " + quoted(original));
        }
        const std::string_view after = text.substr(close + 1);
        text = text.substr(1, close - 1);
        address_text = text;
        if (!after.empty()) {
            if (after.front() != '/') return make_error("garbage after ']' in " + quoted(original));
            length_text = after.substr(1);
            has_length = true;
        }
    }
    if (!has_length) {
        if (const auto slash = text.find('/'); slash != std::string_view::npos) {
            address_text = text.substr(0, slash);
            length_text = text.substr(slash + 1);
            has_length = true;
        }
    }

    auto address = parse_exact(address_text);
    if (!address) return make_error("bad address in " + quoted(original));

    const int max_length = address->bit_count();
    int prefix_length = max_length;
    if (has_length) {
        // At most 3 digits keeps the conversion free of overflow ("/0000000000033" is silly).
        if (!all_digits(length_text) || length_text.size() > 3) {
            return make_error("bad prefix length in " + quoted(original));
        }
        prefix_length = std::stoi(std::string(length_text));
        if (prefix_length > max_length) {
            return make_error("prefix length " + std::to_string(prefix_length) +
                              " is out of range for " +
                              (address->family == IpFamily::v4 ? "IPv4 (0-32)" : "IPv6 (0-128)") +
                              " in " + quoted(original));
        }
    }

    const IpAddress network = masked(*address, prefix_length);
    if (network != *address) {
        const IpNetwork suggestion{network, prefix_length};
        return make_error("non-null host address bits in " + quoted(original) +
                          ", perhaps you should use " + quoted(suggestion.to_string()) +
                          " instead");
    }

    if (network.family == IpFamily::v6 && prefix_length >= 96 && is_v4_mapped(network.bytes)) {
        return IpNetwork{v4_from_mapped(network), prefix_length - 96};
    }
    return IpNetwork{network, prefix_length};
}

}  // namespace paasmilter
