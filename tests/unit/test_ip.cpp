#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "paasmilter/ip.hpp"
#include "paasmilter/prefix_trie.hpp"

using namespace paasmilter;

namespace {

IpAddress ip(std::string_view text) {
    auto address = parse_ip_address(text);
    REQUIRE_MESSAGE(address.has_value(), "bad test address ", std::string(text));
    return *address;
}

IpNetwork net(std::string_view text) {
    auto network = parse_ip_network(text);
    REQUIRE_MESSAGE(network.ok(), (network.ok() ? "" : network.error().to_string()));
    return *network;
}

std::string network_error(std::string_view text) {
    auto network = parse_ip_network(text);
    REQUIRE_FALSE_MESSAGE(network.ok(), "expected an error for ", std::string(text));
    return network.error().message;
}

}  // namespace

TEST_CASE("parse_ip_address: IPv4 and IPv6") {
    const IpAddress v4 = ip("192.0.2.7");
    CHECK(v4.family == IpFamily::v4);
    CHECK(v4.bit_count() == 32);
    CHECK(v4.bytes[0] == 192);
    CHECK(v4.bytes[3] == 7);
    CHECK(v4.to_string() == "192.0.2.7");

    const IpAddress v6 = ip("2001:DB8::1");
    CHECK(v6.family == IpFamily::v6);
    CHECK(v6.bit_count() == 128);
    CHECK(v6.bytes[0] == 0x20);
    CHECK(v6.bytes[1] == 0x01);
    CHECK(v6.bytes[15] == 1);
    CHECK(v6.to_string() == "2001:db8::1");

    CHECK(ip("::1").family == IpFamily::v6);
    CHECK(ip("::").family == IpFamily::v6);
}

TEST_CASE("parse_ip_address: IPv4-mapped IPv6 becomes IPv4") {
    const IpAddress mapped = ip("::ffff:192.0.2.7");
    CHECK(mapped.family == IpFamily::v4);
    CHECK(mapped == ip("192.0.2.7"));
    CHECK(ip("::FFFF:c000:0207") == ip("192.0.2.7"));
    // Only ::ffff:0:0/96 is IPv4-mapped; the deprecated IPv4-compatible form is not.
    CHECK(ip("::192.0.2.7").family == IpFamily::v6);
}

TEST_CASE("parse_ip_address: rejects junk without crashing") {
    for (const std::string& text : std::vector<std::string>{
             "", "1.2.3", "256.1.1.1", "1.2.3.4.5", "01.2.3.4", "::g", "1.2.3.4 ", " 1.2.3.4",
             "[::1]", "::1/128", "fe80::1%eth0", "unknown", "1.2.3.4\n", "\xff\xfe",
             "1:2:3:4:5:6:7:8:9", std::string(1000, '1')}) {
        CHECK_MESSAGE(!parse_ip_address(text).has_value(), text);
    }
    const std::string with_nul("192.0.2.7\0junk", 14);
    CHECK(!parse_ip_address(with_nul).has_value());
}

TEST_CASE("parse_ip_network: forms") {
    CHECK(net("192.0.2.0/24") == IpNetwork{ip("192.0.2.0"), 24});
    CHECK(net("192.0.2.7") == IpNetwork{ip("192.0.2.7"), 32});
    CHECK(net("0.0.0.0/0") == IpNetwork{ip("0.0.0.0"), 0});
    CHECK(net("2001:db8::/32") == IpNetwork{ip("2001:db8::"), 32});
    CHECK(net("2001:db8::1") == IpNetwork{ip("2001:db8::1"), 128});
    CHECK(net("::/0") == IpNetwork{ip("::"), 0});
    // Brackets, as cidr_table(5) allows.
    CHECK(net("[2001:db8::]/32") == IpNetwork{ip("2001:db8::"), 32});
    CHECK(net("[2001:db8::/32]") == IpNetwork{ip("2001:db8::"), 32});
    CHECK(net("[2001:db8::1]") == IpNetwork{ip("2001:db8::1"), 128});
    CHECK(net("[192.0.2.0]/24") == IpNetwork{ip("192.0.2.0"), 24});
    CHECK(net("192.0.2.0/24").to_string() == "192.0.2.0/24");
    CHECK(net("2001:DB8:10::/48").to_string() == "2001:db8:10::/48");
}

TEST_CASE("parse_ip_network: IPv4-mapped networks become IPv4") {
    CHECK(net("::ffff:192.0.2.0/120") == IpNetwork{ip("192.0.2.0"), 24});
    CHECK(net("::ffff:192.0.2.7") == IpNetwork{ip("192.0.2.7"), 32});
    CHECK(net("::ffff:0:0/96") == IpNetwork{ip("0.0.0.0"), 0});
    // Shorter prefixes cover more than the mapped range and stay IPv6.
    CHECK(net("::/64").address.family == IpFamily::v6);
}

