// The benchmarks' baseline for cidr tables: each entry as network bytes, prefix and result,
// and a lookup that parses the address and tries every entry in file order. Shared by
// bench-classify and bench-classify-scale, which also write their tables from these entries.
#pragma once

#include <arpa/inet.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace paasmilter::bench {

struct CidrEntry {
    int family = AF_INET;
    std::array<std::uint8_t, 16> bytes{};
    int prefix = 0;
    std::string value;
};

inline std::string to_text(int family, const std::array<std::uint8_t, 16>& bytes) {
    char buffer[INET6_ADDRSTRLEN];
    inet_ntop(family, bytes.data(), buffer, sizeof buffer);
    return buffer;
}

inline void clear_host_bits(std::array<std::uint8_t, 16>& bytes, int prefix) {
    for (int i = 0; i < 16; ++i) {
        const int keep = std::clamp(prefix - i * 8, 0, 8);
        bytes[i] &= static_cast<std::uint8_t>(0xff00u >> keep);
    }
}

inline const CidrEntry* naive_cidr_lookup(const std::vector<CidrEntry>& entries,
                                          const std::string& text) {
    std::array<std::uint8_t, 16> address{};
    const int family = text.find(':') == std::string::npos ? AF_INET : AF_INET6;
    if (inet_pton(family, text.c_str(), address.data()) != 1) return nullptr;
    for (const CidrEntry& entry : entries) {
        if (entry.family != family) continue;
        std::array<std::uint8_t, 16> masked = address;
        clear_host_bits(masked, entry.prefix);
        if (masked == entry.bytes) return &entry;
    }
    return nullptr;
}

}  // namespace paasmilter::bench