TEST_CASE("parse_ip_network: errors") {
    CHECK(network_error("192.0.2.0/33") ==
          "prefix length 33 is out of range for IPv4 (0-32) in \"192.0.2.0/33\"");
    CHECK(network_error("2001:db8::/129") ==
          "prefix length 129 is out of range for IPv6 (0-128) in \"2001:db8::/129\"");
    CHECK(network_error("192.0.2.1/24") ==
          "non-null host address bits in \"192.0.2.1/24\", perhaps you should use "
          "\"192.0.2.0/24\" instead");
    CHECK(network_error("2001:db8::1/32") ==
          "non-null host address bits in \"2001:db8::1/32\", perhaps you should use "
          "\"2001:db8::/32\" instead");
    CHECK(network_error("192.0.2.0/") == "bad prefix length in \"192.0.2.0/\"");
    CHECK(network_error("192.0.2.0/-1") == "bad prefix length in \"192.0.2.0/-1\"");
    CHECK(network_error("192.0.2.0/2x") == "bad prefix length in \"192.0.2.0/2x\"");
    CHECK(network_error("192.0.2.0/0024") == "bad prefix length in \"192.0.2.0/0024\"");
    CHECK(network_error("192.0.2/24") == "bad address in \"192.0.2/24\"");
    CHECK(network_error("printer.example") == "bad address in \"printer.example\"");
    CHECK(network_error("") == "bad address in \"\"");
    CHECK(network_error("[2001:db8::/32") == "missing ']' in \"[2001:db8::/32\"");
    CHECK(network_error("[2001:db8::]x") == "garbage after ']' in \"[2001:db8::]x\"");
    CHECK(network_error("1.2.3.4/24/8") == "bad prefix length in \"1.2.3.4/24/8\"");
}

TEST_CASE("IpNetwork::contains") {
    CHECK(net("192.0.2.0/24").contains(ip("192.0.2.255")));
    CHECK_FALSE(net("192.0.2.0/24").contains(ip("192.0.3.0")));
    CHECK(net("192.0.2.128/25").contains(ip("192.0.2.200")));
    CHECK_FALSE(net("192.0.2.128/25").contains(ip("192.0.2.127")));
    CHECK(net("0.0.0.0/0").contains(ip("203.0.113.9")));
    CHECK(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
    CHECK_FALSE(net("2001:db8::/32").contains(ip("2001:db9::1")));
    // Families never mix, in either direction.
    CHECK_FALSE(net("::/0").contains(ip("192.0.2.7")));
    CHECK_FALSE(net("0.0.0.0/0").contains(ip("2001:db8::1")));
    CHECK(net("192.0.2.0/24").contains(ip("::ffff:192.0.2.9")));
}

TEST_CASE("PrefixTrie: first inserted (lowest index) wins, not longest") {
    PrefixTrie trie;
    trie.insert(net("192.0.2.0/24"), 0);
    trie.insert(net("192.0.2.7"), 1);
    trie.insert(net("10.0.0.0/8"), 2);
    trie.insert(net("2001:db8::/32"), 3);
    trie.insert(net("0.0.0.0/0"), 4);

    CHECK(trie.lowest_match(ip("192.0.2.7")) == 0);
    CHECK(trie.lowest_match(ip("10.1.2.3")) == 2);
    CHECK(trie.lowest_match(ip("203.0.113.1")) == 4);
    CHECK(trie.lowest_match(ip("2001:db8::5")) == 3);
    CHECK(trie.lowest_match(ip("2001:db9::5")) == PrefixTrie::npos);

    std::vector<std::uint32_t> seen;
    trie.for_each_match(ip("192.0.2.7"), [&](std::uint32_t value) { seen.push_back(value); });
    std::sort(seen.begin(), seen.end());
    CHECK(seen == std::vector<std::uint32_t>{0, 1, 4});
}

TEST_CASE("PrefixTrie: a repeated prefix keeps every value and the lowest wins") {
    PrefixTrie trie;
    trie.insert(net("192.0.2.0/24"), 5);
    trie.insert(net("192.0.2.0/24"), 2);
    trie.insert(net("192.0.2.0/24"), 9);
    CHECK(trie.lowest_match(ip("192.0.2.1")) == 2);
    int count = 0;
    trie.for_each_match(ip("192.0.2.1"), [&](std::uint32_t) { ++count; });
    CHECK(count == 3);
}

TEST_CASE("PrefixTrie agrees with a linear first-match scan on random data") {
    std::mt19937 random(20240521);  // fixed seed: reproducible
    std::vector<IpNetwork> networks;
    PrefixTrie trie;
    for (std::uint32_t i = 0; i < 3000; ++i) {
        IpAddress address;
        address.family = random() % 3 == 0 ? IpFamily::v6 : IpFamily::v4;
        // A small address space so that prefixes overlap a lot.
        address.bytes[0] = static_cast<std::uint8_t>(random() % 4);
        for (int b = 1; b < 16; ++b) address.bytes[b] = static_cast<std::uint8_t>(random());
        const int length = static_cast<int>(random() % (address.bit_count() + 1));
        for (int bit = length; bit < 128; ++bit) {
            address.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80u >> (bit % 8)));
        }
        if (address.family == IpFamily::v4)
            std::fill(address.bytes.begin() + 4, address.bytes.end(), 0);
        const IpNetwork network{address, length};
        networks.push_back(network);
        trie.insert(network, i);
    }
    int matched = 0;
    for (int probe = 0; probe < 3000; ++probe) {
        IpAddress address;
        address.family = random() % 3 == 0 ? IpFamily::v6 : IpFamily::v4;
        address.bytes[0] = static_cast<std::uint8_t>(random() % 4);
        for (int b = 1; b < (address.family == IpFamily::v4 ? 4 : 16); ++b) {
            address.bytes[b] = static_cast<std::uint8_t>(random());
        }
        std::uint32_t expected = PrefixTrie::npos;
        for (std::uint32_t i = 0; i < networks.size(); ++i) {
            if (networks[i].contains(address)) {
                expected = i;
                break;
            }
        }
        if (expected != PrefixTrie::npos) ++matched;
        REQUIRE(trie.lowest_match(address) == expected);
    }
    CHECK(matched > 100);  // the data set really exercises matches
}
